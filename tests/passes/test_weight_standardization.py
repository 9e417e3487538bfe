"""Weight standardization (timm StdConv2d / ScaledStdConv2d) baked into plain conv weights, then BatchNorm folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normfold as nf
from normfold.passes.weight_standardization import fold_weight_standardization, standardized_weight
from normfold.verify import compare
from tests.conftest import assert_models_close, assert_state_equal, randomize_bn_stats, run_counting, state_snapshot

timm = pytest.importorskip("timm")
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame  # noqa: E402

WS = {
    "StdConv2d": lambda: StdConv2d(4, 6, 3, stride=2, groups=2, eps=1e-8),
    "StdConv2d bias": lambda: StdConv2d(4, 6, 3, padding=1, bias=True),
    "StdConv2dSame dynamic": lambda: StdConv2dSame(4, 6, 3, stride=2),
    "ScaledStdConv2d": lambda: ScaledStdConv2d(4, 6, 3, gamma=1.7, gain_init=0.5),
    "ScaledStdConv2dSame": lambda: ScaledStdConv2dSame(4, 6, 3, stride=2, dilation=1),
}


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 2 + 0.5


def _ws_model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    conv = WS[kind]()
    with torch.no_grad():
        conv.weight.mul_(3).add_(0.2)  # far from standardized already
        if hasattr(conv, "gain"):
            conv.gain.uniform_(-1.5, 1.5)
    return nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU()).eval()


@pytest.mark.parametrize("kind", list(WS))
def test_bake_replaces_the_conv_and_keeps_outputs(kind: str) -> None:
    m = _ws_model(kind)
    randomize_bn_stats(m, 1)
    x = _x(2, 4, 9, 8)
    r = fold_weight_standardization(m)
    assert [c.action for c in r.changes] == ["bake"] and r.changes[0].paths == ("0",)
    new = r.module[0]
    expected = Conv2dSame if getattr(m[0], "same_pad", False) else nn.Conv2d
    assert type(new) is expected
    # the float64 standardization, judged as float32 (the lower precision of the two): the policy's rule
    v = compare(standardized_weight(m[0]), new.weight)
    assert v.passed, v.describe()
    assert_models_close(r.module, m, (x,))
    # one batch_norm op (the standardization) is gone, the BatchNorm2d is still there
    assert run_counting(m, (x,))[1] - run_counting(r.module, (x,))[1] == 1


@pytest.mark.parametrize("kind", ["StdConv2d", "ScaledStdConv2dSame"])
def test_fold_batchnorm_bakes_then_folds_the_batchnorm_after(kind: str) -> None:
    m = _ws_model(kind)
    randomize_bn_stats(m, 2)
    x = _x(2, 4, 9, 8)
    r = nf.fold_batchnorm(m, example_inputs=(x,))
    assert [(c.action, c.paths) for c in r.changes] == [("bake", ("0",)), ("fold", ("1", "0"))]
    assert run_counting(r.module, (x,))[1] == 0
    assert_models_close(r.module, m, (x,))
    off = nf.fold_batchnorm(m, example_inputs=(x,), weight_standardization=False)
    assert not off.changes and "overrides forward()" in off.skipped[0].reason


def test_training_mode_is_skipped_and_input_untouched() -> None:
    m = _ws_model("StdConv2d")
    m[0].train()
    snap = state_snapshot(m)
    r = fold_weight_standardization(m)
    assert not r.changes and "training mode" in r.skipped[0].reason
    assert_state_equal(m, snap)
    assert type(r.module[0]) is StdConv2d and r.module[0].training and not r.module[1].training


def test_shared_weight_is_skipped() -> None:
    m = _ws_model("StdConv2d")
    twin = StdConv2d(4, 6, 3, stride=2, groups=2).eval()
    twin.weight = m[0].weight
    m.append(twin)  # registered (shares the parameter), not called
    r = fold_weight_standardization(m)
    assert not r.changes and all("shared" in s.reason for s in r.skipped)


def test_bias_parameter_is_kept_and_grad_flags_follow() -> None:
    m = _ws_model("StdConv2d bias")
    m[0].weight.requires_grad_(False)
    bias = m[0].bias
    r = fold_weight_standardization(m, inplace=True)
    assert r.module[0].bias is bias
    assert not r.module[0].weight.requires_grad
    assert r.module is m


def test_timm_resnetv2_block_all_batchnorm_ops_go() -> None:
    # a BiT-style stem + pre-activation block: StdConv2d everywhere, GroupNorm (not folded), no BatchNorm
    from functools import partial

    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import PreActBottleneck

    torch.manual_seed(0)
    block = PreActBottleneck(16, 16, conv_layer=StdConv2d, norm_layer=partial(GroupNormAct, num_groups=2)).eval()
    x = _x(2, 16, 6, 6)
    n0 = run_counting(block, (x,))[1]
    r = nf.fold_batchnorm(block, example_inputs=(x,))
    assert n0 == 3 and run_counting(r.module, (x,))[1] == 0
    assert len(r.changes) == 3 and all(c.action == "bake" for c in r.changes)
    assert_models_close(r.module, block, (x,))
