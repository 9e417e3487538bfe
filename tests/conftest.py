"""Shared helpers and fixtures for the normfold test suite.

Import the helpers directly (``from tests.conftest import randomize_bn_stats``;
``tests`` is a package). Everything numeric compares against
:mod:`normfold.tolerances`; tests never hard-code a tolerance.

* :func:`randomize_bn_stats` gives every BatchNorm (all kinds: 1d/2d/3d,
  SyncBatchNorm, subclasses such as timm's BatchNormAct2d, torchvision's
  FrozenBatchNorm2d) non-trivial running statistics and affine parameters, so
  that a fold that ignores one of them changes the output.
* :func:`assert_outputs_close` / :func:`output_error` compare two models (or
  two outputs, any nesting of tensors) with the tolerance of their dtype.
* :class:`BatchNormOpCounter` counts the batch_norm ops that actually run in a
  forward pass, at the ATen dispatch level (module counts lie: torch.fx's fuse
  traces through BatchNorm subclasses and leaves functional calls behind).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Callable, Iterable, Sequence

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from normfold.graph import eval_mode, is_frozen_batchnorm
from normfold.tolerances import Tolerance
from normfold.verify import compare

# One intra-op thread by default: on a machine whose 2 cores are shared with other processes, torch's
# OpenMP threads spin at every barrier while the other thread is descheduled, and a 2-thread forward
# pass was measured 50x slower than a 1-thread one (efficientnet_b0 at 32x32: 4.4 s vs 0.08 s).
# NORMFOLD_TEST_THREADS=2 on a machine of your own.
torch.set_num_threads(int(os.environ.get("NORMFOLD_TEST_THREADS", "1")))


# ----------------------------------------------------------------------------------------------
# BatchNorm statistics


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm-like module (the kinds normfold folds), by path."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or is_frozen_batchnorm(m)]


@torch.no_grad()
def randomize_bn_stats(model: nn.Module, seed: int = 0, *, spread: float = 1.0) -> nn.Module:
    """Give every BatchNorm non-trivial ``running_mean``, ``running_var``, ``weight`` and ``bias``.

    Values are drawn from a seeded generator: mean ~ U(-0.5, 0.5), var ~ U(0.5, 2),
    weight ~ U(0.5, 1.5) with random signs on a quarter of the channels (a fold that
    takes |gamma| or drops the sign must fail), bias ~ U(-0.5, 0.5); ``spread``
    scales the deviations from the trivial values (0 = identity statistics).
    BatchNorms without affine parameters or without running statistics keep
    what they have of those. Returns ``model`` (edited in place).
    """
    g = torch.Generator().manual_seed(seed)

    def draw(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        v = torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo
        return v.to(dtype=t.dtype, device=t.device)

    for _, m in batchnorm_modules(model):
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if isinstance(rm, torch.Tensor) and rm.is_floating_point():
            rm.copy_(draw(rm, -0.5 * spread, 0.5 * spread))
        if isinstance(rv, torch.Tensor) and rv.is_floating_point():
            rv.copy_(draw(rv, 1.0 - 0.5 * spread, 1.0 + spread))
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if isinstance(w, torch.Tensor):
            new_w = draw(w, 1.0 - 0.5 * spread, 1.0 + 0.5 * spread)
            flip = torch.rand(w.shape, generator=g) < 0.25 * min(spread, 1.0)
            w.copy_(torch.where(flip.to(w.device), -new_w, new_w))
        if isinstance(b, torch.Tensor):
            b.copy_(draw(b, -0.5 * spread, 0.5 * spread))
    return model


# ----------------------------------------------------------------------------------------------
# Comparing outputs


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, in a stable order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in flatten_outputs(out[k])]
    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        return flatten_outputs(out.to_tuple())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    return []


def run_eval(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """Forward in eval under no_grad; every module's training flag is restored afterwards."""
    with eval_mode(model), torch.no_grad():
        return model(*inputs)


def output_error(a: Any, b: Any) -> tuple[float, float]:
    """(max abs error, max error relative to the reference's scale) between outputs ``a`` and reference ``b``.

    The relative error divides by ``max |b|`` over the whole tensor, not elementwise,
    so that a logit that happens to be near 0 does not dominate.
    """
    ta, tb = flatten_outputs(a), flatten_outputs(b)
    assert len(ta) == len(tb), f"different output structure: {len(ta)} vs {len(tb)} tensors"
    abs_err, rel_err = 0.0, 0.0
    for x, y in zip(ta, tb):
        assert x.shape == y.shape, f"output shape {tuple(x.shape)} != reference {tuple(y.shape)}"
        if not y.is_floating_point():
            assert torch.equal(x, y)
            continue
        d = (x.double() - y.double()).abs().max().item() if y.numel() else 0.0
        scale = y.double().abs().max().item() if y.numel() else 0.0
        abs_err = max(abs_err, d)
        rel_err = max(rel_err, d / scale if scale > 0 else d)
    return abs_err, rel_err


