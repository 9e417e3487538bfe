"""Replace BatchNorm layers by GroupNorm, naively or warm-started on calibration data.

Why. A BatchNorm trained with large batches misbehaves when fine-tuning with
batches of 1-4 (the batch statistics are noise) and is incompatible with
per-sample gradients (differential privacy, Opacus). GroupNorm normalizes each
sample on its own, so it has neither problem.

Math. For an input ``x`` of shape ``(N, C, *S)``, GroupNorm with ``G`` groups
computes, per sample ``n`` and group ``g`` (the ``C/G`` channels of the group
times every position of ``S``)::

    z = (x - mean_{n,g}) / sqrt(var_{n,g} + eps)        y_GN = a_c * z + b_c

while BatchNorm in eval computes ``y_BN = s_c * x + t_c`` with its running
statistics (:func:`normfold.norms.batchnorm_affine`). The two differ in kind,
so no conversion is exact; two starting points are offered:

* naive (no calibration data): ``a_c = gamma_c``, ``b_c = beta_c``, ``eps``
  copied.
* warm start (``calibration_data``): ``(a_c, b_c)`` are the least-squares fit,
  per channel, of the BatchNorm's eval output on the GroupNorm's normalized
  input over every sample and position of the calibration data::

      a_c = cov(z, y_BN) / var(z)        b_c = mean(y_BN) - a_c * mean(z)

  The sums (count, sum z, sum y, sum z^2, sum zy, sum y^2 per channel) are
  accumulated in float64 by forward pre-hooks. By default this is ONE eval
  pass of the original model: every layer is fitted on the inputs the trained
  network gives it. With ``sequential=True`` the layers are fitted in call
  order, layer ``k`` on the inputs produced by the already-converted layers
  before it (the target staying the original BatchNorm output), so each layer
  also makes up for what the GroupNorms upstream changed; it costs up to two
  forwards per batch and layer (each stops once the layer has run). Either fit
  is no worse than the naive choice on the inputs it was fitted on (the naive
  ``(gamma, beta)`` is one candidate of the least squares); both residuals are
  reported per layer in ``result.metrics["calibration"]``. A channel whose
  ``z`` is constant on the data keeps ``gamma`` as its scale.

Groups. ``num_groups`` if given, otherwise the largest divisor of ``C`` not
above 32 whose groups hold at least 3 values per sample. With one value per
group GroupNorm outputs its bias alone whatever the input (``G = C`` on a 2-D
``(N, C)`` input, a BatchNorm1d after a Linear: the conversion Opacus makes for
``C <= 32``); with two it outputs ``+-1`` before the affine, only the sign of a
difference. The number of values comes from the input shape in the graph with
example inputs (inferred from the first layer when not given) or, failing
that, from the BatchNorm kind (2d/3d: spatial extent assumed; 1d and Sync:
assumed 2-D). An explicit ``num_groups`` that breaks the rule (or does not
divide ``C``) is skipped with the reason.

Kinds. BatchNorm1d/2d/3d, SyncBatchNorm, subclasses that keep BatchNorm's
forward, torchvision's FrozenBatchNorm2d, and timm's BatchNormAct2d /
SyncBatchNormAct / FrozenBatchNormAct2d, which become timm's GroupNormAct
carrying the same drop and act modules.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normfold.errors import InputError, UsageError
from normfold.graph import eval_mode, is_frozen_batchnorm
from normfold.norms import BatchNormAffine, _is_norm_act, batchnorm_affine, is_batchnorm
from normfold.passes._batchnorm_common import (RankInfo, alias_map, bn_channels, bn_forward_problem, input_ranks,
                                               iter_batches, replace_module)
from normfold.passes.base import Change, Pass, PassResult, Skip

__all__ = ["BatchNormToGroupNorm", "batchnorm_to_groupnorm", "default_num_groups"]

log = logging.getLogger(__name__)

#: the largest group count the default picks (Wu & He, "Group Normalization": 32 works well)
MAX_DEFAULT_GROUPS = 32
#: fewest values a group must hold per sample: with 1 GroupNorm outputs its bias alone, with 2 it outputs
#: +-1 before the affine (only the sign of the difference survives); both throw the input away
MIN_GROUP_VALUES = 3


def _divisors_desc(c: int, limit: int) -> list[int]:
    return [g for g in range(min(c, limit), 0, -1) if c % g == 0]


def default_num_groups(num_channels: int, *, values_per_channel: int | None = None) -> int | None:
    """Largest divisor of ``num_channels`` not above 32 whose groups hold at least 3 values per sample.

    ``values_per_channel`` is the number of positions per channel and sample
    (1 on a 2-D ``(N, C)`` input, ``H*W`` on an image); None means unknown and
    is treated as enough. Returns None when no group count works (C < 3 on a
    2-D input).
    """
    for g in _divisors_desc(num_channels, MAX_DEFAULT_GROUPS):
        if values_per_channel is None or (num_channels // g) * values_per_channel >= MIN_GROUP_VALUES:
            return g
    return None


def _kind_rank(bn: nn.Module) -> int | None:
    """Tensor rank implied by the BatchNorm class alone (None for 1d and Sync, which accept several)."""
    if isinstance(bn, nn.BatchNorm2d) or type(bn).__name__ in {"FrozenBatchNorm2d", "FrozenBatchNormAct2d",
                                                               "BatchNormAct2d"}:
        return 4
    if isinstance(bn, nn.BatchNorm3d):
        return 5
    return None


@dataclass
class _Plan:
    path: str
    bn: nn.Module
    groups: int
    rank_note: str


class _Stats:
    """Per-channel float64 sums for the least-squares fit of one layer."""

    def __init__(self, channels: int, device: torch.device) -> None:
        z = lambda: torch.zeros(channels, dtype=torch.float64, device=device)  # noqa: E731
        self.n = z()
        self.sz, self.sy, self.szz, self.szy, self.syy = z(), z(), z(), z(), z()

    def add(self, zz: torch.Tensor, yy: torch.Tensor) -> None:
        # reduce over every axis but the channel axis (1)
        dims = [d for d in range(zz.dim()) if d != 1]
        self.n += zz.numel() // zz.shape[1]
        self.sz += zz.sum(dims)
        self.sy += yy.sum(dims)
        self.szz += (zz * zz).sum(dims)
        self.szy += (zz * yy).sum(dims)
        self.syy += (yy * yy).sum(dims)

    def rss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Sum of squared residuals of ``y ~ a z + b`` per channel, from the sums alone."""
        return (self.syy - 2 * a * self.szy - 2 * b * self.sy + a * a * self.szz + 2 * a * b * self.sz
                + self.n * b * b).clamp_min(0)

    def fit(self, fallback_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n.clamp_min(1)
        mz, my = self.sz / n, self.sy / n
        var_z = self.szz / n - mz * mz
        cov = self.szy / n - mz * my
        # var_z is ~0 only when a channel's group is constant on all the data: keep gamma there
        ok = var_z > 1e-12
        a = torch.where(ok, cov / torch.where(ok, var_z, torch.ones_like(var_z)), fallback_a)
        b = my - a * mz
        return a, b


class _StopForward(Exception):
    """Raised by a calibration hook to end a forward once the layer being fitted has run."""


def _run(module: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    except (_StopForward, InputError):
        raise
    except Exception as exc:
        raise InputError(f"the calibration data do not fit the model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); pass batches of model inputs") from exc


def _capture(module: nn.Module, target: nn.Module, args: tuple, kwargs: dict, calls: int | None) -> list[torch.Tensor]:
    """The inputs of every call of ``target`` during one forward, stopping after ``calls`` calls when known."""
    seen: list[torch.Tensor] = []

    def hook(m: nn.Module, a: tuple) -> None:
        seen.append(a[0].detach())
        if calls is not None and len(seen) >= calls:
            raise _StopForward

    h = target.register_forward_pre_hook(hook)
    try:
        _run(module, args, kwargs)
    except _StopForward:
        pass
    finally:
        h.remove()
    return seen


def _call_order(module: nn.Module, targets: list[nn.Module], batch: tuple[tuple, dict]) -> tuple[list[int], dict[int, int]]:
    """ids of ``targets`` in the order of their first call, and how often each is called per forward."""
    order: list[int] = []
    calls: dict[int, int] = {}
    handles = []
    for t in targets:
        def hook(m: nn.Module, a: tuple) -> None:
            if id(m) not in calls:
                order.append(id(m))
            calls[id(m)] = calls.get(id(m), 0) + 1

        handles.append(t.register_forward_pre_hook(hook))
    try:
        _run(module, *batch)
    finally:
        for h in handles:
            h.remove()
    return order, calls


class BatchNormToGroupNorm(Pass):
    """Replace every BatchNorm with GroupNorm; see the module docstring for groups and the warm start."""

    name = "batchnorm_to_groupnorm"

    def __init__(self, *, num_groups: int | None = None, calibration_data: Any = None, sequential: bool = False,
                 example_inputs: Any = None) -> None:
        if num_groups is not None and (not isinstance(num_groups, int) or isinstance(num_groups, bool)
                                       or num_groups < 1):
            raise UsageError(f"num_groups must be a positive integer, got {num_groups!r}")
        self.num_groups = num_groups
        self.calibration_data = calibration_data
        self.sequential = bool(sequential)
        self.example_inputs = example_inputs

    def call(self, module: nn.Module) -> PassResult:
        result = PassResult(module=module)
        candidates = [(p, m) for p, m in module.named_modules() if is_batchnorm(m)]
        if not candidates:
            return result
        ranks = self._ranks(module)
        plans: list[_Plan] = []
        for path, bn in candidates:
            plan_or_reason = self._plan(path, bn, ranks)
            if isinstance(plan_or_reason, str):
                result.skipped.append(Skip(self.name, (path,), plan_or_reason))
            else:
                plans.append(plan_or_reason)
        fits: dict[str, tuple[torch.Tensor, torch.Tensor, dict[str, float]] | str] = {}
        if self.calibration_data is not None and plans:
            fits = self._calibrate(module, plans)
            result.metrics["calibration"] = {p: f[2] for p, f in fits.items() if not isinstance(f, str)}
        for plan in plans:
            self._replace(module, plan, fits.get(plan.path), result)
        if ranks.unavailable:
            result.metrics["ranks"] = ranks.unavailable
        return result

    # -- analysis ---------------------------------------------------------------------------------
    def _ranks(self, module: nn.Module) -> RankInfo:
        needs_graph = any(is_batchnorm(m) for m in module.modules())
        return input_ranks(module, self.example_inputs) if needs_graph else RankInfo(unavailable="no BatchNorm")

    def _plan(self, path: str, bn: nn.Module, ranks: RankInfo) -> _Plan | str:
        problem = bn_forward_problem(bn)
        if problem:
            return problem
        c = bn_channels(bn)
        shapes = ranks.shapes.get(path)
        if shapes:
            # the smallest number of values per channel over every call decides
            per_channel = min(math.prod(s[2:]) if len(s) > 2 else 1 for s in shapes)
            rank_note = f"input {'x'.join(map(str, shapes[0][1:]))} per sample (from the graph)"
        else:
            kind_rank = _kind_rank(bn)
            if kind_rank is not None:
                per_channel = None  # an image/volume BN: spatial extent assumed
                rank_note = f"{kind_rank}-D input (from the {type(bn).__name__} kind)"
            else:
                per_channel = 1  # could be (N, C): assume the worst
                why = ranks.unavailable or ("not called in forward()" if ranks.called and path not in ranks.called
                                            else "no shape recorded")
                rank_note = f"possibly a 2-D (N, C) input: {why}"
        if self.num_groups is not None:
            g = self.num_groups
            if c % g:
                return f"num_groups={g} does not divide its {c} channels; pass a divisor of {c}"
            if per_channel is not None and (c // g) * per_channel < MIN_GROUP_VALUES:
                n_val = (c // g) * per_channel
                what = "its bias alone" if n_val == 1 else "only the sign of the difference of the two values"
                fits = default_num_groups(c, values_per_channel=per_channel)
                fix = (f"pass num_groups={fits} or another divisor of {c} at most {fits}" if fits is not None
                       else "no group count works for this layer")
                return (f"num_groups={g} leaves {n_val} value(s) per group and sample on its {rank_note}: GroupNorm "
                        f"would output {what}, whatever the input; {fix}")
        else:
            g = default_num_groups(c, values_per_channel=per_channel)
            if g is None:
                return (f"{c} channel(s) with one value each per sample ({rank_note}): no GroupNorm group can "
                        f"hold the {MIN_GROUP_VALUES} values it needs to normalize without discarding the input")
        return _Plan(path, bn, g, rank_note)

    # -- calibration --------------------------------------------------------------------------------
    def _calibrate(self, module: nn.Module, plans: list[_Plan]) -> dict[str, Any]:
        """Per-layer least-squares ``(a, b, metrics)``, or a string saying why a layer gets no warm start."""
        out: dict[str, Any] = {}
        affines: dict[str, BatchNormAffine] = {}
        with eval_mode(module):
            for plan in plans:
                aff = batchnorm_affine(plan.bn)
                if isinstance(aff, str):
                    out[plan.path] = f"no warm start: {aff}"
                else:
                    affines[plan.path] = aff
            fitted = [p for p in plans if p.path in affines]
            device = next((p.device for p in module.parameters()), None)
            if self.sequential:
                batches = list(iter_batches(self.calibration_data, device=device))
                stats = self._sequential_stats(module, fitted, affines, batches, out)
            else:
                batches = iter_batches(self.calibration_data, device=device)
                stats = self._one_pass_stats(module, fitted, affines, batches)
        for plan in fitted:
            st = stats.get(plan.path)
            if st is None:
                out[plan.path] = "no warm start: not called on the calibration data"
            elif plan.path not in out:
                out[plan.path] = self._fit(st, affines[plan.path])
        return out

    @staticmethod
    def _fit(st: _Stats, aff: BatchNormAffine) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        a, b = st.fit(aff.weight)
        n_el = float(st.n.sum())
        naive = float(st.rss(aff.weight, aff.bias).sum())
        fitted = float(st.rss(a, b).sum())
        return a, b, {"naive_rmse": math.sqrt(naive / n_el), "fitted_rmse": math.sqrt(fitted / n_el),
                      "values": int(n_el)}

    @staticmethod
    def _accumulate(stats: dict[str, _Stats], path: str, x_in: torch.Tensor, x_target: torch.Tensor, groups: int,
                    aff: BatchNormAffine) -> None:
        """Add one call: ``z`` normalizes ``x_in`` as the GroupNorm will, ``y`` is the BN eval output on ``x_target``."""
        x = x_in.detach().to(torch.float64)
        xt = x_target.detach().to(torch.float64)
        shape = (1, -1) + (1,) * (xt.dim() - 2)
        y = xt * aff.scale.to(xt.device).reshape(shape) + aff.shift.to(xt.device).reshape(shape)
        z = F.group_norm(x, groups, None, None, aff.eps)
        st = stats.get(path)
        if st is None:
            st = stats[path] = _Stats(x.shape[1], x.device)
        st.add(z, y)

    def _one_pass_stats(self, module: nn.Module, plans: list[_Plan], affines: dict[str, BatchNormAffine],
                        batches: Any) -> dict[str, _Stats]:
        """Every layer fitted on the original model's own inputs to it: one forward per batch."""
        stats: dict[str, _Stats] = {}
        handles = []
        for plan in plans:
            def hook(m: nn.Module, args: tuple, *, _p: _Plan = plan) -> None:
                self._accumulate(stats, _p.path, args[0], args[0], _p.groups, affines[_p.path])

            handles.append(plan.bn.register_forward_pre_hook(hook))
        try:
            n = 0
            for args, kwargs in batches:
                _run(module, args, kwargs)
                n += 1
        finally:
            for h in handles:
                h.remove()
        if n == 0:
            raise InputError("calibration_data yielded no batch; pass at least one batch of inputs")
        return stats

    def _sequential_stats(self, module: nn.Module, plans: list[_Plan], affines: dict[str, BatchNormAffine],
                          batches: list[tuple[tuple, dict]], out: dict[str, Any]) -> dict[str, _Stats]:
        """Layers fitted in call order, each on the inputs the already-converted layers before it produce.

        The target is still the original model's BatchNorm output, so a layer
        can make up for what the GroupNorms upstream changed. Costs up to two
        forwards per batch per layer (each stops once the layer has run).
        """
        if not batches:
            raise InputError("calibration_data yielded no batch; pass at least one batch of inputs")
        order, calls = _call_order(module, [p.bn for p in plans], batches[0])
        by_bn = {id(p.bn): p for p in plans}
        ordered = [by_bn[i] for i in order if i in by_bn]
        stats: dict[str, _Stats] = {}
        done: list[tuple[str, nn.Module, nn.Module]] = []  # (path, bn, fitted gn)
        aliases = alias_map(module)
        try:
            for plan in ordered:
                for args, kwargs in batches:
                    for _, bn, _ in done:
                        replace_module(module, bn, bn, aliases)
                    target = _capture(module, plan.bn, args, kwargs, calls.get(id(plan.bn)))
                    for _, bn, gn in done:
                        replace_module(module, bn, gn, aliases)
                    seen = _capture(module, plan.bn, args, kwargs, calls.get(id(plan.bn)))
                    for x_in, x_t in zip(seen, target):
                        self._accumulate(stats, plan.path, x_in, x_t, plan.groups, affines[plan.path])
                st = stats.get(plan.path)
                if st is None:
                    continue
                fit = self._fit(st, affines[plan.path])
                out[plan.path] = fit
                gn = self._build(plan, fit)
                gn.eval()
                done.append((plan.path, plan.bn, gn))
        finally:
            # leave the BatchNorms in place: _replace puts the final GroupNorms in
            for _, bn, _ in done:
                replace_module(module, bn, bn, aliases)
        return stats

    # -- edit ---------------------------------------------------------------------------------------
    def _build(self, plan: _Plan, fit: Any) -> nn.Module:
        """The GroupNorm (or timm GroupNormAct) for ``plan``: fitted ``(a, b)`` when ``fit`` is one, else gamma/beta."""
        bn = plan.bn
        c = bn_channels(bn)
        eps = float(getattr(bn, "eps", 1e-5))
        ref = bn.weight if isinstance(getattr(bn, "weight", None), torch.Tensor) else bn.running_mean
        dtype, device = (ref.dtype, ref.device) if ref is not None else (torch.float32, torch.device("cpu"))
        frozen = is_frozen_batchnorm(bn)  # FrozenBatchNorm2d: affine held in buffers, never trained
        has_affine = bool(getattr(bn, "affine", True))
        warm = fit is not None and not isinstance(fit, str)
        affine = has_affine or warm
        act_kind = _is_norm_act(bn)
        if act_kind:
            from timm.layers import GroupNormAct  # a timm module is only here if timm is installed

            gn: nn.Module = GroupNormAct(c, plan.groups, eps=eps, affine=affine, apply_act=False,
                                         device=device, dtype=dtype)
            gn.drop = bn.drop
            gn.act = bn.act
        else:
            gn = nn.GroupNorm(plan.groups, c, eps=eps, affine=affine, device=device, dtype=dtype)
        requires_grad = (not frozen) and (bn.weight.requires_grad if has_affine else True)
        if affine:
            if warm:
                a, b = fit[0], fit[1]
            else:
                a = bn.weight.detach().double() if has_affine else torch.ones(c, dtype=torch.float64)
                b = bn.bias.detach().double() if has_affine else torch.zeros(c, dtype=torch.float64)
            with torch.no_grad():
                gn.weight.copy_(a.to(device=device, dtype=dtype))
                gn.bias.copy_(b.to(device=device, dtype=dtype))
            gn.weight.requires_grad_(requires_grad)
            gn.bias.requires_grad_(requires_grad)
        gn.train(bn.training)
        return gn

    def _replace(self, module: nn.Module, plan: _Plan, fit: Any, result: PassResult) -> None:
        bn = plan.bn
        c = bn_channels(bn)
        frozen = is_frozen_batchnorm(bn)
        warm = fit is not None and not isinstance(fit, str)
        gn = self._build(plan, fit)
        replace_module(module, bn, gn)
        how = "warm-started by least squares on the calibration data" if warm else "gamma/beta copied"
        if isinstance(fit, str):
            how += f" ({fit})"
        details: dict[str, Any] = {"groups": plan.groups, "channels": c, "warm_start": warm,
                                   "rank": plan.rank_note}
        msg = (f"replaced {plan.path} ({type(bn).__name__}, {c} channels) by {type(gn).__name__} with "
               f"{plan.groups} groups; {how}")
        if warm:
            details.update(fit[2])
            msg += f"; output RMSE on the calibration data {fit[2]['naive_rmse']:.4g} naive -> {fit[2]['fitted_rmse']:.4g}"
        if frozen:
            msg += "; its parameters do not require grad (the BatchNorm was frozen)"
        result.changes.append(Change(self.name, "replace", (plan.path,), msg, details))


def batchnorm_to_groupnorm(model: nn.Module, *, num_groups: int | None = None, calibration_data: Any = None,
                           sequential: bool = False, example_inputs: Any = None, inplace: bool = False) -> PassResult:
    """Replace every BatchNorm (1d/2d/3d, Sync, subclasses, frozen, timm norm-act) by GroupNorm.

    ``num_groups``: groups per layer; default the largest divisor of the
    channel count not above 32 (never one channel per group on a 2-D input).
    ``calibration_data``: a Tensor or an iterable of batches (Tensor, dict, or
    ``(input, label)``); when given, each channel's GroupNorm scale and shift
    are fitted by least squares to the BatchNorm's eval output on those data
    (a warm start; see the module docstring). ``sequential=True`` fits the
    layers in call order, each on the inputs the GroupNorms before it produce
    (better, about one forward pass over the data per layer; the data are held
    in memory). ``example_inputs`` give the tensor ranks (inferred from the
    first layer when omitted).
    """
    return BatchNormToGroupNorm(num_groups=num_groups, calibration_data=calibration_data, sequential=sequential,
                                example_inputs=example_inputs)(model, inplace=inplace)
