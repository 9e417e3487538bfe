"""fold_batchnorm + merge_branches on timm's re-parameterizable architectures, beside timm's own method.

For the smallest model of each Rep* family in timm (random weights, BatchNorm statistics and
affine parameters randomized, eval): ``fold_batchnorm(merge_branches=True)`` (the folds, then the
branch merge) leaves no more batch_norm ops running than ``timm.utils.model.reparameterize_model``
(counted as they run, at ATen dispatch), fewer where timm leaves some, and no more convolutions,
and the result matches the original model within the float32 tolerance.
``benchmarks/reparameterize.py`` measures the rest of the families and the latency.
"""

from __future__ import annotations

import pytest
import torch

import normfold as nf
from normfold.passes.merge_branches import PASS_NAME as MERGE_PASS
from tests.conftest import assert_outputs_close, load_benchmark, randomize_bn_stats, run_counting_ops

timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # noqa: E402

pytestmark = pytest.mark.zoo


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050"])
def test_fold_and_merge_leave_no_more_than_timm(name: str):
    torch.manual_seed(0)
    model = randomize_bn_stats(timm.create_model(name, pretrained=False)).eval()
    x = (torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)
    reference, _, _ = run_counting_ops(model, x)
    _, timm_bn, timm_conv = run_counting_ops(reparameterize_model(model), x)

    result = nf.fold_batchnorm(model, merge_branches=True)
    out, ours_bn, ours_conv = run_counting_ops(result.module, x)

    assert type(result.module) is type(model)
    assert any(c.pass_name == MERGE_PASS for c in result.changes), "no block merged"
    assert ours_bn <= timm_bn, [str(s) for s in result.skipped]
    if timm_bn:  # fastvit's conv-BN pairs outside the Rep blocks, RepGhost's primary convs: folded here
        assert ours_bn < timm_bn
    assert ours_conv <= timm_conv
    assert_outputs_close(out, reference, what=f"{name} folded + merged")


def test_reparameterize_benchmark_runs_its_table(capsys) -> None:
    """The README's latency table comes from benchmarks/reparameterize.py: one small run of it."""
    threads = torch.get_num_threads()
    try:
        code = load_benchmark("reparameterize").main(["repvgg_a0", "--runs", "3", "--fold-runs", "1", "--size", "32"])
    finally:
        torch.set_num_threads(threads)  # the script sets its own
    out = capsys.readouterr().out
    assert code == 0, out  # 1: more BatchNorms or convs than timm, or an error above the tolerance
    row = next(line for line in out.splitlines() if line.startswith("| repvgg_a0 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "32" and cells[7:9] == ["44 / 44 / 22 / 22", "61 / 17 / 0 / 0"], row
    assert float(cells[6].split()[0]) > 0, row  # the median paired ratio
