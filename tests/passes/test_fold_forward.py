"""Rule tests for forward folding and folding through channel-wise ops (normfold.passes.fold_batchnorm_forward).

Every test builds a small model whose BatchNorm the direct (backward) fold
cannot take, folds it with :func:`normfold.fold_batchnorm`, and checks the
structure (what was folded into what, or the reason it was not) AND the
outputs against the original model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import normfold as nf
from normfold.passes.fold_batchnorm_forward import FoldBatchNormForward
from normfold.tolerances import for_dtype
from tests.conftest import assert_models_close, assert_state_equal, randomize_bn_stats, run_counting, state_snapshot


def _x(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)


def fold(model: nn.Module, x: torch.Tensor, **kw) -> nf.PassResult:
    return nf.fold_batchnorm(model, example_inputs=(x,), **kw)


def changes_of(result: nf.PassResult, path: str) -> list[nf.Change]:
    return [c for c in result.changes if c.paths and c.paths[0] == path]


def reason_of(result: nf.PassResult, path: str) -> str:
    hits = [s.reason for s in result.skipped if s.paths and s.paths[0] == path]
    assert hits, f"{path} not skipped: {[str(s) for s in result.skipped]}; changes {[str(c) for c in result.changes]}"
    assert not changes_of(result, path)
    return hits[0]


def check_folded(model: nn.Module, x: torch.Tensor, path: str, action: str = "fold_forward", **kw) -> nf.PassResult:
    """``path`` folds with ``action``, its BatchNorm op is gone, outputs match the original."""
    r = fold(model, x, **kw)
    got = changes_of(r, path)
    assert got and got[0].action == action, (f"{path}: {[str(c) for c in r.changes]} / "
                                             f"{[str(s) for s in r.skipped]}")
    assert isinstance(r.module.get_submodule(path), nn.Identity)
    _, n0 = run_counting(model, (x,))
    _, n1 = run_counting(r.module, (x,))
    assert n1 == n0 - len(r.changes)
    assert_models_close(r.module, model, (x,), what=path)
    return r


def set_gamma(bn: nn.Module, pattern: str) -> None:
    """'random': randomize_bn_stats' signs; 'neg': all negative; 'zero': a third of the channels exactly 0."""
    with torch.no_grad():
        if pattern == "neg":
            bn.weight.copy_(-bn.weight.abs())
        elif pattern == "zero":
            bn.weight[::3] = 0.0


def zero_shift(bn: nn.Module) -> None:
    """beta = mean * gamma / sqrt(var + eps): the BatchNorm maps 0 to 0 (every border value v is 0)."""
    with torch.no_grad():
        bn.bias.copy_(bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))


# ----------------------------------------------------------------------------------------------
# forward into a Conv


