"""Rule tests for normfold.fold_batchnorm on small hand-built models.

Every test checks the structure (what became nn.Identity, which conv got a
bias, that the user's own class comes back) AND the outputs against the
original model; every skip asserts its reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

import normfold as nf
from tests.conftest import (BatchNormOpCounter, assert_models_close, assert_outputs_close, assert_state_equal,
                      randomize_bn_stats, run_counting, run_eval, state_snapshot)
from normfold.errors import TraceError
from normfold.passes.fold_batchnorm import FoldBatchNorm
from normfold.tolerances import for_dtype
from normfold.verify import compare


class ProducerBN(nn.Module):
    """The user's own class: a producer followed by a BatchNorm."""

    def __init__(self, producer: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.producer = producer
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.producer(x))


# kind -> (factory(cin, cout, groups, bias), BatchNorm class, input shape (N, cin, ...))
PRODUCERS = {
    "conv1d": (lambda ci, co, g, b: nn.Conv1d(ci, co, 3, groups=g, bias=b, padding=1), nn.BatchNorm1d, (2, 4, 9)),
    "conv2d": (lambda ci, co, g, b: nn.Conv2d(ci, co, 3, groups=g, bias=b), nn.BatchNorm2d, (2, 4, 7, 6)),
    "conv3d": (lambda ci, co, g, b: nn.Conv3d(ci, co, 2, groups=g, bias=b), nn.BatchNorm3d, (2, 4, 4, 5, 3)),
    "convtranspose1d": (lambda ci, co, g, b: nn.ConvTranspose1d(ci, co, 3, groups=g, bias=b, stride=2),
                        nn.BatchNorm1d, (2, 4, 5)),
    "convtranspose2d": (lambda ci, co, g, b: nn.ConvTranspose2d(ci, co, 3, groups=g, bias=b, stride=2, padding=1,
                                                                output_padding=1), nn.BatchNorm2d, (2, 4, 4, 3)),
    "convtranspose3d": (lambda ci, co, g, b: nn.ConvTranspose3d(ci, co, 2, groups=g, bias=b), nn.BatchNorm3d,
                        (2, 4, 3, 2, 3)),
    "linear": (lambda ci, co, g, b: nn.Linear(ci, co, bias=b), nn.BatchNorm1d, (5, 4)),
}
COUT = 6  # with groups=2 and cin=4: 2 input and 3 output channels per group, so axis mix-ups show


def make_model(kind: str, *, bias: bool = True, groups: int = 1, affine: bool = True,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[ProducerBN, torch.Tensor]:
    factory, bn_cls, shape = PRODUCERS[kind]
    torch.manual_seed(seed)
    model = ProducerBN(factory(shape[1], COUT, groups, bias), bn_cls(COUT, affine=affine))
    randomize_bn_stats(model, seed)
    model = model.to(dtype).eval()
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) * 2 + 0.5).to(dtype)
    return model, x


def fold(model: nn.Module, x: torch.Tensor | tuple, **kw) -> nf.PassResult:
    return nf.fold_batchnorm(model, example_inputs=x if isinstance(x, tuple) else (x,), **kw)


def skip_reasons(result: nf.PassResult) -> str:
    return " | ".join(str(s) for s in result.skipped)


def assert_skipped(result: nf.PassResult, path: str, *fragments: str) -> None:
    """``path`` was skipped, with a reason containing every fragment, and nothing was folded."""
    hits = [s for s in result.skipped if path in s.paths]
    assert hits, f"{path} not in skipped: {skip_reasons(result)}"
    reason = " ".join(s.reason for s in hits)
    for frag in fragments:
        assert frag.lower() in reason.lower(), f"reason {reason!r} lacks {frag!r}"
    assert not any(path in c.paths for c in result.changes)


# ----------------------------------------------------------------------------------------------
# the main grid: producer kind x bias x groups x affine x dtype

GRID = [(k, b, g, a, d) for k in PRODUCERS for b in (True, False) for g in ((1,) if k == "linear" else (1, 2))
        for a in (True, False) for d in (torch.float32, torch.float64, torch.bfloat16)]


@pytest.mark.parametrize("kind,bias,groups,affine,dtype", GRID,
                         ids=[f"{k}-{'bias' if b else 'nobias'}-g{g}-{'affine' if a else 'noaffine'}-{str(d)[6:]}"
                              for k, b, g, a, d in GRID])