def assert_outputs_close(actual: Any, reference: Any, tol: Tolerance | None = None, *, what: str = "") -> None:
    """Assert that ``actual`` computes ``reference``'s outputs by the one rule, :func:`normfold.verify.compare`.

    ``tol=None`` holds each output to :data:`normfold.tolerances.POLICY` of its comparison dtype
    (``max |a - b| <= scaled * max|reference|`` per output); an explicit ``tol`` replaces it for every
    output. Every value must be finite where the reference is (a fold that produces inf/NaN fails even
    if the reference is large).
    """
    ta, tb = flatten_outputs(actual), flatten_outputs(reference)
    assert ta, "no tensor in the output"
    assert len(ta) == len(tb), f"{what}: {len(ta)} outputs, the reference has {len(tb)}"
    for x, y in zip(ta, tb):
        assert torch.equal(torch.isfinite(x), torch.isfinite(y)), f"{what}: non-finite values differ"
    verdict = compare(tb, ta, tolerance=tol)
    assert verdict.passed, f"{what}: {verdict.describe()}"


def assert_models_close(actual: nn.Module, reference: nn.Module, inputs: Sequence[Any],
                        tol: Tolerance | None = None, *, what: str = "") -> None:
    """Run both models in eval on ``inputs`` and compare with :func:`assert_outputs_close`."""
    assert_outputs_close(run_eval(actual, inputs), run_eval(reference, inputs), tol, what=what)


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the state_dict, to check later that a model was not touched."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_state_equal(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """``model``'s state_dict has the same keys and bit-identical values as ``snapshot``."""
    now = model.state_dict()
    assert set(now) == set(snapshot), f"state_dict keys changed: {set(now) ^ set(snapshot)}"
    for k, v in snapshot.items():
        assert now[k].dtype == v.dtype and now[k].device == v.device, k
        assert torch.equal(now[k], v), f"{k} changed"


# ----------------------------------------------------------------------------------------------
# Counting batch_norm ops that run


def _is_batchnorm_op(func: Any) -> bool:
    name = func.__name__ if hasattr(func, "__name__") else str(func)
    return "batch_norm" in name and "backward" not in name and "stats" not in name and "elemt" not in name \
        and "gather" not in name and "update" not in name


