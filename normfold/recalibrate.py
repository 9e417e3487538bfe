"""Re-estimate BatchNorm running statistics on data from a new domain (AdaBN), on one process or many.

When deployment data differ from training data (another camera, scanner,
season), the running mean and variance a BatchNorm learned no longer match the
activations it sees. Re-estimating them on a few hundred unlabeled samples of
the new domain recovers much of the lost accuracy (Li et al. 2016, "AdaBN";
Schneider et al. 2020). :func:`recalibrate` does that, and reports how far each
layer's statistics moved.

How the forward runs. Every module stays in eval mode (dropout off, stochastic
depth off). Each BatchNorm gets a forward pre-hook that measures its input's
per-channel mean and (biased) variance, then writes them into the layer's
running buffers for the duration of that call, so that the eval-mode layer
normalizes the batch with the batch's own statistics: exactly what a BatchNorm
in training mode computes, without training mode. That is why this also works
on ``nn.SyncBatchNorm`` on CPU (whose training forward needs a GPU once
torch.distributed is initialized) and never touches ``momentum``. A BatchNorm
subclass with a forward normfold does not know is the only layer put in
training mode, so that its own code decides how it uses batch statistics.
The forward runs under ``torch.no_grad``. Afterwards the new statistics are
written, and every module's mode comes back as it was given. Because the
layers above a BatchNorm normalize each batch with that batch's statistics
during the run (as in training), batches should mix the data: shuffle sorted
data (a folder of class subfolders), or the deeper layers' statistics are
measured on activations the deployed model does not produce.

Estimators. For a layer, call ``b`` contributes ``n_b`` values per channel
(batch size times spatial positions) with per-channel mean ``m_b`` and biased
variance ``v_b``:

* ``"population"`` (default): the statistics of all values pooled, every value
  weighted alike: ``N = sum n_b``, ``mean = sum n_b m_b / N`` and
  ``var = (sum n_b v_b + sum n_b (m_b - mean)^2) / (N - 1)``: the exact
  parallel-variance combination (Chan et al.), in float64, with Bessel's
  correction applied once, with the total count. A small last batch counts for
  what it holds; it is not an average of per-batch averages.
* ``"cumulative"``: torch's ``momentum=None``: statistics reset, then the plain
  average over calls of ``m_b`` and of the unbiased ``v_b n_b / (n_b - 1)``,
  one weight per call whatever its size.
* ``"ema"``: the layer's own ``momentum``, starting from the current
  statistics (no reset): ``r <- (1 - momentum) r + momentum s`` per call, as
  a BatchNorm in training mode does (``momentum=None`` on the layer means the
  cumulative average continued from ``num_batches_tracked``).

A BatchNorm called several times in one forward (a shared head, siamese
branches) uses one set of statistics for every call in eval, so every call is
pooled into it: for "population" all values of all calls, for "cumulative"
and "ema" one update per call, as torch's training mode does.

Distributed. When ``torch.distributed`` is initialized with more than one
process, each rank runs its own data, then sums and counts are all-reduced
(population: ``N`` and ``sum n_b m_b`` first, then ``sum n_b v_b + n_b (m_b -
mean)^2`` about the global mean; cumulative: the sums of per-call statistics
and the number of calls), so that every rank ends with exactly what one
process computes over the union of all ranks' batches. ``"ema"`` depends on
the order of batches and has no such equivalent: it is refused there.

What a layer's statistics moved is reported per layer (:class:`LayerShift`):
the RMS over channels of ``(new_mean - old_mean) / sqrt(old_var + eps)`` (in
units of the old standard deviation) and of ``ln((new_var + eps) / (old_var +
eps))`` (0 when unchanged, 0.69 for a doubled variance).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.errors import InputError, NormfoldError, UsageError
from normfold.norms import STANDARD_BN_FORWARDS, _is_norm_act, is_batchnorm
from normfold.graph import is_frozen_batchnorm
from normfold.inputs import model_dtype_device
from normfold.passes.base import Change, PassResult, Skip, copy_module, restore_training_flags, training_flags

__all__ = ["recalibrate", "RecalibrationResult", "LayerShift", "ESTIMATORS", "DEFAULT_BATCH_SIZE"]

log = logging.getLogger(__name__)

Estimator = Literal["population", "cumulative", "ema"]
ESTIMATORS: tuple[str, ...] = ("population", "cumulative", "ema")

#: batch size used to split tensor data (a tensor, a tuple or a dict of tensors) when none is given
DEFAULT_BATCH_SIZE = 64

#: per-call statistics kept before they are folded into float64 accumulators (bounds memory on long runs)
_FLUSH_EVERY = 64

#: seconds a run must last before a progress bar appears (short runs stay quiet)
_PROGRESS_DELAY = 1.0

_NAME = "recalibrate"


# ----------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class LayerShift:
    """How far one BatchNorm's statistics moved, new domain versus old.

    ``mean_shift``: RMS over channels of ``(new_mean - old_mean) / sqrt(old_var + eps)``,
    in units of the old standard deviation. ``max_mean_shift``: the same, largest channel.
    ``var_shift``: RMS over channels of ``|ln((new_var + eps) / (old_var + eps))|``
    (0 unchanged, 0.69 when the variance doubled or halved). ``var_ratio``: the factor the
    variance changed by, geometric mean over channels of ``(new_var + eps) / (old_var + eps)``. ``count``: values per
    channel the new statistics are made of (all ranks); ``calls``: calls seen.
    The old and new statistics themselves are kept, in float64 on the CPU.
    """

    path: str
    kind: str
    calls: int
    count: int
    mean_shift: float
    max_mean_shift: float
    var_shift: float
    var_ratio: float
    old_mean: torch.Tensor = field(repr=False, compare=False)
    old_var: torch.Tensor = field(repr=False, compare=False)
    new_mean: torch.Tensor = field(repr=False, compare=False)
    new_var: torch.Tensor = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "calls": self.calls, "count": self.count,
                "mean_shift": self.mean_shift, "max_mean_shift": self.max_mean_shift, "var_shift": self.var_shift,
                "var_ratio": self.var_ratio}


@dataclass
class RecalibrationResult(PassResult):
    """What :func:`recalibrate` returns: the model, one :class:`LayerShift` per recalibrated layer, and the run.

    ``module`` (alias ``model``) is the recalibrated model; ``changes`` has one
    Change per recalibrated layer, ``skipped`` every BatchNorm left alone and
    why. ``batches`` and ``samples`` count what this process ran (``samples``
    is None when the batches have no leading tensor to count); ``world_size``
    is the number of processes whose statistics were combined.
    """

    estimator: str = "population"
    shifts: list[LayerShift] = field(default_factory=list)
    batches: int = 0
    samples: int | None = None
    world_size: int = 1

    @property
    def model(self) -> nn.Module:
        """The recalibrated model (same object as ``module``)."""
        return self.module

    def shift(self, path: str) -> LayerShift:
        """The shift of the layer at ``path``."""
        for s in self.shifts:
            if s.path == path:
                return s
        raise KeyError(f"{path!r} was not recalibrated (recalibrated: {', '.join(s.path for s in self.shifts)})")

    def most_shifted(self, k: int = 5) -> list[LayerShift]:
        """The ``k`` layers whose mean moved most, largest first."""
        return sorted(self.shifts, key=lambda s: s.mean_shift, reverse=True)[:k]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update({"estimator": self.estimator, "batches": self.batches, "samples": self.samples,
                  "world_size": self.world_size, "shifts": [s.to_dict() for s in self.shifts]})
        return d

    def summary(self) -> str:
        return (f"recalibrated {len(self.shifts)} BatchNorm layer(s) with the {self.estimator} estimator over "
                f"{self.batches} batch(es){'' if self.samples is None else f' ({self.samples} samples)'}"
                f"{f' on each of {self.world_size} processes' if self.world_size > 1 else ''}; "
                f"left {len(self.skipped)} alone")


# ----------------------------------------------------------------------------------------------
# per-layer accumulation


class _Layer:
    """One BatchNorm being recalibrated: its saved state, the hook, and the accumulators."""

    def __init__(self, path: str, module: _BatchNorm, estimator: str, own_forward: bool) -> None:
        self.path = path
        self.module = module
        self.estimator = estimator
        # A forward normfold does not know runs in training mode; a known one stays in eval and is
        # handed the batch statistics through its buffers (see the module docstring).
        self.own_forward = own_forward
        self.saved_mean = module.running_mean.detach().clone()
        self.saved_var = module.running_var.detach().clone()
        nbt = getattr(module, "num_batches_tracked", None)
        self.saved_nbt = nbt.detach().clone() if isinstance(nbt, torch.Tensor) else None
        self.num_features = int(module.running_mean.numel())
        self.calls = 0
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        c, f64 = self.num_features, torch.float64
        dev = module.running_mean.device
        zeros = torch.zeros(c, dtype=f64, device=dev)
        # values per channel seen (all estimators); only the chosen estimator's accumulators are kept
        self.n = 0.0
        # population: mean and sum of squared deviations (M2)
        self.mean = self.m2 = zeros
        # cumulative: sums of per-call mean and unbiased variance
        self.sum_mean = self.sum_var = zeros
        # ema: the running estimate itself, from the current statistics
        self.ema_mean = self.saved_mean.to(f64) if estimator == "ema" else zeros
        self.ema_var = self.saved_var.to(f64) if estimator == "ema" else zeros
        self.ema_nbt = int(self.saved_nbt.item()) if self.saved_nbt is not None else 0
        self.handle: Any = None

    # -- the hook -----------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{self.path} was called without a tensor input; pass forward_fn that calls the model "
                             "the way it expects")
        c = self.num_features
        if x.dim() < 2 or x.shape[1] != c:
            raise InputError(f"{self.path} expects {c} channels on dim 1 but received shape {tuple(x.shape)}: the "
                             "data does not fit the model; pass data of the shape the model was trained on")
        n = x.numel() // c
        if n < 2:
            raise InputError(f"{self.path} received a batch with {n} value per channel (shape {tuple(x.shape)}); "
                             "batch statistics need at least 2: use a batch size of 2 or more")
        mean, var = _batch_stats(x)
        self.calls += 1
        self.pending.append((n, mean, var))
        if len(self.pending) >= _FLUSH_EVERY:
            self.flush()
        if not self.own_forward:
            # The eval-mode forward now normalizes with this batch's statistics, as training mode would.
            self.module.running_mean.copy_(mean)
            self.module.running_var.copy_(var)

    # -- accumulation -------------------------------------------------------------------------
    def flush(self) -> None:
        if not self.pending:
            return
        f64 = torch.float64
        ns = torch.tensor([p[0] for p in self.pending], dtype=f64, device=self.mean.device)
        means = torch.stack([p[1] for p in self.pending]).to(f64)
        vars_ = torch.stack([p[2] for p in self.pending]).to(f64)
        self.pending.clear()
        if self.estimator == "population":
            n_p = float(ns.sum())
            w = ns[:, None]
            mean_p = (w * means).sum(0) / n_p
            m2_p = (w * vars_).sum(0) + (w * (means - mean_p) ** 2).sum(0)
            self.n, self.mean, self.m2 = _chan(self.n, self.mean, self.m2, n_p, mean_p, m2_p)
        elif self.estimator == "cumulative":
            self.sum_mean = self.sum_mean + means.sum(0)
            self.sum_var = self.sum_var + (vars_ * (ns / (ns - 1))[:, None]).sum(0)
            self.n += float(ns.sum())
        else:  # ema, in call order
            momentum = self.module.momentum
            for i in range(len(ns)):
                self.ema_nbt += 1
                f = (1.0 / self.ema_nbt) if momentum is None else float(momentum)
                unbiased = vars_[i] * (ns[i] / (ns[i] - 1))
                self.ema_mean = (1 - f) * self.ema_mean + f * means[i]
                self.ema_var = (1 - f) * self.ema_var + f * unbiased
            self.n += float(ns.sum())

    def restore(self) -> None:
        """Put the statistics back as they were before the run."""
        with torch.no_grad():
            self.module.running_mean.copy_(self.saved_mean)
            self.module.running_var.copy_(self.saved_var)
            if self.saved_nbt is not None:
                self.module.num_batches_tracked.copy_(self.saved_nbt)


def _chan(n_a: float, mean_a: torch.Tensor, m2_a: torch.Tensor, n_b: float, mean_b: torch.Tensor,
          m2_b: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Chan et al.'s exact combination of two (count, mean, M2) summaries."""
    if n_a == 0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and biased variance of ``x``, in float32 or float64."""
    if x.dtype not in (torch.float32, torch.float64):
        # half-precision reductions lose too much; the statistics are accumulated in float64 anyway
        x = x.float()
    try:
        # The kernel training-mode BatchNorm uses: several times faster on CPU than var_mean over
        # (0, 2, 3), and as accurate (Welford).
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    except (RuntimeError, NotImplementedError):  # a backend without it
        dims = [0] + list(range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var


# ----------------------------------------------------------------------------------------------
# data


def _dataset_len(data: Any) -> int:
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise InputError("the data is a 0-d tensor; pass a tensor whose dim 0 indexes the samples")
        return int(data.shape[0])
    values = list(data.values()) if isinstance(data, Mapping) else list(data)
    if not values:
        raise InputError(f"the data is an empty {type(data).__name__}; pass at least one tensor")
    bad = [k for k, v in (data.items() if isinstance(data, Mapping) else enumerate(values))
           if not isinstance(v, torch.Tensor) or v.dim() == 0]
    what = "keyword arguments" if isinstance(data, Mapping) else "positional arguments"
    if bad:
        raise InputError(
            f"a {type(data).__name__} of data is read as the model's {what}, every one a tensor sliced along dim 0, "
            f"but {bad[0]!r} is {type((data[bad[0]] if isinstance(data, Mapping) else values[bad[0]])).__name__}"
            f"{' (0-d)' if isinstance((data[bad[0]] if isinstance(data, Mapping) else values[bad[0]]), torch.Tensor) else ''}; "
            "pass a list or DataLoader of ready batches, or forward_fn")
    lengths = {int(v.shape[0]) for v in values}
    if len(lengths) > 1:
        raise InputError(f"the tensors of the {type(data).__name__} have different lengths on dim 0 "
                         f"({sorted(lengths)}); they are sliced together into batches, so give them the same length")
    return lengths.pop()


def _as_torch(data: Any) -> Any:
    if isinstance(data, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(data))
    if isinstance(data, tuple) and any(isinstance(v, np.ndarray) for v in data):
        return tuple(_as_torch(v) for v in data)
    if isinstance(data, Mapping) and any(isinstance(v, np.ndarray) for v in data.values()):
        return {k: _as_torch(v) for k, v in data.items()}
    return data


def _plan_batches(data: Any, batch_size: int | None) -> tuple[Iterator[Any], int | None]:
    """An iterator over batches and their number (None when unknown); see :func:`recalibrate` for the rules."""
    data = _as_torch(data)
    if isinstance(data, (torch.Tensor, tuple, Mapping)):
        n = _dataset_len(data)
        if n == 0:
            raise InputError("the data holds 0 samples; pass at least one batch of the new domain")
        bs = batch_size or DEFAULT_BATCH_SIZE

        def sliced() -> Iterator[Any]:
            for i in range(0, n, bs):
                if isinstance(data, torch.Tensor):
                    yield data[i:i + bs]
                elif isinstance(data, Mapping):
                    yield {k: v[i:i + bs] for k, v in data.items()}
                else:
                    yield tuple(v[i:i + bs] for v in data)

        return sliced(), math.ceil(n / bs)
    if batch_size is not None:
        raise UsageError(f"batch_size applies to tensor data; a {type(data).__name__} already yields batches: "
                         "drop batch_size, or set it on the DataLoader")
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise InputError(f"cannot read batches from a {type(data).__name__}; pass a tensor, a tuple or dict of "
                         "tensors, or an iterable of batches (a list, a generator, a DataLoader)")
    try:
        total: int | None = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return iter(data), total


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device)
    if isinstance(batch, tuple) and not hasattr(batch, "_fields"):
        return tuple(_to_device(b, device) for b in batch)
    if isinstance(batch, list):
        return [_to_device(b, device) for b in batch]
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _leading_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        size = _leading_size(v)
        if size is not None:
            return size
    return None


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of (" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


def _call_args(batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    raise InputError(f"a batch is a {type(batch).__name__}, which normfold cannot pass to the model; "
                     "pass forward_fn=lambda model, batch: model(...)")


def _check_signature(model: nn.Module, args: tuple, kwargs: dict, batch: Any) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins and some wrappers have none: let the call decide
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise InputError(
            f"a batch ({_describe(batch)}) does not fit {type(model).__name__}.forward{sig} ({exc}); a DataLoader of "
            "(input, label) pairs needs forward_fn=lambda model, batch: model(batch[0])") from None


# ----------------------------------------------------------------------------------------------
# distributed


def _dist_world(group: Any) -> int:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def _all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
    return t


def _reduce_device(layers: list[_Layer], group: Any) -> torch.device:
    backend = str(torch.distributed.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return layers[0].mean.device if layers else torch.device("cpu")


def _reduce_statistics(layers: list[_Layer], estimator: str, group: Any) -> None:
    """All-reduce sums and counts so that every rank holds the union's statistics (see module docstring)."""
    dev = _reduce_device(layers, group)
    f64 = torch.float64
    calls = _all_reduce(torch.tensor([float(layer.calls) for layer in layers], dtype=f64, device=dev), group)
    for layer, c in zip(layers, calls.tolist()):
        layer.calls = int(round(c))
    if estimator == "population":
        # round 1: counts and sums -> the global mean
        flat = torch.cat([torch.cat([torch.tensor([layer.n], dtype=f64, device=dev),
                                     (layer.mean * layer.n).to(dev)]) for layer in layers])
        _all_reduce(flat, group)
        global_n, global_mean, i = [], [], 0
        for layer in layers:
            c = layer.num_features
            n = float(flat[i])
            global_n.append(n)
            global_mean.append(flat[i + 1:i + 1 + c] / n if n > 0 else torch.zeros(c, dtype=f64, device=dev))
            i += 1 + c
        # round 2: squared deviations about the global mean (exact: M2 + n (mean - global_mean)^2)
        flat2 = torch.cat([(layer.m2.to(dev) + layer.n * (layer.mean.to(dev) - gm) ** 2) if layer.n > 0
                           else torch.zeros(layer.num_features, dtype=f64, device=dev)
                           for layer, gm in zip(layers, global_mean)])
        _all_reduce(flat2, group)
        i = 0
        for layer, n, gm in zip(layers, global_n, global_mean):
            c = layer.num_features
            layer.n, layer.mean, layer.m2 = n, gm.to(layer.mean.device), flat2[i:i + c].to(layer.mean.device)
            i += c
    else:  # cumulative
        flat = torch.cat([torch.cat([torch.tensor([layer.n], dtype=f64, device=dev), layer.sum_mean.to(dev),
                                     layer.sum_var.to(dev)]) for layer in layers])
        _all_reduce(flat, group)
        i = 0
        for layer in layers:
            c = layer.num_features
            layer.n = float(flat[i])
            layer.sum_mean = flat[i + 1:i + 1 + c].to(layer.mean.device)
            layer.sum_var = flat[i + 1 + c:i + 1 + 2 * c].to(layer.mean.device)
            i += 1 + 2 * c