def test_fold_grid(kind: str, bias: bool, groups: int, affine: bool, dtype: torch.dtype) -> None:
    model, x = make_model(kind, bias=bias, groups=groups, affine=affine, dtype=dtype)
    before = state_snapshot(model)
    result = fold(model, x)

    assert [c.paths for c in result.changes] == [("bn", "producer")], skip_reasons(result)
    assert not result.skipped
    out = result.module
    assert type(out) is ProducerBN and out is not model
    assert isinstance(out.bn, nn.Identity)
    assert out.producer.bias is not None and out.producer.bias.dtype == dtype
    assert out.producer.weight.dtype == dtype
    assert out.producer.bias.requires_grad and out.producer.weight.requires_grad
    assert_state_equal(model, before)  # inplace=False: the caller's model is untouched
    assert isinstance(model.bn, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d)
    assert_models_close(out, model, (x,), for_dtype(dtype), what=f"{kind} {dtype}")


def test_grouped_convtranspose_scales_within_each_group() -> None:
    """Weight axis 1 carries the output channel within each group: check the folded weight directly."""
    model, x = make_model("convtranspose2d", groups=2, bias=False)
    bn = model.bn
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    w = model.producer.weight.detach().double()  # (cin=4, cout/g=3, k, k)
    expected = w.clone()
    for g in range(2):
        expected[2 * g:2 * g + 2] *= s[3 * g:3 * g + 3].view(1, 3, 1, 1)
    folded = fold(model, x).module.producer.weight.detach()
    # float64 expectations against the float32 weight: judged by the float32 policy (normfold.verify's rule)
    v = compare(expected, folded)
    assert v.passed, v.describe()
    # ignoring the groups (the first group's scale on every row) would be wrong
    assert not compare(w * s[:3].view(1, 3, 1, 1), folded).passed