class ActBNConv(nn.Module):
    """conv -> GELU -> BN -> conv: the BN cannot fold backward (an activation sits before it)."""

    def __init__(self, nd: int = 2, **conv_kw) -> None:
        super().__init__()
        Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]
        self.c0 = Conv(4, 6, 1)
        self.act = nn.GELU()
        self.bn = BN(6)
        self.c1 = Conv(6, 6, **conv_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c1(self.bn(self.act(self.c0(x))))


def _act_bn_conv(nd: int, gamma: str, seed: int = 0, **conv_kw) -> tuple[ActBNConv, torch.Tensor]:
    torch.manual_seed(seed)
    m = ActBNConv(nd, **conv_kw).eval()
    randomize_bn_stats(m, seed)
    set_gamma(m.bn, gamma)
    return m, _x(2, 4, *([7, 6, 5][:nd]), seed=seed)


UNPADDED = {
    "1x1": dict(kernel_size=1),
    "3x3 valid": dict(kernel_size=3),
    "stride 2": dict(kernel_size=3, stride=2),
    "dilation 2": dict(kernel_size=2, dilation=2),
    "groups 2": dict(kernel_size=3, groups=2, bias=False),
    "depthwise": dict(kernel_size=1, groups=6),
    "padding=valid": dict(kernel_size=3, padding="valid"),
    "reflect pad": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "replicate pad": dict(kernel_size=3, padding=2, padding_mode="replicate", groups=3, dilation=2),
    "circular pad": dict(kernel_size=3, padding=1, padding_mode="circular", stride=2),
}


@pytest.mark.parametrize("gamma", ["random", "neg", "zero"])
@pytest.mark.parametrize("cfg", list(UNPADDED))
def test_forward_into_conv_without_zero_padding(cfg: str, gamma: str) -> None:
    m, x = _act_bn_conv(2, gamma, **UNPADDED[cfg])
    r = check_folded(m, x, "bn")
    assert r.changes[-1].paths == ("bn", "c1")
    if m.c1.bias is None:  # the shift became a bias the conv did not have
        assert r.module.c1.bias is not None


@pytest.mark.parametrize("nd", [1, 3])
def test_forward_into_conv1d_and_conv3d(nd: int) -> None:
    m, x = _act_bn_conv(nd, "zero", kernel_size=2, stride=1, groups=2)
    check_folded(m, x, "bn")


@pytest.mark.parametrize("nd", [1, 2])
def test_zero_padding_consumer_is_skipped_with_the_border_values(nd: int) -> None:
    m, x = _act_bn_conv(nd, "random", kernel_size=3, padding=1)
    with torch.no_grad():  # make 2 of the 6 border values v exactly 0
        m.bn.bias[:2] = m.bn.running_mean[:2] * m.bn.weight[:2] / torch.sqrt(m.bn.running_var[:2] + m.bn.eps)
    r = fold(m, x)
    reason = reason_of(r, "bn")
    assert "consumer c1 (Conv" in reason and "pads with zeros" in reason
    assert "v = mean - beta*sqrt(var+eps)/gamma != 0 on 4 of 6 channels" in reason, reason
    assert "an activation (GELU)" in reason  # the backward reason is kept
    assert_models_close(r.module, m, (x,))


def test_padding_same_string_counts_as_zero_padding() -> None:
    m, x = _act_bn_conv(2, "random", kernel_size=3, padding="same")
    assert "pads with zeros" in reason_of(fold(m, x), "bn")


@pytest.mark.parametrize("gamma", ["random", "neg", "zero"])
def test_zero_padding_consumer_folds_when_every_border_value_is_zero(gamma: str) -> None:
    m, x = _act_bn_conv(2, gamma, kernel_size=3, padding=1, stride=2, groups=2)
    zero_shift(m.bn)
    check_folded(m, x, "bn")


def test_zero_gamma_with_nonzero_beta_is_counted_in_the_padding_reason() -> None:
    m, x = _act_bn_conv(2, "random", kernel_size=3, padding=1)
    zero_shift(m.bn)
    with torch.no_grad():
        m.bn.weight[0] = 0.0
        m.bn.bias[0] = 0.7  # gamma = 0: the BN outputs beta everywhere, no input maps to 0
    reason = reason_of(fold(m, x), "bn")
    assert "on 1 of 6 channels (1 of them have gamma = 0 and beta != 0)" in reason, reason


@pytest.mark.parametrize("zero_t", [False, True])
def test_conv_transpose_consumer_needs_zero_shift(zero_t: bool) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)).eval()
    randomize_bn_stats(m, 2)
    x = _x(2, 3, 5, 4)
    if zero_t:
        zero_shift(m[2])
        check_folded(m, x, "2")
    else:
        assert "spreads a constant unevenly" in reason_of(fold(m, x), "2")


# ----------------------------------------------------------------------------------------------
# forward into a Linear, through channel-wise ops


