"""ATen-level folding of torch.export ExportedPrograms (normfold.passes.fold_exported) and `normfold fold model.pt2`.

Each model is exported twice (the training IR torch.export gives, and the
core ATen IR after run_decompositions: convolution, addmm/mm,
_native_batch_norm_legit_no_training), folded, and compared with the original
model's outputs AND with the nn.Module pass's records on the same model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normfold as nf
from normfold.demo import build_demo_model
from normfold.passes.fold_exported import fold_exported_program
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import assert_outputs_close, randomize_bn_stats
from tests.passes.test_fold_forward import LinearNorm, MixedConv, PoolHead, SignalHead


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


class _BatchNormOps(TorchDispatchMode):
    """Counts batch_norm ops, including ``_native_batch_norm_legit.no_stats`` (weight standardization in core ATen)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        name = str(func)
        if "batch_norm" in name and not any(k in name for k in ("backward", "batch_norm_stats", "elemt", "gather",
                                                                  "update_stats")):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _bn_ops(fn, *args) -> int:
    with _BatchNormOps() as c, torch.no_grad():
        fn(*args)
    return c.count


class ActBNConvs(nn.Module):
    """GELU -> BN -> 1x1 conv without bias (forward fold, new bias), and Linear(bias=False) -> BN1d (mm)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.c1 = nn.Conv2d(6, 4, 1, bias=False)
        self.fc = nn.Linear(4, 5, bias=False)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(self.bn(F.gelu(self.c0(x))))
        return self.bn_fc(self.fc(y.mean((2, 3))))


def _ws_net() -> nn.Module:
    timm = pytest.importorskip("timm")
    from timm.layers import ScaledStdConv2d, StdConv2d

    return nn.Sequential(StdConv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         ScaledStdConv2d(6, 6, 1), nn.BatchNorm2d(6))


MODELS = {
    "demo": (lambda: build_demo_model(3), (2, 3, 16, 16)),
    "signal head": (SignalHead, (2, 3, 12)),
    "levit LinearNorm": (LinearNorm, (3, 5, 6)),
    "mixed conv cat": (MixedConv, (2, 4, 6, 6)),
    "pool head": (PoolHead, (2, 3, 6, 5)),
    "new biases": (ActBNConvs, (2, 3, 7, 7)),
    "weight standardization": (_ws_net, (2, 3, 8, 8)),
}


def _records(r: nf.PassResult) -> set[tuple]:
    return {(c.action, c.paths) for c in r.changes}


@pytest.mark.parametrize("decompose", [False, True], ids=["training-ir", "core-aten"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_fold_matches_module_pass(name: str, decompose: bool) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    randomize_bn_stats(model, 7)
    if name == "signal head":
        with torch.no_grad():
            model.bn.weight.abs_()
    x = _x(*shape)
    ep = torch.export.export(model, (x,))
    if decompose:
        ep = ep.run_decompositions()
    r = nf.fold_batchnorm(ep)  # one public function: it dispatches on the ExportedProgram
    assert isinstance(r.program, torch.export.ExportedProgram)
    with torch.no_grad():
        ref = model(x)
        out = r.program.module()(x)
    assert_outputs_close(out, ref, what=name)
    assert _bn_ops(r.program.module(), x) == _bn_ops(ep.module(), x) - len(r.changes)
    module_result = nf.fold_batchnorm(model, example_inputs=(x,))
    assert _records(r) == _records(module_result), (
        f"pt2: {[str(c) for c in r.changes]}\nmodule: {[str(c) for c in module_result.changes]}")
    assert {s.paths[0] for s in r.skipped} == {s.paths[0] for s in module_result.skipped}


def test_new_bias_is_a_parameter_of_the_program_and_survives_save_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ActBNConvs().eval()
    randomize_bn_stats(model, 1)
    x = _x(2, 3, 7, 7)
    ep = torch.export.export(model, (x,)).run_decompositions()
    r = fold_exported_program(ep)
    sig = r.program.graph_signature
    assert "c1.bias" in sig.parameters and "fc.bias" in sig.parameters
    assert not any(k.startswith(("bn.", "bn_fc.")) for k in r.program.state_dict)
    assert isinstance(r.program.state_dict["c1.bias"], nn.Parameter)
    assert any(n.target == torch.ops.aten.addmm.default for n in r.program.graph.nodes)  # mm became addmm
    path = tmp_path / "m.pt2"
    torch.export.save(r.program, path)
    back = torch.export.load(path)
    with torch.no_grad():
        assert_outputs_close(back.module()(x), model(x))


def test_input_program_is_untouched() -> None:
    torch.manual_seed(0)
    model = build_demo_model(1)
    x = _x(2, 3, 16, 16)
    ep = torch.export.export(model, (x,))
    before = {k: v.detach().clone() for k, v in ep.state_dict.items()}
    n_nodes = len(ep.graph.nodes)
    r = fold_exported_program(ep)
    assert r.changes
    assert len(ep.graph.nodes) == n_nodes and set(ep.state_dict) == set(before)
    assert all(torch.equal(ep.state_dict[k], v) for k, v in before.items())
    with torch.no_grad():
        assert_outputs_close(ep.module()(x), model(x))


def test_dynamic_batch_program_folds_and_runs_at_other_batch_sizes() -> None:
    torch.manual_seed(0)
    model = SignalHead().eval()
    randomize_bn_stats(model, 2)
    with torch.no_grad():
        model.bn.weight.abs_()
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(model, (_x(4, 3, 12),), dynamic_shapes=({0: batch},))
    r = fold_exported_program(ep)
    assert {c.action for c in r.changes} == {"fold_forward"}
    for n in (2, 7):
        x = _x(n, 3, 12, seed=n)
        with torch.no_grad():
            assert_outputs_close(r.program.module()(x), model(x))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.bn(x)))


def test_batchnorm_called_twice_is_skipped() -> None:
    model = Shared().eval()
    randomize_bn_stats(model, 0)
    x = _x(2, 3, 4, 4)
    r = fold_exported_program(torch.export.export(model, (x,)))
    assert not r.changes
    assert all("read by 2 ops" in s.reason and "called 2 times" in s.reason for s in r.skipped), r.skipped
    with torch.no_grad():
        assert_outputs_close(r.program.module()(x), model(x))


def test_training_mode_program_is_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    ep = torch.export.export(model, (_x(2, 3, 4, 4),))
    r = fold_exported_program(ep)
    assert not r.changes and "training mode" in r.skipped[0].reason


def test_zero_padding_consumer_reason() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)).eval()
    randomize_bn_stats(model, 0)
    r = fold_exported_program(torch.export.export(model, (_x(2, 3, 5, 5),)))
    reason = r.skipped[0].reason
    assert r.skipped[0].paths == ("2",) and "pads with zeros and v = mean - beta*sqrt(var+eps)/gamma != 0 on 4 of 4" \
        in reason and "tanh" in reason, reason


# ----------------------------------------------------------------------------------------------
# the command line


from tests.commands._cli import digest as _digest, run_cli as _run  # noqa: E402


def test_cli_fold_pt2_writes_a_folded_pt2(tmp_path: Path, capsys) -> None:
    model = build_demo_model(3)
    x = _x(4, 3, 32, 32)
    path = tmp_path / "demo.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    before = _digest(path)
    code, out, err = _run(["fold", str(path)], capsys)
    assert code == 0, err
    assert _digest(path) == before
    written = tmp_path / "demo.folded.pt2"
    assert written.exists() and "wrote" in out and "folded 5 BatchNorm layer(s), left 1 alone" in out
    folded = torch.export.load(written)
    with torch.no_grad():
        assert_outputs_close(folded.module()(x), model(x))
    assert _bn_ops(folded.module(), x) == 1


def test_cli_fold_pt2_bad_output_suffix_and_bad_shape(tmp_path: Path, capsys) -> None:
    path = tmp_path / "demo.pt2"
    torch.export.save(torch.export.export(build_demo_model(0), (_x(4, 3, 32, 32),)), path)
    code, _, err = _run(["fold", str(path), "-o", str(tmp_path / "out.pt")], capsys)
    assert code == 2 and "give the output a .pt2 suffix" in err and "Traceback" not in err
    code, _, err = _run(["fold", str(path), "--input-shape", "2,3,32,32"], capsys)
    assert code == 2 and "--input-shape" in err and "Traceback" not in err
    assert not (tmp_path / "demo.folded.pt2").exists()