@pytest.mark.parametrize("conf", [
    dict(padding_mode="reflect", padding=1), dict(padding_mode="replicate", padding=2),
    dict(padding_mode="circular", padding=1), dict(stride=2, padding=1), dict(dilation=2, padding=2),
    dict(padding="same", dilation=2), dict(stride=(2, 1), dilation=(1, 3), groups=2, padding=(0, 1)),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fold_conv_padding_stride_dilation(conf: dict) -> None:
    torch.manual_seed(0)
    model = randomize_bn_stats(ProducerBN(nn.Conv2d(4, 6, 3, **conf), nn.BatchNorm2d(6)), 3).eval()
    x = torch.randn(2, 4, 9, 8)
    result = fold(model, x)
    assert isinstance(result.module.bn, nn.Identity), skip_reasons(result)
    assert_models_close(result.module, model, (x,))


# ----------------------------------------------------------------------------------------------
# BatchNorm kinds


def _conv_then(bn: nn.Module, cin: int = 3, cout: int = 6) -> ProducerBN:
    torch.manual_seed(0)
    return randomize_bn_stats(ProducerBN(nn.Conv2d(cin, cout, 3, bias=False), bn), 5).eval()


X2D = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 + 0.5


def test_syncbatchnorm_in_eval_folds() -> None:
    model = _conv_then(nn.SyncBatchNorm(6))
    result = fold(model, X2D)
    assert isinstance(result.module.bn, nn.Identity), skip_reasons(result)
    assert_models_close(result.module, model, (X2D,))


def test_batchnorm_subclass_without_forward_folds() -> None:
    class MyBN(nn.BatchNorm2d):
        """Adds nothing to forward: exactly a BatchNorm2d."""

        def extra_repr(self) -> str:
            return "mine"

    model = _conv_then(MyBN(6))
    result = fold(model, X2D)
    assert isinstance(result.module.bn, nn.Identity), skip_reasons(result)
    assert_models_close(result.module, model, (X2D,))


def test_batchnorm_subclass_with_own_forward_is_skipped() -> None:
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2 + 1

    model = _conv_then(ScaledBN(6))
    before = state_snapshot(model)
    result = fold(model, X2D)
    assert_skipped(result, "bn", "ScaledBN", "own forward")
    assert isinstance(result.module.bn, ScaledBN) and not result.modified
    assert_state_equal(result.module, before)
    assert_models_close(result.module, model, (X2D,))


def test_timm_batchnormact2d_folds_keeping_act_and_drop() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    bn = timm_layers.BatchNormAct2d(6, act_layer=nn.ReLU6, drop_layer=nn.Dropout)
    model = _conv_then(bn)
    result = fold(model, X2D)
    assert [c.paths for c in result.changes] == [("bn", "producer")], skip_reasons(result)
    remnant = result.module.bn
    assert isinstance(remnant, nn.Sequential)
    assert [type(m) for m in remnant] == [nn.Dropout, nn.ReLU6]
    assert_models_close(result.module, model, (X2D,))
    # act only (no drop): the act itself remains
    model = _conv_then(timm_layers.BatchNormAct2d(6, act_layer=nn.SiLU))
    result = fold(model, X2D)
    assert isinstance(result.module.bn, nn.SiLU)
    assert_models_close(result.module, model, (X2D,))


def test_torchvision_frozen_batchnorm_folds() -> None:
    misc = pytest.importorskip("torchvision.ops.misc")
    model = _conv_then(misc.FrozenBatchNorm2d(6))
    assert model.bn.running_var.min() != 1  # randomized
    result = fold(model, X2D)
    assert isinstance(result.module.bn, nn.Identity), skip_reasons(result)
    assert_models_close(result.module, model, (X2D,))


class FunctionalBN(nn.Module):
    """A conv followed by F.batch_norm with constant running statistics held in buffers."""

    def __init__(self, training: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 5, 3)
        g = torch.Generator().manual_seed(2)
        self.register_buffer("mean", torch.rand(5, generator=g) - 0.5)
        self.register_buffer("var", torch.rand(5, generator=g) + 0.5)
        self.weight = nn.Parameter(torch.rand(5, generator=g) + 0.5)
        self.bias = nn.Parameter(torch.rand(5, generator=g) - 0.5)
        self.bn_training = training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.relu(F.batch_norm(y, self.mean, self.var, self.weight, self.bias, self.bn_training, 0.1, 1e-3))


def test_functional_batch_norm_folds_into_graph_module() -> None:
    model = FunctionalBN().eval()
    result = fold(model, X2D)
    assert result.modified, skip_reasons(result)
    assert isinstance(result.module, torch.fx.GraphModule)
    _, n_before = run_counting(model, (X2D,))
    _, n_after = run_counting(result.module, (X2D,))
    assert (n_before, n_after) == (1, 0)
    assert_models_close(result.module, model, (X2D,))


def test_functional_batch_norm_in_training_is_skipped() -> None:
    model = FunctionalBN(training=True).eval()
    result = fold(model, X2D)
    assert not result.modified
    assert "training=True" in skip_reasons(result)
    assert type(result.module) is FunctionalBN


# ----------------------------------------------------------------------------------------------
# Linear -> BatchNorm1d: (N, C) folds, (N, C, L) must not


def test_linear_bn1d_on_2d_input_folds() -> None:
    model, x = make_model("linear")
    result = fold(model, x)
    assert isinstance(result.module.bn, nn.Identity), skip_reasons(result)
    assert_models_close(result.module, model, (x,))


def test_linear_bn1d_on_2d_input_folds_with_inferred_shape() -> None:
    model, x = make_model("linear")
    result = nf.fold_batchnorm(model)  # no example_inputs: the rank is inferred from the first layer
    assert isinstance(result.module.bn, nn.Identity), skip_reasons(result)
    assert_models_close(result.module, model, (x,))


@pytest.mark.parametrize("features", [5, 7], ids=["sizes-match", "sizes-differ"])
def test_linear_bn1d_on_3d_input_is_skipped(features: int) -> None:
    """BatchNorm1d on (N, C, L) normalizes axis 1; the Linear writes the last axis.

    With L == C (features=5) a fold along the Linear's features would run without
    an error and be silently wrong: torch.fx's fuse does exactly that.
    """
    torch.manual_seed(0)
    model = randomize_bn_stats(ProducerBN(nn.Linear(6, features), nn.BatchNorm1d(5)), 1).eval()
    x = torch.randn(3, 5, 6)
    result = fold(model, x)
    if features == 5:
        assert_skipped(result, "bn", "axis 1", "last axis")
        fused = fuse(model)
        err = (run_eval(fused, (x,)) - run_eval(model, (x,))).abs().max()
        assert err > 1e-2, "fuse folds along the wrong axis here; this test documents it"
    else:
        assert_skipped(result, "bn", "channel mismatch")
    assert isinstance(result.module.bn, nn.BatchNorm1d)
    assert_models_close(result.module, model, (x,))


def test_linear_bn1d_without_shapes_is_skipped_with_what_to_pass() -> None:
    model, x = make_model("linear")
    result = FoldBatchNorm()(model)  # no inputs, no inference
    assert_skipped(result, "bn", "example_inputs")


# ----------------------------------------------------------------------------------------------
# skip cases


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ProducerTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class BNTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv1(x)) * self.bn(self.conv2(x))


class ActBetween(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.act = nn.ReLU()
        self.functional = functional
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(F.gelu(y) if self.functional else self.act(y))


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.other = nn.Conv2d(3, 3, 3, padding=1)
        self.other.weight = self.conv.weight
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.other(x)


class ParamReadElsewhere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv.weight.sum()


SKIPS = {
    "producer-output-two-users": (TwoUsers, "bn", ("2 users",)),
    "producer-called-twice": (ProducerTwice, "bn", ("called 2 times",)),
    "bn-called-twice": (BNTwice, "bn", ("called 2 times",)),
    "activation-module-between": (lambda: ActBetween(False), "bn", ("activation", "ReLU")),
    "activation-function-between": (lambda: ActBetween(True), "bn", ("activation", "gelu")),
    "tied-weights": (TiedWeights, "bn", ("shared with", "other")),
    "producer-param-read-elsewhere": (ParamReadElsewhere, "bn", ("read elsewhere",)),
}


@pytest.mark.parametrize("name", list(SKIPS))
def test_skip_cases(name: str) -> None:
    factory, path, fragments = SKIPS[name]
    torch.manual_seed(0)
    model = randomize_bn_stats(factory(), 2).eval()
    x = torch.randn(2, 3, 6, 6)
    before = state_snapshot(model)
    result = fold(model, x)
    assert_skipped(result, path, *fragments)
    assert not result.modified
    assert type(result.module) is type(model)
    assert_state_equal(result.module, before)
    assert_models_close(result.module, model, (x,))


def test_skip_bn_in_training_mode_and_flags_come_back() -> None:
    model, x = make_model("conv2d")
    model.bn.train()
    result = fold(model, x)
    assert_skipped(result, "bn", "training mode", "eval()")
    assert result.module.bn.training and not result.module.training and not result.module.producer.training


def test_skip_track_running_stats_false() -> None:
    torch.manual_seed(0)
    model = ProducerBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    result = fold(model, X2D)
    assert_skipped(result, "bn", "track_running_stats=False")
    assert_models_close(result.module, model, (X2D,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_skip_fold_that_would_overflow(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = ProducerBN(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    big = {torch.float16: 6e4, torch.bfloat16: 3e38}[dtype]
    with torch.no_grad():
        model.producer.weight.fill_(0.5)
        model.producer.weight[0, 0, 0, 0] = 100.0
        model.bn.running_var.fill_(0.0)
        model.bn.weight.fill_(1.0)
        model.bn.weight[0] = big / 100.0  # scale = big/100/sqrt(eps): the folded 100 overflows
    model = model.to(dtype).eval()
    assert torch.isfinite(model.bn.weight).all()
    before = state_snapshot(model)
    result = nf.fold_batchnorm(model, example_inputs=(X2D.to(dtype),))
    assert_skipped(result, "bn", "overflow", str(dtype).replace("torch.", ""))
    assert_state_equal(result.module, before)


def test_non_finite_statistics_are_skipped() -> None:
    model, x = make_model("conv2d")
    with torch.no_grad():
        model.bn.running_var[1] = -1.0  # var + eps < 0: sqrt is NaN
    result = fold(model, x)
    assert_skipped(result, "bn", "not finite")


def test_bn_not_called_is_reported() -> None:
    class Unused(ProducerBN):
        def __init__(self):
            super().__init__(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            self.spare = nn.BatchNorm2d(4)

    model = randomize_bn_stats(Unused(), 0).eval()
    result = fold(model, X2D)
    assert_skipped(result, "spare", "not called")
    assert isinstance(result.module.bn, nn.Identity)
    assert_models_close(result.module, model, (X2D,))


# ----------------------------------------------------------------------------------------------
# contract: inplace, dtype/device/requires_grad, train/eval flags


def test_inplace_true_edits_the_model_itself() -> None:
    model, x = make_model("conv2d", bias=False)
    expected = run_eval(model, (x,))
    result = fold(model, x, inplace=True)
    assert result.module is model
    assert isinstance(model.bn, nn.Identity) and model.producer.bias is not None
    assert_outputs_close(run_eval(model, (x,)), expected)


def test_inplace_false_leaves_model_untouched() -> None:
    model, x = make_model("convtranspose2d", groups=2, bias=False)
    before = state_snapshot(model)
    params_before = {n: p for n, p in model.named_parameters()}
    result = fold(model, x)
    assert result.module is not model
    assert_state_equal(model, before)
    assert model.producer.bias is None and isinstance(model.bn, nn.BatchNorm2d)
    assert {n: p for n, p in model.named_parameters()} == params_before
    assert all(p is not q for p, q in zip(model.parameters(), result.module.parameters()))


def test_requires_grad_dtype_and_device_are_kept() -> None:
    model, x = make_model("conv2d", bias=True, dtype=torch.float64)
    model.producer.weight.requires_grad_(False)
    result = fold(model, x)
    conv = result.module.producer
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    assert conv.weight.dtype == torch.float64 and conv.bias.dtype == torch.float64
    assert conv.weight.device == model.producer.weight.device
    # a bias created by the fold takes the weight's requires_grad
    model, x = make_model("conv2d", bias=False)
    model.producer.weight.requires_grad_(False)
    conv = fold(model, x).module.producer
    assert isinstance(conv.bias, nn.Parameter) and not conv.bias.requires_grad


def test_train_eval_flags_come_back_as_given() -> None:
    model, x = make_model("conv2d")
    model.eval()
    model.producer.train()  # a conv's flag does not matter to the fold, but must come back
    flags = {n: m.training for n, m in model.named_modules()}
    result = fold(model, x)
    assert isinstance(result.module.bn, nn.Identity)
    assert {n: m.training for n, m in result.module.named_modules()} == flags
    assert {n: m.training for n, m in model.named_modules()} == flags
    # a model in train mode: every BN skipped, still in train mode afterwards
    model.train()
    result = fold(model, x, inplace=True)
    assert_skipped(result, "bn", "training mode")
    assert all(m.training for m in model.modules())


def test_result_records() -> None:
    model, x = make_model("conv2d")
    result = fold(model, x)
    (change,) = result.changes
    assert change.pass_name == "fold_batchnorm" and change.action == "fold"
    assert "bn" in change.message and "producer" in change.message
    d = result.to_dict()
    assert d["modified"] is True and d["changes"][0]["paths"] == ["bn", "producer"]


# ----------------------------------------------------------------------------------------------
# models torch.fx cannot trace: the torch.export fallback


class ShapeBranch(nn.Module):
    """Shape-dependent control flow: torch.fx symbolic tracing fails on ``if x.shape[-1] > 2``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if x.shape[-1] > 2:
            y = F.relu(y)
        return self.bn2(self.head(y))


def test_untraceable_model_folds_through_torch_export() -> None:
    model = randomize_bn_stats(ShapeBranch(), 4).eval()
    result = fold(model, X2D)
    assert result.metrics["graph_source"] == "export"
    assert {c.paths for c in result.changes} == {("bn", "conv"), ("bn2", "head")}, skip_reasons(result)
    assert type(result.module) is ShapeBranch
    assert_models_close(result.module, model, (X2D,))


def test_untraceable_model_without_example_inputs_says_what_to_pass() -> None:
    model = ShapeBranch().eval()
    with pytest.raises(TraceError, match="example_inputs"):
        FoldBatchNorm()(model)

    class TwoInputs(ShapeBranch):
        def forward(self, x, scale):  # nothing to infer an input from
            return super().forward(x) * scale

    with pytest.raises(TraceError, match=r"pass example_inputs \(or --input-shape\)"):
        nf.fold_batchnorm(TwoInputs().eval())


def test_untraceable_model_with_inferred_inputs() -> None:
    model = randomize_bn_stats(ShapeBranch(), 4).eval()
    result = nf.fold_batchnorm(model)  # the input shape is inferred from the first conv
    assert result.metrics["graph_source"] == "export" and len(result.changes) == 2
    assert_models_close(result.module, model, (X2D,))


def test_transformers_model_through_export() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2],
                                    layer_type="bottleneck", num_labels=5)
    torch.manual_seed(0)
    model = randomize_bn_stats(transformers.ResNetForImageClassification(cfg), 6).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(TraceError, match="example_inputs"):
        FoldBatchNorm()(model)
    result = fold(model, x)
    assert result.metrics["graph_source"] == "export"
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    _, ops_before = run_counting(model, (x,))
    _, ops_after = run_counting(result.module, (x,))
    assert len(result.changes) == n_bn == ops_before and ops_after == 0, skip_reasons(result)
    assert type(result.module) is type(model)
    assert_outputs_close(run_eval(result.module, (x,)).logits, run_eval(model, (x,)).logits)