class SignalHead(nn.Module):
    """A 1-D signal classifier head: BN -> MaxPool1d -> permute -> reshape -> Linear (the Linear's columns)."""

    def __init__(self, pool: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm1d(8)
        self.pool = pool if pool is not None else nn.MaxPool1d(2)
        self.fc = nn.Linear(8 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.bn(self.act(self.conv(x)))).permute(0, 2, 1)
        return self.fc(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("gamma", ["pos", "zero"])
def test_maxpool_permute_reshape_into_linear_columns(gamma: str) -> None:
    torch.manual_seed(0)
    m = SignalHead().eval()
    randomize_bn_stats(m, 0)
    with torch.no_grad():
        m.bn.weight.abs_()
    set_gamma(m.bn, gamma)
    r = check_folded(m, _x(2, 3, 12), "bn")
    msg = r.changes[-1].message
    assert "forward into fc (Linear)" in msg and "MaxPool1d" in msg and "permute" in msg and "reshape" in msg


def test_maxpool_with_a_negative_gamma_is_skipped_with_the_count() -> None:
    torch.manual_seed(0)
    m = SignalHead().eval()
    randomize_bn_stats(m, 0)
    with torch.no_grad():
        m.bn.weight.abs_()
        m.bn.weight[[1, 5]] *= -1
    r = fold(m, _x(2, 3, 12))
    reason = reason_of(r, "bn")
    assert "pool (MaxPool1d)" in reason and "gamma < 0 on 2 of 8 channels" in reason, reason


@pytest.mark.parametrize("gamma", ["random", "neg"])
def test_avgpool_carries_any_sign(gamma: str) -> None:
    torch.manual_seed(0)
    m = SignalHead(nn.AvgPool1d(2)).eval()
    randomize_bn_stats(m, 0)
    set_gamma(m.bn, gamma)
    check_folded(m, _x(2, 3, 12), "bn")


def test_avgpool_counting_zero_padding_is_skipped_unless_the_shift_is_zero() -> None:
    torch.manual_seed(0)
    m = SignalHead(nn.AvgPool1d(2, padding=1)).eval()
    m.fc = nn.Linear(8 * 6, 4)
    randomize_bn_stats(m, 0)
    x = _x(2, 3, 12)
    assert "counts its zero padding" in reason_of(fold(m, x), "bn")
    m.pool.count_include_pad = False
    check_folded(m, x, "bn")


class PoolHead(nn.Module):
    """The classic classifier head after a post-activation BN: BN -> adaptive avg pool -> flatten -> dropout -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(F.relu(self.conv(x)))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def test_adaptive_avgpool_flatten_dropout_into_linear() -> None:
    torch.manual_seed(0)
    m = PoolHead().eval()
    randomize_bn_stats(m, 3)
    r = check_folded(m, _x(2, 3, 6, 5), "bn")
    assert r.module.fc.bias is not None  # W @ t became the bias


def test_dropout_in_training_mode_blocks() -> None:
    torch.manual_seed(0)
    m = PoolHead().eval()
    randomize_bn_stats(m, 3)
    m.drop.train()
    assert "drop (Dropout) is in training mode" in reason_of(fold(m, _x(2, 3, 6, 5)), "bn")


class FunctionalOps(nn.Module):
    """BN -> functional ops that carry the affine -> 1x1 conv."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.out = nn.Conv2d({"pixel_shuffle": 2, "pixel_unshuffle": 32}.get(op, 8), 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.tanh(self.conv(x)))
        if self.op == "nearest":
            y = F.interpolate(y, scale_factor=2, mode="nearest")
        elif self.op == "bilinear":
            y = F.interpolate(y, size=(5, 7), mode="bilinear", align_corners=False)
        elif self.op == "pixel_shuffle":
            y = F.pixel_shuffle(y, 2)
        elif self.op == "pixel_unshuffle":
            y = F.pixel_unshuffle(y, 2)
        elif self.op == "reflect_pad":
            y = F.pad(y, (1, 1, 2, 0), mode="reflect")
        elif self.op == "mean_keepdim":
            y = y.mean((2, 3), keepdim=True)
        elif self.op == "slice_flip":
            y = torch.flip(y[:, :, 1:, :-1], dims=(3,)).contiguous()
        elif self.op == "channels_last_roundtrip":
            y = y.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        return self.out(y)


@pytest.mark.parametrize("op", ["nearest", "bilinear", "pixel_unshuffle", "reflect_pad", "mean_keepdim", "slice_flip",
                                "channels_last_roundtrip"])
def test_functional_channel_wise_ops(op: str) -> None:
    torch.manual_seed(0)
    m = FunctionalOps(op).eval()
    randomize_bn_stats(m, 4)
    check_folded(m, _x(2, 3, 6, 6), "bn")


def test_pixel_shuffle_spreads_channels_and_is_skipped() -> None:
    # pixel_shuffle puts r*r BatchNorm channels into each output channel: no per-input-channel scale exists
    torch.manual_seed(0)
    m = FunctionalOps("pixel_shuffle").eval()
    randomize_bn_stats(m, 4)
    x = _x(2, 3, 6, 6)
    r = fold(m, x)
    assert "channels do not line up with the input channels of out (Conv2d)" in reason_of(r, "bn")
    assert_models_close(r.module, m, (x,))


def test_fan_out_folds_into_every_consumer() -> None:
    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3)
            self.bn = nn.BatchNorm2d(6)
            self.a = nn.Conv2d(6, 4, 1)
            self.b = nn.Conv2d(6, 2, 3, groups=2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.bn(F.silu(self.conv(x)))
            return self.a(y), self.b(y.view(y.shape))

    torch.manual_seed(0)
    m = Branches().eval()
    randomize_bn_stats(m, 5)
    r = check_folded(m, _x(2, 3, 7, 7), "bn")
    assert set(r.changes[-1].paths) == {"bn", "a", "b"}


def test_bn1d_on_3d_tensor_into_linear_is_skipped_axes_differ() -> None:
    # BatchNorm1d on (N, C, L) normalizes axis 1; a Linear on it mixes the last axis (L), not the channels.
    m = nn.Sequential(nn.Conv1d(3, 4, 1), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(6, 5)).eval()
    randomize_bn_stats(m, 0)
    x = _x(2, 3, 6)
    r = fold(m, x)
    assert "do not line up with the input channels of 3 (Linear)" in reason_of(r, "2")
    assert_models_close(r.module, m, (x,))


@pytest.mark.parametrize("blocker, fragment", [
    ("relu", "an activation (ReLU, l.3)"),
    ("add", "add"),
    ("output", "returned by the model"),
    ("twice", "called 2 times"),
])
def test_blocked_forward_names_the_op(blocker: str, fragment: str) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh(), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.l[2](self.l[1](self.l[0](x)))
            if blocker == "relu":
                return self.l[4](self.l[3](y))
            if blocker == "add":
                return self.l[4](y + 1.0)
            if blocker == "output":
                return self.l[4](y), y
            return self.l[4](self.l[4](y))

    m = M().eval()
    randomize_bn_stats(m, 0)
    x = _x(2, 3, 4, 4)
    r = fold(m, x)
    assert fragment in reason_of(r, "l.2"), reason_of(r, "l.2")
    assert_models_close(r.module, m, (x,))


def test_backward_is_preferred_when_both_are_possible() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval()
    randomize_bn_stats(m, 0)
    r = check_folded(m, _x(2, 3, 5, 5), "1", action="fold")
    assert r.changes[0].paths == ("1", "0")


def test_forward_off_keeps_the_direct_fold_only() -> None:
    m, x = _act_bn_conv(2, "random", kernel_size=1)
    r = fold(m, x, forward=False)
    assert "an activation (GELU)" in reason_of(r, "bn")


def test_timm_batchnormact_with_activation_cannot_fold_forward() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), BatchNormAct2d(4, act_layer=nn.ReLU), nn.Conv2d(4, 4, 1)).eval()
    randomize_bn_stats(m, 0)
    assert "ReLU runs inside BatchNormAct2d" in reason_of(fold(m, _x(2, 3, 4, 4)), "2")
    m[2] = BatchNormAct2d(4, apply_act=False)
    randomize_bn_stats(m.eval(), 0)
    check_folded(m, _x(2, 3, 4, 4), "2")


