"""fold_batchnorm(merge_branches=True): the folds, then the branch merge, as one pass list and one command.

The merge rules themselves are tested in test_merge_branches.py; here, what the wiring adds: one call
folds and merges, a BatchNorm the merge took is not reported as left alone, the .pt2 path merges too,
and `normfold fold --merge-branches` writes a safetensors file (merged blocks are nn.Sequentials) that
loads back with the same outputs and passes `normfold check`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import normfold as nf
from normfold.verify import compare
from tests.commands._cli import run_cli
from tests.conftest import assert_models_close
from tests.passes.test_merge_branches import MobileOneStyle, Net, RepVGGBlock, _bn_count, _conv_count, _prepare, _x


def _model() -> nn.Module:
    return _prepare(Net(RepVGGBlock(8, 8), RepVGGBlock(8, 8, stride=2), MobileOneStyle(8)))


def test_fold_then_merge_in_one_call_leaves_no_batchnorm_and_no_stale_skip():
    model = _model()
    x = _x(2, 3, 12, 12)
    plain = nf.fold_batchnorm(model, example_inputs=x)
    assert _bn_count(plain.module) > 0  # the identity BatchNorms: no conv to fold into
    assert any("identity" in p for s in plain.skipped for p in s.paths)

    r = nf.fold_batchnorm(model, example_inputs=x, merge_branches=True)
    assert_models_close(r.module, model, x, what="fold + merge")
    assert type(r.module) is Net and _bn_count(r.module) == 0
    assert _conv_count(r.module.body) == 3  # one conv per block
    merges = [c for c in r.changes if c.action == "merge_branches"]
    assert [c.details["block"] for c in merges] == ["body.0", "body.1", "body.2"]
    assert not r.skipped  # the identity BatchNorms the folds left were merged, not left alone
    assert _bn_count(model) > 0  # inplace=False: the input is untouched


def test_exported_program_folds_and_merges():
    """The .pt2 path merges too (tests/passes/test_merge_program.py tests it in full)."""
    model = _model()
    x = _x(1, 3, 12, 12)
    program = torch.export.export(model, x, strict=False)
    r = nf.fold_batchnorm(program, merge_branches=True)
    assert [c.details["block"] for c in r.changes if c.action == "merge_branches"] == ["body.0", "body.1", "body.2"]
    assert not r.skipped and nf.verify(model, r.program.module(), x).passed


def test_cli_fold_merge_branches_on_a_timm_state_dict_writes_safetensors_that_load_and_check(tmp_path: Path, capsys):
    """The README's command: `normfold fold model.pt --arch timm:mobileone_s0 --merge-branches -o model.safetensors`.

    Every merged block is an nn.Sequential (merge_modules), so the safe format writes it; the file
    loads back without unpickling and `normfold check --candidate` passes it against the original.
    """
    import timm

    from tests.conftest import randomize_bn_stats

    model = randomize_bn_stats(timm.create_model("mobileone_s0", pretrained=False), 0).eval()
    src = tmp_path / "model.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "model.safetensors"
    code, stdout, _ = run_cli(["fold", str(src), "--arch", "timm:mobileone_s0", "--merge-branches",
                               "--input-shape", "1,3,64,64", "-o", str(out), "-q"], capsys)
    assert code == 0, stdout
    last = stdout.strip().splitlines()[-1]
    assert "merged the branches of" in last and "left 0 alone" in last
    code, stdout, _ = run_cli(["check", str(src), "--arch", "timm:mobileone_s0", "--candidate", str(out),
                               "--input-shape", "1,3,64,64", "--no-export", "--no-probes", "-q"], capsys)
    assert code == 0, stdout
    back = nf.load(out, arch="timm:mobileone_s0")
    assert not any(isinstance(m, (nn.BatchNorm2d, torch.fx.GraphModule)) for m in back.modules())
    assert "stem.merged_conv.weight" in back.state_dict()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = model(x), back(x)
    assert compare(ref, got).passed  # the one rule every command judges by
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0  # the user's model is untouched
