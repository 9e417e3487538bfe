"""What forward folding and folding through channel-wise ops add on real architectures.

For the zoo models where the new rules matter (benchmarks/fold_counts.py
measures every zoo model; these are the ones whose counts move), with random
weights and randomized BatchNorm statistics, in eval:

* batch_norm ops are counted as they RUN (ATen dispatch), before and after;
* normfold (default) folds at least as many as torch's fuse, strictly more than
  the direct fold alone, and the gain comes from the rule named here;
* the folded model matches the original; every op left has a reason;
* the ExportedProgram of the same model folds to the same records.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import normfold as nf
from tests.conftest import assert_outputs_close, load_benchmark, randomize_bn_stats, run_counting

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.zoo


def _count(model: nn.Module, x: tuple) -> tuple[torch.Tensor, int]:
    return run_counting(model, x)


# name -> (input size, rule whose count must grow, minimum of that count)
CASES = {
    "levit_128s": (224, "through", 46),   # LinearNorm: Linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as
    "mixnet_s": (32, "through", 30),      # MixedConv2d: split -> convs -> cat -> BatchNorm
}


def _gains(result: nf.PassResult) -> dict[str, int]:
    out = {"forward": 0, "through": 0, "ws": 0}
    for c in result.changes:
        if c.action == "fold_forward":
            out["forward"] += 1
        elif c.action == "bake":
            out["ws"] += 1
        elif c.details.get("through"):
            out["through"] += 1
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_new_rules_fold_more_than_fuse_and_the_direct_fold(name: str) -> None:
    size, rule, minimum = CASES[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False).eval()
    randomize_bn_stats(model, seed=1)
    x = (torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 + 0.5,)
    ref, n_ref = _count(model, x)

    _, n_fuse = _count(fuse(model), x)
    direct = nf.fold_batchnorm(model, example_inputs=x, forward=False, weight_standardization=False)
    _, n_direct = _count(direct.module, x)
    result = nf.fold_batchnorm(model, example_inputs=x)
    out, n_after = _count(result.module, x)

    folded, by_fuse, by_direct = n_ref - n_after, n_ref - n_fuse, n_ref - n_direct
    gains = _gains(result)
    print(f"\n{name}: batch_norm ops {n_ref}; fuse {by_fuse}, direct {by_direct}, normfold {folded} {gains}")
    assert_outputs_close(out, ref, what=name)
    assert folded == len(result.changes)
    assert folded >= by_fuse and folded > by_direct
    assert gains[rule] >= minimum, gains
    assert folded - by_direct == gains["forward"] + gains["through"] + gains["ws"]
    if n_after:
        assert result.skipped and all(s.reason for s in result.skipped)
    if name == "levit_128s":  # NormLinear heads: BatchNorm1d -> Dropout -> Linear on the pooled tokens
        forward = {c.paths for c in result.changes if c.action == "fold_forward"}
        assert forward == {("head.bn", "head.linear"), ("head_dist.bn", "head_dist.linear")}
        assert isinstance(result.module.head.bn, nn.Identity)


def test_mixnet_exported_program_folds_like_the_module() -> None:
    torch.manual_seed(0)
    model = timm.create_model("mixnet_s", pretrained=False).eval()
    randomize_bn_stats(model, seed=3)
    x = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, x, strict=False)
    pt2 = nf.fold_batchnorm(ep)
    module = nf.fold_batchnorm(model, example_inputs=x)
    assert {(c.action, c.paths) for c in pt2.changes} == {(c.action, c.paths) for c in module.changes}
    with torch.no_grad():
        assert_outputs_close(pt2.program.module()(*x), model(*x))


def test_fold_counts_script_counts_the_merge(capsys) -> None:
    """The README's zoo totals come from this script: its merge columns on a model that merges."""
    threads = torch.get_num_threads()
    try:
        code = load_benchmark("fold_counts").main(["--merge-only", "repvgg_a0"])
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    out = capsys.readouterr().out
    assert code == 0, out
    # BN ops 61: the fold alone leaves the 17 identity BatchNorms, the merge takes them and halves the convs
    row = next(line for line in out.splitlines() if line.startswith("| repvgg_a0 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3:7] == ["61", "-", "-", "44"] and cells[10] == "17", row
    assert cells[12:15] == ["61", "0", "44 / 22"], row