# ----------------------------------------------------------------------------------------------
# backward through ops


class LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: Linear on (B, N, C), BatchNorm1d over the flattened tokens."""

    def __init__(self, cin: int = 6, cout: int = 8, bias: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=bias)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


@pytest.mark.parametrize("bias", [False, True])
def test_levit_linear_norm_folds_into_the_linear_output_features(bias: bool) -> None:
    torch.manual_seed(0)
    m = LinearNorm(bias=bias).eval()
    randomize_bn_stats(m, 0)
    r = check_folded(m, _x(3, 5, 6), "bn", action="fold")
    assert r.changes[0].paths == ("bn", "linear") and "through" in r.changes[0].message


def test_linear_through_transpose_on_the_wrong_axis_is_skipped() -> None:
    class WrongAxis(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(6, 5)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4, 6) -> BN over the 4 tokens, not the features
            return torch.tanh(self.bn(self.linear(x)))

    m = WrongAxis().eval()
    randomize_bn_stats(m, 0)
    x = _x(2, 4, 6)
    r = fold(m, x)
    assert "BatchNorm" in reason_of(r, "bn")
    assert_models_close(r.module, m, (x,))


def test_conv_maxpool_bn_backward_through_the_pool() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    randomize_bn_stats(m, 0)
    x = _x(2, 3, 9, 8)
    with torch.no_grad():
        m[2].weight.abs_()
    r = check_folded(m, x, "2", action="fold")
    assert r.changes[0].paths == ("2", "0") and "MaxPool2d" in r.changes[0].message
    with torch.no_grad():
        m[2].weight[0] = -1.0
    reason = reason_of(fold(m, x), "2")
    assert "gamma < 0 on 1 of 4 channels" in reason and "forward: an activation (ReLU, 3)" in reason, reason


class MixedConv(nn.Module):
    """timm MixedConv2d's shape: split channels, one conv per split, cat, BatchNorm."""

    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.twice = twice
        self.c3 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.c5 = nn.Conv2d(2, 5, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(8 if not twice else 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [2, 2], dim=1)
        ya = self.c3(a)
        y = torch.cat([ya, ya], 1) if self.twice else torch.cat([ya, self.c5(b)], 1)
        return F.relu(self.bn(y))


def test_cat_splits_the_bn_between_its_producers() -> None:
    torch.manual_seed(0)
    m = MixedConv().eval()
    randomize_bn_stats(m, 0)
    r = check_folded(m, _x(2, 4, 6, 6), "bn", action="fold")
    assert r.changes[0].paths == ("bn", "c3", "c5")


def test_cat_of_one_tensor_twice_is_skipped() -> None:
    torch.manual_seed(0)
    m = MixedConv(twice=True).eval()
    randomize_bn_stats(m, 0)
    assert "concatenates the same tensor twice" in reason_of(fold(m, _x(2, 4, 6, 6)), "bn")


# ----------------------------------------------------------------------------------------------
# the pass contract


def test_inplace_false_leaves_the_input_and_train_flags_alone() -> None:
    m, x = _act_bn_conv(2, "random", kernel_size=1)
    m.c0.train()  # a mixed train/eval model comes back mixed
    snap = state_snapshot(m)
    flags = {n: mod.training for n, mod in m.named_modules()}
    r = fold(m, x)
    assert changes_of(r, "bn")
    assert_state_equal(m, snap)
    assert isinstance(m.bn, nn.BatchNorm2d)
    assert {n: mod.training for n, mod in r.module.named_modules()} == flags
    assert type(r.module) is ActBNConv


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype: torch.dtype) -> None:
    m, x = _act_bn_conv(2, "zero", kernel_size=3, groups=2)
    m = m.to(dtype)
    x = x.to(dtype)
    r = check_folded(m, x, "bn")
    assert r.module.c1.weight.dtype == dtype and r.module.c1.bias.dtype == dtype
    assert r.module.c1.weight.requires_grad


