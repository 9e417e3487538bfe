"""merge_branches on an ExportedProgram (.pt2): the hand-written blocks of test_merge_branches.py, exported.

Every program is compared with the original model through ``nf.verify``; the merged program's
graph is counted (batch_norm and conv ops); refusals come back as Skips with their reasons; two
timm models end with as many convs as timm's own ``reparameterize_model`` and no batch_norm.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

import normfold as nf
from normfold.passes.fold import ExportedPassResult
from tests.commands._cli import run_cli
from tests.conftest import randomize_bn_stats, run_counting_ops
from tests.passes.test_merge_branches import (ACBlock, DBBlock, DistilledHead, InPlaceAfterBranches, MobileOneStyle, Net,
                                              PooledNet, RepDW, RepMixer, RepVGGBlock, SumOfList, _convbn, _prepare, _x)


def _ops(program: torch.export.ExportedProgram) -> tuple[int, int]:
    """(batch_norm ops, conv ops) in the program's graph."""
    names = [n.target.overloadpacket.__name__ for n in program.graph.nodes
             if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
    return sum("batch_norm" in p for p in names), sum(p in ("conv1d", "conv2d", "conv3d", "convolution") for p in names)


def _export(model: nn.Module, x: tuple, **kw) -> torch.export.ExportedProgram:
    return torch.export.export(model, x, strict=False, **kw)


def _verified(model: nn.Module, r: nf.PassResult, x: tuple) -> None:
    v = nf.verify(model, r.program.module(), x)
    assert v.passed, v


_BLOCKS = 9


@pytest.fixture(scope="module")
def blocks() -> tuple[nn.Module, tuple, torch.export.ExportedProgram]:
    """Nine re-parameterizable blocks written from their papers, in one model, exported once."""
    model = _prepare(Net(RepVGGBlock(8, 8), RepVGGBlock(8, 8, stride=2), RepVGGBlock(8, 8, groups=4), ACBlock(8),
                         DBBlock(8), MobileOneStyle(8), RepMixer(8), RepDW(8), SumOfList(8)))
    x = _x(2, 3, 12, 12)
    return model, x, _export(model, x)


def test_hand_written_blocks_merge_into_one_conv_each(blocks):
    """RepVGG (plain, strided, grouped), ACNet, DBB, MobileOne, RepMixer, RepViT's RepDW, a sum of a list."""
    model, x, program = blocks
    before = {k: v.clone() for k, v in program.state_dict.items()}
    r = nf.merge_branches(program)
    assert isinstance(r, ExportedPassResult)
    _verified(model, r, x)
    assert _ops(program)[0] > 0
    assert _ops(r.program) == (0, 2 + _BLOCKS)  # stem, head, one conv per block
    assert [c.details["block"] for c in r.changes] == [f"body.{i}" for i in range(_BLOCKS)]
    assert [c.details["branches"] for c in r.changes][:3] == [3, 2, 3] and not r.skipped
    # the merged weights are new parameters; what only the branches read left the signature and state_dict
    sd = r.program.state_dict
    assert "body.0.merged_conv.weight" in sd and "body.0.merged_conv.bias" in sd
    assert not any(".identity." in k or ".dense." in k or "num_batches_tracked" in k for k in sd)
    targets = {s.target for s in r.program.graph_signature.input_specs if s.target}
    assert targets == set(sd) | set(r.program.constants)
    # the input program is untouched (inplace=False)
    assert _ops(program)[0] > 0 and all(torch.equal(before[k], v) for k, v in program.state_dict.items())


def test_core_aten_program_merges_into_convolution_ops():
    """``run_decompositions`` leaves ``convolution`` and ``_native_batch_norm_legit_no_training`` + ``getitem``;
    the merged convs keep to ``convolution``."""
    model = _prepare(Net(RepVGGBlock(8, 8), DBBlock(8), MobileOneStyle(8)))
    x = _x(2, 3, 8, 8)
    program = _export(model, x).run_decompositions()
    assert "_native_batch_norm_legit_no_training" in str(program.graph)
    r = nf.merge_branches(program)
    _verified(model, r, x)
    assert _ops(r.program) == (0, 5) and len(r.changes) == 3 and not r.skipped
    ops = {n.target for n in r.program.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.convolution.default in ops and torch.ops.aten.conv2d.default not in ops


def test_records_name_the_blocks_and_modules_the_module_path_names(blocks):
    model, x, program = blocks
    on_modules = {c.details["block"]: c for c in nf.merge_branches(model).changes}
    on_program = nf.merge_branches(program).changes
    # the module pass merges DBB's 1x1 -> kxk chain as a block of its own first, then names its conv
    assert set(on_modules) - {c.details["block"] for c in on_program} == {"body.4.kxk"}
    for c in on_program:
        m = on_modules[c.details["block"]]
        assert (c.details["kernel"], c.details["groups"], c.details["stride"], c.details["branches"]) == \
            (m.details["kernel"], m.details["groups"], m.details["stride"], m.details["branches"])
        nested = {p for p in m.paths if p.endswith(".merged_conv")}
        assert set(m.paths) - nested <= set(c.paths)
        assert set(c.paths) - set(m.paths) == {p for p in c.paths if any(p.startswith(n[:-len("merged_conv")])
                                                                         for n in nested)}


def test_fold_batchnorm_folds_then_merges_a_program(blocks):
    model, x, program = blocks
    r = nf.fold_batchnorm(program, merge_branches=True)
    _verified(model, r, x)
    assert _ops(r.program) == (0, 2 + _BLOCKS)
    assert any(c.action.startswith("fold") for c in r.changes)
    assert sum(c.action == "merge_branches" for c in r.changes) == _BLOCKS
    assert not r.skipped  # the identity BatchNorms the fold left were merged, not left alone
    assert r.metrics["merge_branches.blocks_merged"] == _BLOCKS


def test_dynamic_batch_stays_dynamic_and_the_program_saves(tmp_path: Path):
    model = _prepare(Net(RepVGGBlock(8, 8), MobileOneStyle(8)))
    program = _export(model, _x(2, 3, 10, 10), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    r = nf.fold_batchnorm(program, merge_branches=True)
    path = tmp_path / "merged.pt2"
    torch.export.save(r.program, str(path))
    loaded = torch.export.load(str(path))
    for n in (1, 5):
        _verified(model, r, _x(n, 3, 10, 10))
        v = nf.verify(model, loaded.module(), _x(n, 3, 10, 10))
        assert v.passed, v
    assert _ops(loaded) == (0, 4)


def test_distillation_head_linears_merge_into_one_linear_op():
    """RepViT's ``(head(x) + head_dist(x)) / 2`` after the fold: one ``aten.linear``."""
    model = _prepare(PooledNet(DistilledHead()))
    x = _x(2, 3, 6, 6)
    r = nf.fold_batchnorm(_export(model, x), merge_branches=True)
    _verified(model, r, x)
    linears = [n for n in r.program.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 1 and "head.merged_linear.weight" in r.program.state_dict and not r.skipped


# ---------------------------------------------------------------------------------------------- refusals


class _Pair(nn.Module):
    """Two branches of one input meeting at an add; ``a`` and ``b`` are the branches."""

    def __init__(self, a: nn.Module, b: nn.Module, *, reuse: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.reuse = a, b, reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        y = a + self.b(x)
        return y * torch.sigmoid(a) if self.reuse else y


@pytest.mark.parametrize("block, x_shape, fragment", [
    (_Pair(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), nn.Conv2d(8, 8, 1)), (2, 3, 6, 6), "not linear"),
    (_Pair(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 2, stride=2)), (2, 3, 8, 8),
     "paddings do not line up"),
    (_Pair(nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.Conv2d(8, 8, 3, padding=1)), (2, 3, 8, 8),
     "dilations differ"),
    (_Pair(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), reuse=True), (2, 3, 6, 6), "also read by"),
    (_Pair(nn.Conv2d(8, 8, 1), nn.AvgPool2d(3, 1, 1)), (2, 3, 6, 6), "multiply-adds"),
    (_Pair(_convbn(8, 8, 3, padding=1), nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8),
                                                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))),
     (2, 3, 6, 6), "border"),
], ids=["nonlinear", "padding", "dilation", "read_elsewhere", "costlier", "biased_pointwise_before_kxk"])
def test_refusals_are_skips_with_their_reason(block: nn.Module, x_shape: tuple, fragment: str):
    model = _prepare(Net(block))
    x = _x(*x_shape)
    r = nf.merge_branches(_export(model, x))
    assert any(fragment in s.reason and s.paths[0] == "body.0" for s in r.skipped), [str(s) for s in r.skipped]
    assert not r.modified
    _verified(model, r, x)