class BatchNormOpCounter(TorchDispatchMode):
    """Counts ATen batch_norm ops (``native_batch_norm``, ``_native_batch_norm_legit_no_training``, ...).

    At the dispatch level composite ops are already decomposed, so every
    ``F.batch_norm`` / ``nn.BatchNorm*`` call is counted exactly once however it
    was reached.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if _is_batchnorm_op(func):
            self.count += 1
            key = str(func)
            self.ops[key] = self.ops.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def run_counting(model: nn.Module, inputs: Sequence[Any]) -> tuple[Any, int]:
    """(output, number of batch_norm ops run) of an eval forward."""
    with eval_mode(model), torch.no_grad(), BatchNormOpCounter() as counter:
        out = model(*inputs)
    return out, counter.count


class ConvAndBatchNormOpCounter(BatchNormOpCounter):
    """:class:`BatchNormOpCounter` that also counts ``aten.convolution`` ops (``conv``: every
    Conv1d/2d/3d and ConvTranspose reaches it once, which is what branch merging removes) and
    every ATen op dispatched (``total``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = 0
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.total += 1
        if func is torch.ops.aten.convolution.default:
            self.conv += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def run_counting_ops(model: nn.Module, inputs: Sequence[Any]) -> tuple[Any, int, int]:
    """(output, batch_norm ops run, convolution ops run) of an eval forward."""
    with eval_mode(model), torch.no_grad(), ConvAndBatchNormOpCounter() as counter:
        out = model(*inputs)
    return out, counter.count, counter.conv


def load_benchmark(name: str) -> Any:
    """The module of ``benchmarks/<name>.py`` (benchmarks are scripts, not a package), for tests that
    run a benchmark's ``main`` on one small model so that the README's tables cannot rot."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def bn_randomizer() -> Callable[..., nn.Module]:
    """:func:`randomize_bn_stats` as a fixture, for tests that prefer fixtures to imports."""
    return randomize_bn_stats



# ----------------------------------------------------------------------------------------------
# cheap random weights for big zoo models


class fast_random_init:
    """Context manager: ``torch.nn.init``'s random initializers fill from a seeded pool, once, on exit.

    Building a big torchvision model spends most of its time in torch's RNG, and
    draws every weight twice (the layer's ``reset_parameters``, then the model's
    own init loop): regnet_y_32gf took 1.3-1.8 s of CPU, 0.35-1.1 s with this.
    Inside the context a random initializer (uniform_, normal_, trunc_normal_,
    kaiming_*, xavier_*, orthogonal_) only records the standard deviation it was
    asked for; on exit each recorded tensor is filled once with a slice of one
    seeded N(0, 1) pool (wrapping around, each tensor at another offset) times
    that standard deviation (plus the mean), so activations keep their usual
    scale. The weights repeat with the pool's period, which does not matter to a
    fold. Constant initializers (zeros_, ones_, constant_) run as usual.
    Initializers called on tensor methods (``w.data.normal_()``) are not seen
    and run as usual.
    """

    POOL = (1 << 20) + 7  # not a power of two: rows of a weight do not line up with the period

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.pending: dict[int, tuple[torch.Tensor, float, float, tuple[float, float] | None]] = {}
        self.saved: dict[str, Any] = {}

    @staticmethod
    def _fans(t: torch.Tensor) -> tuple[int, int]:
        if t.dim() < 2:
            return max(1, t.numel()), max(1, t.numel())
        rf = math.prod(t.shape[2:])
        return t.shape[1] * rf, t.shape[0] * rf

    def __enter__(self) -> "fast_random_init":
        init = torch.nn.init
        names = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                 "xavier_uniform_", "xavier_normal_", "orthogonal_")
        self.saved = {n: getattr(init, n) for n in names}
        pending, fans = self.pending, self._fans

        def record(t: torch.Tensor, std: float, mean: float = 0.0, clamp: tuple[float, float] | None = None):
            pending[id(t)] = (t, float(std), float(mean), clamp)  # a later call on the same tensor wins
            return t

        def kaiming_std(t, a, mode, nonlinearity):
            fan_in, fan_out = fans(t)
            return init.calculate_gain(nonlinearity, a) / math.sqrt(fan_in if mode == "fan_in" else fan_out)

        repl = {
            "uniform_": lambda t, a=0.0, b=1.0, **_: record(t, (b - a) / math.sqrt(12), (a + b) / 2),
            "normal_": lambda t, mean=0.0, std=1.0, **_: record(t, std, mean),
            "trunc_normal_": lambda t, mean=0.0, std=1.0, a=-2.0, b=2.0, **_: record(t, std, mean, (a, b)),
            "kaiming_uniform_": lambda t, a=0.0, mode="fan_in", nonlinearity="leaky_relu", **_:
                record(t, kaiming_std(t, a, mode, nonlinearity)),
            "kaiming_normal_": lambda t, a=0.0, mode="fan_in", nonlinearity="leaky_relu", **_:
                record(t, kaiming_std(t, a, mode, nonlinearity)),
            "xavier_uniform_": lambda t, gain=1.0, **_: record(t, gain * math.sqrt(2.0 / sum(fans(t)))),
            "xavier_normal_": lambda t, gain=1.0, **_: record(t, gain * math.sqrt(2.0 / sum(fans(t)))),
            "orthogonal_": lambda t, gain=1.0, **_: record(t, gain / math.sqrt(max(1, t.shape[-1]))),
        }
        for n, f in repl.items():
            setattr(init, n, f)
        return self

    def __exit__(self, *exc: Any) -> None:
        for n, f in self.saved.items():
            setattr(torch.nn.init, n, f)
        pending, self.pending = self.pending, {}
        if exc[0] is not None:
            return
        pool = torch.randn(self.POOL, generator=torch.Generator().manual_seed(self.seed))
        offset = 0
        with torch.no_grad():
            for t, std, mean, clamp in pending.values():
                if t.device.type == "meta" or t.numel() == 0:
                    continue
                flat = t.view(-1) if t.is_contiguous() else torch.empty(t.numel(), dtype=t.dtype, device=t.device)
                i, n = 0, flat.numel()
                while i < n:
                    start = offset % self.POOL
                    k = min(n - i, self.POOL - start)
                    flat[i:i + k].copy_(pool[start:start + k])
                    i += k
                    offset += k
                offset += 7919
                flat.mul_(std).add_(mean)
                if clamp is not None:
                    flat.clamp_(*clamp)
                if flat.data_ptr() != t.data_ptr():
                    t.copy_(flat.view(t.shape))