def test_standalone_pass_folds_direct_and_forward() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)).eval()
    randomize_bn_stats(m, 0)
    x = _x(2, 3, 5, 5)
    r = FoldBatchNormForward(example_inputs=(x,))(m)
    assert {c.paths[0]: c.action for c in r.changes} == {"1": "fold", "3": "fold_forward"}
    assert_models_close(r.module, m, (x,))


# ----------------------------------------------------------------------------------------------
# property: random chains between BN and its consumer never change the outputs


_OPS = ["identity", "dropout", "maxpool", "avgpool", "avgpool_pad", "flatten_unflatten", "permute_back", "nearest",
        "relu", "zero_pad"]


class Chain(nn.Module):
    def __init__(self, ops: list[str], consumer_pad: int, groups: int) -> None:
        super().__init__()
        self.ops = ops
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Conv2d(4, 4, 1 + 2 * consumer_pad, padding=consumer_pad, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.sigmoid(self.conv(x)))
        for op in self.ops:
            if op == "dropout":
                y = self.drop(y)
            elif op == "maxpool":
                y = F.max_pool2d(y, 2, 1, padding=1)
            elif op == "avgpool":
                y = F.avg_pool2d(y, 2, 1)
            elif op == "avgpool_pad":
                y = F.avg_pool2d(y, 3, 1, padding=1)
            elif op == "flatten_unflatten":
                y = y.flatten(2).unflatten(2, (y.shape[2], y.shape[3]))
            elif op == "permute_back":
                y = y.permute(0, 3, 2, 1).permute(0, 3, 2, 1)
            elif op == "nearest":
                y = F.interpolate(y, scale_factor=2)
            elif op == "relu":
                y = F.relu(y)
            elif op == "zero_pad":
                y = F.pad(y, (1, 0, 0, 1))
        return self.out(y)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.sampled_from(_OPS), max_size=3), consumer_pad=st.integers(0, 1),
       groups=st.sampled_from([1, 2, 4]), seed=st.integers(0, 10_000), zero_t=st.booleans())