def test_in_place_op_on_the_shared_input_is_left():
    """The training IR keeps in-place ops: ``x.mul_(2)`` after the branches read ``x`` changes what they read."""
    model = _prepare(Net(InPlaceAfterBranches()))
    x = _x(2, 3, 6, 6)
    r = nf.merge_branches(_export(model, x))
    assert any("in place" in s.reason for s in r.skipped) and not r.modified
    _verified(model, r, x)


def test_batchnorm_exported_in_training_mode_is_left():
    model = _prepare(Net(RepVGGBlock(8, 8)))
    model.body[0].identity.train()
    x = _x(4, 3, 6, 6)
    program = _export(model, x)
    r = nf.merge_branches(program)
    assert any("training mode" in s.reason for s in r.skipped), [str(s) for s in r.skipped]
    # the two conv branches still merge; the identity BatchNorm stays, normalizing with batch statistics,
    # so the reference is the exported program (the model itself would be compared in eval)
    assert r.changes[0].details["branches"] == 2 and _ops(r.program)[0] == 1
    v = nf.verify(program.module(), r.program.module(), x)
    assert v.passed, v


# ---------------------------------------------------------------------------------------------- timm


def _timm(name: str) -> nn.Module:
    import timm

    return randomize_bn_stats(timm.create_model(name, pretrained=False), 0).eval()