def _agree_on_failure(failed: bool, group: Any) -> bool:
    """True when any rank failed; every rank must call this, so that none waits forever in an all-reduce."""
    flag = torch.tensor([1.0 if failed else 0.0], dtype=torch.float64)
    if str(torch.distributed.get_backend(group)) == "nccl":
        flag = flag.cuda()
    return bool(_all_reduce(flag, group).item() > 0)


# ----------------------------------------------------------------------------------------------
# progress


class _Progress:
    """A rich progress bar that appears only once a run has lasted ``_PROGRESS_DELAY`` seconds."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.enabled = enabled
        self.total = total
        self.start = time.perf_counter()
        self.bar: Any = None
        self.task: Any = None

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            if time.perf_counter() - self.start < _PROGRESS_DELAY:
                return
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("recalibrating BatchNorm"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
                                console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("recalibrate", total=self.total)
        self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------------------------
# the function


def _select_layers(model: nn.Module, estimator: str) -> tuple[list[_Layer], list[Skip]]:
    layers: list[_Layer] = []
    skipped: list[Skip] = []
    for path, m in model.named_modules():
        if not is_batchnorm(m):
            continue
        where = (path,)
        if is_frozen_batchnorm(m):
            skipped.append(Skip(_NAME, where, f"{type(m).__name__} has constant statistics and no training mode; "
                                              "convert it to BatchNorm2d first to recalibrate it"))
            continue
        if not m.track_running_stats or m.running_mean is None or m.running_var is None:
            skipped.append(Skip(_NAME, where, "track_running_stats=False: it normalizes with batch statistics even "
                                              "in eval, so there are no running statistics to recalibrate"))
            continue
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            skipped.append(Skip(_NAME, where, "lazy BatchNorm not initialized yet: run one forward first"))
            continue
        if not (m.running_mean.is_floating_point() and m.running_var.is_floating_point()):
            skipped.append(Skip(_NAME, where, "its running statistics are not floating-point tensors"))
            continue
        own_forward = type(m).forward not in STANDARD_BN_FORWARDS and not _is_norm_act(m)
        if own_forward:
            log.info("%s: %s has its own forward(); it runs in training mode during recalibration", path,
                     type(m).__name__)
        layers.append(_Layer(path or "<model>", m, estimator, own_forward))
    return layers, skipped


def _validate(model: Any, estimator: str, max_batches: int | None, batch_size: int | None,
              forward_fn: Callable | None) -> None:
    if not isinstance(model, nn.Module):
        raise NormfoldError(f"recalibrate: expected a torch.nn.Module, got {type(model).__name__}")
    if estimator not in ESTIMATORS:
        raise UsageError(f"estimator {estimator!r} is unknown; use one of {', '.join(map(repr, ESTIMATORS))}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise UsageError(f"max_batches={max_batches!r} must be a positive integer (or None for all the data)")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"batch_size={batch_size!r} must be a positive integer")
    if forward_fn is not None and not callable(forward_fn):
        raise UsageError(f"forward_fn must be a callable forward_fn(model, batch), got {type(forward_fn).__name__}")


def recalibrate(model: nn.Module, data: Any, *, forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                estimator: Estimator = "population", max_batches: int | None = None, progress: bool = True,
                batch_size: int | None = None, inplace: bool = False,
                process_group: Any = None) -> RecalibrationResult:
    """Re-estimate the running statistics of every BatchNorm in ``model`` on ``data``.

    See the module docstring for how the forward runs, the estimators and the
    distributed semantics.

    Args:
        model: any ``nn.Module``; every BatchNorm kind (1d/2d/3d, SyncBatchNorm,
            subclasses such as timm's BatchNormAct2d) is recalibrated.
            torchvision's FrozenBatchNorm2d and layers without running
            statistics are skipped with the reason. A DistributedDataParallel
            wrapper is unwrapped (``result.module`` is the inner module).
        data: what to run, read as follows:

            * a ``torch.Tensor`` (or numpy array): the samples, split along dim 0
              into batches of ``batch_size`` (default 64), each called as ``model(x)``;
            * a ``tuple`` of tensors: positional arguments, sliced together along
              dim 0 into batches, each called as ``model(*batch)``;
            * a ``dict`` of tensors: keyword arguments, sliced together, ``model(**batch)``;
            * any other iterable (a list, a generator, a DataLoader): each item is
              one batch, called as ``model(x)``, ``model(*item)`` for a tuple or
              list, ``model(**item)`` for a dict. A DataLoader yielding
              ``(input, label)`` needs ``forward_fn``: normfold does not guess
              which element is the input.
        forward_fn: ``forward_fn(model, batch)`` runs one batch, for any other
            call signature. Tensors in the batch are moved to the model's device first.
        estimator: ``"population"`` (default), ``"cumulative"`` or ``"ema"``.
        max_batches: stop after this many batches (per process).
        progress: show a progress bar (on stderr, rank 0 only) once a run lasts over a second.
        batch_size: batch size for tensor data; refused for iterables, which already batch.
        inplace: recalibrate ``model`` itself; by default a deep copy is, and ``model`` is left untouched.
        process_group: the torch.distributed group whose ranks' statistics are combined (default: the world).

    Returns:
        :class:`RecalibrationResult`: ``.model``, ``.shifts`` per layer, ``.skipped``.

    Raises:
        UsageError: an unknown estimator or a bad option.
        InputError: data that yield no batch, do not fit the model, or a model with no BatchNorm to recalibrate.
    """
    _validate(model, estimator, max_batches, batch_size, forward_fn)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    world = _dist_world(process_group)
    if world > 1 and estimator == "ema":
        raise UsageError("estimator='ema' depends on the order of batches and has no exact multi-process "
                         "equivalent; use 'population' (recommended) or 'cumulative', whose sums are all-reduced")
    rank = torch.distributed.get_rank(process_group) if world > 1 else 0
    batches, total = _plan_batches(data, batch_size)
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)

    work = model if inplace else copy_module(model)
    layers, skipped = _select_layers(work, estimator)
    if not layers:
        reasons = "; ".join(str(s) for s in skipped[:3]) or "it has no BatchNorm layer"
        raise InputError(f"{type(model).__name__} has no BatchNorm with running statistics to recalibrate ({reasons})")
    _, device = model_dtype_device(work)

    flags = training_flags(work)
    work.eval()
    for layer in layers:
        if layer.own_forward:
            layer.module.training = True
        layer.handle = layer.module.register_forward_pre_hook(layer.pre_hook, with_kwargs=True)
    bar = _Progress(progress and rank == 0, total)
    n_batches, n_samples = 0, 0
    counted = True
    failure: BaseException | None = None
    started = time.perf_counter()
    try:
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and n_batches >= max_batches:
                    break
                batch = _to_device(batch, device)
                _run_batch(work, batch, forward_fn, first=n_batches == 0, index=n_batches)
                n_batches += 1
                size = _leading_size(batch)
                if size is None:
                    counted = False
                else:
                    n_samples += size
                bar.update(n_batches)
        if n_batches == 0:
            raise InputError("the data yielded no batch; pass at least one batch of the new domain")
        for layer in layers:
            layer.flush()
    except BaseException as exc:  # noqa: BLE001 - every rank must learn of a failure before it is re-raised
        failure = exc
    finally:
        bar.close()
        for layer in layers:
            if layer.handle is not None:
                layer.handle.remove()
        restore_training_flags(work, flags)
    if world > 1:
        any_failed = _agree_on_failure(failure is not None, process_group)
        if any_failed and failure is None:
            failure = NormfoldError("recalibration failed on another rank (see its error); the statistics were "
                                    "left as they were")
    if failure is not None:
        for layer in layers:
            layer.restore()
        raise failure
    if world > 1:
        _reduce_statistics(layers, estimator, process_group)

    result = RecalibrationResult(module=work, skipped=skipped, estimator=estimator, batches=n_batches,
                                 samples=n_samples if counted else None, world_size=world)
    _write_statistics(layers, estimator, result)
    elapsed = time.perf_counter() - started
    result.metrics.update({"estimator": estimator, "batches": n_batches, "samples": result.samples,
                           "world_size": world, "seconds": elapsed})
    log.info("%s in %.2fs", result.summary(), elapsed)
    return result


def _run_batch(model: nn.Module, batch: Any, forward_fn: Callable | None, *, first: bool, index: int) -> None:
    if forward_fn is not None:
        forward_fn(model, batch)
        return
    args, kwargs = _call_args(batch)
    if first:
        _check_signature(model, args, kwargs, batch)
    try:
        model(*args, **kwargs)
    except NormfoldError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        head = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"batch {index} ({_describe(batch)}) does not fit the model ({type(exc).__name__}: {head}); "
                         "pass data of the shape and dtype the model expects, or forward_fn") from exc


def _write_statistics(layers: list[_Layer], estimator: str, result: RecalibrationResult) -> None:
    new_stats: list[tuple[_Layer, torch.Tensor, torch.Tensor]] = []
    for layer in layers:
        if layer.calls == 0:
            layer.restore()
            result.skipped.append(Skip(_NAME, (layer.path,), "not called by forward() on this data; its statistics "
                                                             "were left as they were"))
            continue
        if estimator == "population":
            if layer.n < 2:
                layer.restore()
                result.skipped.append(Skip(_NAME, (layer.path,), f"saw {int(layer.n)} value per channel; the "
                                                                 "variance needs at least 2: pass more data"))
                continue
            new_mean, new_var = layer.mean, layer.m2 / (layer.n - 1)
        elif estimator == "cumulative":
            new_mean, new_var = layer.sum_mean / layer.calls, layer.sum_var / layer.calls
        else:
            new_mean, new_var = layer.ema_mean, layer.ema_var
        new_stats.append((layer, new_mean.detach().double().cpu(), new_var.detach().double().cpu()))
    # Check every layer before writing any: a NaN in the data must not leave a half-recalibrated model.
    for layer, new_mean, new_var in new_stats:
        dtype = layer.module.running_mean.dtype
        if not (torch.isfinite(new_mean.to(dtype)).all() and torch.isfinite(new_var.to(dtype)).all()):
            for each in layers:
                each.restore()
            raise InputError(f"the data give {layer.path} non-finite statistics (NaN or inf in the data, or values "
                             f"beyond {str(dtype).replace('torch.', '')}); clean the data and run again")
    for layer, new_mean, new_var in new_stats:
        m = layer.module
        old_mean, old_var = layer.saved_mean.double().cpu(), layer.saved_var.double().cpu()
        with torch.no_grad():
            m.running_mean.copy_(new_mean)
            m.running_var.copy_(new_var)
            if layer.saved_nbt is not None:
                m.num_batches_tracked.fill_(layer.ema_nbt if estimator == "ema" else layer.calls)
        eps = float(m.eps)
        std_old = torch.sqrt(old_var.clamp_min(0) + eps)
        z = (new_mean - old_mean) / std_old
        log_ratio = torch.log((new_var.clamp_min(0) + eps) / (old_var.clamp_min(0) + eps))
        shift = LayerShift(path=layer.path, kind=type(m).__name__, calls=layer.calls, count=int(layer.n),
                           mean_shift=float(z.pow(2).mean().sqrt()), max_mean_shift=float(z.abs().max()),
                           var_shift=float(log_ratio.pow(2).mean().sqrt()),
                           var_ratio=math.exp(float(log_ratio.mean())), old_mean=old_mean, old_var=old_var,
                           new_mean=new_mean, new_var=new_var)
        result.shifts.append(shift)
        per_batch = layer.calls / max(result.batches, 1)
        twice = (f"; called {per_batch:g} times per forward, all calls pooled" if per_batch > 1 else "")
        result.changes.append(Change(
            _NAME, "recalibrated", (layer.path,),
            f"recalibrated {layer.path} ({estimator}, {int(layer.n)} values/channel): mean moved "
            f"{shift.mean_shift:.3g} old sd (max {shift.max_mean_shift:.3g}), variance x{shift.var_ratio:.3g}"
            f"{twice}{' (own forward run in training mode)' if layer.own_forward else ''}",
            details=shift.to_dict()))