def test_property_random_chains_never_change_outputs(ops, consumer_pad, groups, seed, zero_t) -> None:
    torch.manual_seed(seed)
    m = Chain(ops, consumer_pad, groups).eval()
    randomize_bn_stats(m, seed)
    if zero_t:
        zero_shift(m.bn)
    x = _x(2, 3, 5, 4, seed=seed)
    r = fold(m, x)
    assert r.changes or r.skipped
    assert_models_close(r.module, m, (x,), for_dtype(torch.float32))
    folded = bool(changes_of(r, "bn"))
    if "relu" in ops:
        assert not folded
    if not zero_t and (consumer_pad or "zero_pad" in ops or "avgpool_pad" in ops):
        assert not folded


# ----------------------------------------------------------------------------------------------
# a model torch.fx cannot trace: analysed on its torch.export graph, edited as modules


class ShapeBranching(nn.Module):
    """Control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.head = LinearNorm(6, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(torch.relu(self.conv(x)))
        if y.shape[-1] > 2:
            y = y.flatten(2).transpose(1, 2)  # (N, HW, C)
        return self.fc(torch.tanh(self.head(y)))


def test_untraceable_model_folds_through_torch_export() -> None:
    torch.manual_seed(0)
    m = ShapeBranching().eval()
    randomize_bn_stats(m, 6)
    x = _x(2, 3, 6, 6)
    r = fold(m, x)
    assert r.metrics.get("graph_source") == "export"
    got = {c.paths: c.action for c in r.changes}
    assert got == {("bn", "head.linear"): "fold_forward", ("head.bn", "head.linear"): "fold"}, r.changes
    assert all("torch.export" in c.message for c in r.changes)
    assert type(r.module) is ShapeBranching and isinstance(r.module.bn, nn.Identity)
    assert_models_close(r.module, m, (x,))
    assert run_counting(r.module, (x,))[1] == 0


# ----------------------------------------------------------------------------------------------
# the engine decides on structure before it computes a shape (issue 10)


class DenseLike(nn.Module):
    """DenseNet's pattern: features shared by later layers, cat -> BN -> ReLU -> conv, beside a plain conv -> BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 1)
        self.norm = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f0 = self.stem_bn(self.stem(x))
        f1 = self.c1(f0)
        return self.c2(self.relu(self.norm(torch.cat([f0, f1], 1)))) + f0


def test_blocked_batchnorms_are_refused_without_a_shape_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import normfold.graph as graph

    def no_shapes(*a, **k):
        raise AssertionError("a shape pass ran for BatchNorms that structure alone rules out")

    monkeypatch.setattr(graph, "_propagate_shapes", no_shapes)
    m = randomize_bn_stats(DenseLike(), 3).eval()
    x = _x(2, 3, 6, 6)
    r = fold(m, x)
    assert [c.paths for c in r.changes] == [("stem_bn", "stem")]
    reason = reason_of(r, "norm")
    assert "output has 3 users" in reason and "forward: an activation (ReLU, relu) reads it" in reason, reason
    monkeypatch.undo()
    assert_models_close(r.module, m, (x,))


def test_refusals_are_typed_and_name_the_blocking_node() -> None:
    from normfold.graph import build_graph
    from normfold.passes.fold.flow import walk_backward, walk_forward
    from normfold.passes.fold.fx_reader import ModuleReader
    from normfold.passes.fold.refusal import Refusal

    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4), nn.GELU(), nn.Conv2d(4, 2, 1)).eval()
    graph = build_graph(m, (_x(1, 3, 4, 4),), shapes=False)
    reader = ModuleReader(m, graph)
    bn = next(n for n in graph.fx_graph.nodes if n.op == "call_module" and n.target == "2")
    back = walk_backward(reader, bn, bn.args[0], 4)
    assert isinstance(back, Refusal) and back.node.target == "1"
    assert back.reason == "an activation (ReLU) sits between 0 (Conv2d) and the BatchNorm"
    fwd = walk_forward(reader, bn, lambda: pytest.fail("the index was computed before the blocker was seen"))
    assert isinstance(fwd, Refusal) and fwd.node.target == "3" and "an activation (GELU, 3)" in fwd.reason