def _timm_counts(model: nn.Module, x: tuple) -> tuple[int, int]:
    """(batch_norm ops, conv ops) that run in timm's own re-parameterized model."""
    from timm.utils.model import reparameterize_model

    _, bn, conv = run_counting_ops(reparameterize_model(copy.deepcopy(model)), x)
    return bn, conv


def test_timm_mobileone_s0_program_ends_like_timm_reparameterize():
    model = _timm("mobileone_s0")
    x = (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)
    r = nf.fold_batchnorm(_export(model, x), merge_branches=True)
    _verified(model, r, x)
    assert _timm_counts(model, x) == (0, 43)
    assert _ops(r.program) == (0, 43) and not r.skipped


def test_cli_fold_merge_branches_on_a_pt2(tmp_path: Path, capsys):
    """`normfold fold x.pt2 --merge-branches -o y.pt2` on timm's repvgg_a0: as many convs as timm, no batch_norm."""
    model = _timm("repvgg_a0")
    x = (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)
    src, out = tmp_path / "x.pt2", tmp_path / "y.pt2"
    torch.export.save(_export(model, x), str(src))
    code, stdout, _ = run_cli(["fold", str(src), "--merge-branches", "-o", str(out), "-q"], capsys)
    assert code == 0, stdout
    last = stdout.strip().splitlines()[-1]
    assert "merged the branches of 22 block(s)" in last and "left 0 alone" in last, last
    program = torch.export.load(str(out))
    assert _ops(program) == (0, 22) and _timm_counts(model, x) == (0, 22)
    v = nf.verify(model, program.module(), x)
    assert v.passed, v
