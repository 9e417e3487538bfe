"""fold_batchnorm + merge_branches on timm's re-parameterizable architectures, beside timm's own method.

For the smallest model of each Rep* family in timm (random weights, BatchNorm statistics and
affine parameters randomized, eval): normfold's fold followed by the branch merge leaves no
more batch_norm ops running than ``timm.utils.model.reparameterize_model`` (counted as they run,
at ATen dispatch) and no more convolutions, and the result matches the original model within
the float32 tolerance. ``benchmarks/reparameterize.py`` measures the rest of the families and
the latency.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import normfold as nf
from normfold.passes.merge_branches import merge_branches
from tests.conftest import assert_outputs_close, randomize_bn_stats, run_counting

timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # noqa: E402

pytestmark = pytest.mark.zoo


class _ConvCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is torch.ops.aten.convolution.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _convs(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), _ConvCounter() as counter:
        model(x)
    return counter.count


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050"])
def test_fold_and_merge_leave_no_more_than_timm(name: str):
    torch.manual_seed(0)
    model = randomize_bn_stats(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference, _ = run_counting(model, (x,))
    theirs = reparameterize_model(model)
    _, timm_bn = run_counting(theirs, (x,))

    folded = nf.fold_batchnorm(model)
    merged = merge_branches(folded.module)
    out, ours_bn = run_counting(merged.module, (x,))

    assert type(merged.module) is type(model)
    assert merged.changes, "no block merged"
    assert ours_bn <= timm_bn, [str(s) for s in folded.skipped + merged.skipped]
    assert _convs(merged.module, x) <= _convs(theirs, x)
    assert_outputs_close(out, reference, what=f"{name} folded + merged")
