"""Freeze BatchNorm layers into a per-channel affine module, and unfreeze them back.

Math. In eval a BatchNorm with running statistics is, per channel ``c`` on axis 1::

    y = gamma_c * (x - mean_c) / sqrt(var_c + eps) + beta_c = scale_c * x + shift_c
    scale_c = gamma_c / sqrt(var_c + eps)        shift_c = beta_c - mean_c * scale_c

:class:`FrozenAffine` computes ``x * scale + shift`` with ``scale`` and
``shift`` computed once in float64 and stored (as buffers, in the BatchNorm's
dtype): no statistics update whatever the training flag, nothing for an
optimizer to train, one multiply-add per element, and it exports to ONNX as
``Mul`` + ``Add``. The difference with the BatchNorm's eval output is one
rounding of ``scale`` and ``shift``.

Unlike torchvision's FrozenBatchNorm2d it takes any rank (1d/2d/3d) and does
not recompute ``rsqrt`` every call. It also keeps, by default, clones of the
BatchNorm's own weight, bias and statistics (buffers ``bn_*``) and its class,
so :func:`unfreeze_batchnorm` gives back the same BatchNorm (same class, same
state_dict, eval output identical) to continue training it. With
``keep_statistics=False`` only ``scale`` and ``shift`` are kept; unfreezing
then builds a BatchNorm with ``gamma = scale, beta = shift``, mean 0, variance
1 and ``eps = 0``, whose eval output is the affine again (re-estimate its
statistics before training it). Its dimensionality comes from the class
remembered at freezing time, or from the rank of the layer's input measured
on example inputs.

Freezing uses the running statistics whatever the training flag: freezing a
model in training mode is the point (fine-tune the rest, keep the BatchNorm
statistics fixed). A BatchNorm without running statistics has no affine to
freeze and is skipped. torchvision's FrozenBatchNorm2d and timm's
FrozenBatchNormAct2d are already frozen (skipped by freeze); unfreeze turns
them into BatchNorm2d / BatchNormAct2d.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.graph import eval_mode, is_frozen_batchnorm
from normfold.norms import _is_norm_act
from normfold.passes._batchnorm_common import (bn_forward_problem, maybe_example_inputs, module_internals,
                                               replace_module)
from normfold.passes.base import Change, Pass, PassResult, Skip

__all__ = ["FrozenAffine", "FreezeBatchNorm", "UnfreezeBatchNorm", "freeze_batchnorm", "unfreeze_batchnorm"]

log = logging.getLogger(__name__)

_STAT_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_RANK_TO_CLASS: dict[int, type[_BatchNorm]] = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d,
                                               5: nn.BatchNorm3d}


class FrozenAffine(nn.Module):
    """``y = x * scale + shift`` per channel on axis 1 (a frozen BatchNorm); then ``drop`` and ``act`` if given.

    Buffers ``scale`` and ``shift`` (shape ``(C,)``). With
    ``keep_statistics=True`` it also holds ``bn_weight``, ``bn_bias``,
    ``bn_running_mean``, ``bn_running_var`` and ``bn_num_batches_tracked``:
    the BatchNorm it was made from, for :func:`unfreeze_batchnorm`.
    """

    def __init__(self, num_features: int, *, keep_statistics: bool = False, drop: nn.Module | None = None,
                 act: nn.Module | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.register_buffer("scale", torch.ones(num_features, **dd))
        self.register_buffer("shift", torch.zeros(num_features, **dd))
        for name in _STAT_NAMES:
            if keep_statistics:
                if name == "num_batches_tracked":
                    t = torch.zeros((), dtype=torch.long, device=device)
                else:
                    t = (torch.zeros if name in ("bias", "running_mean") else torch.ones)(num_features, **dd)
                self.register_buffer("bn_" + name, t)
            else:
                self.register_buffer("bn_" + name, None)
        # timm BatchNormAct2d: the activation it carried keeps running after the affine
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        #: the BatchNorm class this came from, and its configuration (eps, momentum, ...); not in the state_dict
        self.source_class: type[nn.Module] | None = None
        self.source_attrs: dict[str, Any] = {}
        self.source_requires_grad: bool = True

    @property
    def keeps_statistics(self) -> bool:
        return self.bn_running_mean is not None and self.bn_running_var is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x = x * self.scale.reshape(shape) + self.shift.reshape(shape)
        return self.act(self.drop(x))

    def extra_repr(self) -> str:
        src = f", from={self.source_class.__name__}" if self.source_class is not None else ""
        return f"{self.num_features}{src}"


def _bn_dtype_device(bn: nn.Module) -> tuple[torch.dtype, torch.device]:
    for name in ("weight", "running_mean"):
        t = getattr(bn, name, None)
        if isinstance(t, torch.Tensor):
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


class FreezeBatchNorm(Pass):
    """Replace every BatchNorm with running statistics by a :class:`FrozenAffine`."""

    name = "freeze_batchnorm"

    def __init__(self, *, keep_statistics: bool = True) -> None:
        self.keep_statistics = keep_statistics

    def call(self, module: nn.Module) -> PassResult:
        result = PassResult(module=module)
        for path, bn in list(module.named_modules()):
            if is_frozen_batchnorm(bn):
                result.skipped.append(Skip(self.name, (path,), f"{type(bn).__name__} is already frozen"))
                continue
            if not isinstance(bn, _BatchNorm):
                continue
            problem = bn_forward_problem(bn)
            if problem is None and (not bn.track_running_stats or bn.running_mean is None or bn.running_var is None):
                problem = ("track_running_stats=False: it normalizes with batch statistics, there is no affine "
                           "to freeze")
            if problem:
                result.skipped.append(Skip(self.name, (path,), problem))
                continue
            frozen = self._freeze(bn)
            if isinstance(frozen, str):
                result.skipped.append(Skip(self.name, (path,), frozen))
                continue
            replace_module(module, bn, frozen)
            result.changes.append(Change(self.name, "freeze", (path,),
                                         f"froze {path} ({type(bn).__name__}, {bn.num_features} channels) into "
                                         "FrozenAffine", {"channels": bn.num_features}))
        return result

    def _freeze(self, bn: _BatchNorm) -> FrozenAffine | str:
        dtype, device = _bn_dtype_device(bn)
        mean = bn.running_mean.detach().double()
        var = bn.running_var.detach().double()
        n = mean.numel()
        w = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
        b = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
        scale = w / torch.sqrt(var + float(bn.eps))
        shift = b - mean * scale
        s, t = scale.to(dtype), shift.to(dtype)
        if not (torch.isfinite(s).all() and torch.isfinite(t).all()):
            return f"its affine is not finite in {str(dtype).replace('torch.', '')} (running_var + eps <= 0, inf/NaN)"
        norm_act = _is_norm_act(bn)
        fa = FrozenAffine(n, keep_statistics=self.keep_statistics, device=device, dtype=dtype,
                          drop=bn.drop if norm_act else None, act=bn.act if norm_act else None)
        with torch.no_grad():
            fa.scale.copy_(s)
            fa.shift.copy_(t)
            if self.keep_statistics:
                # clones: the frozen module must not share storage with the BatchNorm it replaces
                for name in _STAT_NAMES:
                    src = getattr(bn, name, None)
                    if src is None:
                        setattr(fa, "bn_" + name, None)
                    else:
                        setattr(fa, "bn_" + name, src.detach().clone())
        fa.source_class = type(bn)
        fa.source_attrs = {k: v for k, v in bn.__dict__.items() if k not in module_internals()}
        fa.source_requires_grad = bool(bn.weight.requires_grad) if bn.weight is not None else True
        # children other than drop/act (a subclass may carry some) travel so unfreeze can put them back
        for cname, child in bn.named_children():
            if cname not in ("drop", "act"):
                fa.add_module(cname, child)
        fa.train(bn.training)
        return fa


class UnfreezeBatchNorm(Pass):
    """Replace every :class:`FrozenAffine` (and torchvision/timm frozen BN) by a trainable BatchNorm."""

    name = "unfreeze_batchnorm"

    def __init__(self, *, example_inputs: Any = None) -> None:
        self.example_inputs = example_inputs

    def call(self, module: nn.Module) -> PassResult:
        result = PassResult(module=module)
        targets = [(p, m) for p, m in module.named_modules()
                   if isinstance(m, FrozenAffine) or is_frozen_batchnorm(m)]
        if not targets:
            return result
        ranks: dict[str, set[int]] | str | None = None
        for path, m in targets:
            if is_frozen_batchnorm(m):
                new = self._from_vision_frozen(m)
                how = "from its weight, bias and running statistics"
            elif m.source_class is not None and m.keeps_statistics:
                new = self._restore(m, m.source_class)
                how = "the BatchNorm kept at freezing time"
            else:
                base = _dims_class(m.source_class) if m.source_class is not None else None
                if base is None:
                    # SyncBatchNorm, or a FrozenAffine built by hand: the rank of its input decides
                    if ranks is None:
                        ranks = self._probe_ranks(module, targets)
                    if isinstance(ranks, str):
                        result.skipped.append(Skip(self.name, (path,), ranks))
                        continue
                    seen = ranks.get(path, set())
                    classes = {_RANK_TO_CLASS.get(r) for r in seen}
                    if not seen:
                        result.skipped.append(Skip(self.name, (path,), "not called on the example inputs, so its "
                                                   "dimensionality (1d/2d/3d) is unknown"))
                        continue
                    if None in classes or len(classes) != 1:
                        result.skipped.append(Skip(self.name, (path,), f"its input has rank(s) {sorted(seen)}: "
                                                   "no single BatchNorm1d/2d/3d accepts that"))
                        continue
                    base = classes.pop()
                new = self._from_affine(m, base)
                how = ("its scale and shift only (no statistics were kept): mean 0, var 1, eps 0; re-estimate "
                       "the statistics before training it")
            replace_module(module, m, new)
            result.changes.append(Change(self.name, "unfreeze", (path,),
                                         f"unfroze {path} ({type(m).__name__}) into {type(new).__name__} ({how})",
                                         {"to": type(new).__name__}))
        return result

    # The rank of a FrozenAffine's input: torch.fx traces through it (it is not a registered norm leaf),
    # so the rank is read by a forward pre-hook during one eval forward on the example inputs.
    def _probe_ranks(self, module: nn.Module, targets: list[tuple[str, nn.Module]]) -> dict[str, set[int]] | str:
        inputs, why = maybe_example_inputs(module, self.example_inputs)
        if inputs is None:
            return f"cannot tell whether it is 1d, 2d or 3d ({why})"
        seen: dict[str, set[int]] = {}
        handles = []
        for path, m in targets:
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, _p=path: seen.setdefault(_p, set()).add(args[0].dim())))
        try:
            args = inputs if isinstance(inputs, tuple) else (inputs,)
            with eval_mode(module), torch.no_grad():
                module(*args)
        except Exception as exc:
            return f"the example inputs do not run through the model ({type(exc).__name__}); pass example_inputs"
        finally:
            for h in handles:
                h.remove()
        return seen

    @staticmethod
    def _restore(fa: FrozenAffine, cls: type[nn.Module]) -> nn.Module:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update(fa.source_attrs)
        rg = fa.source_requires_grad
        for name in ("weight", "bias"):
            t = getattr(fa, "bn_" + name)
            new._parameters[name] = nn.Parameter(t.detach().clone(), requires_grad=rg) if t is not None else None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            t = getattr(fa, "bn_" + name)
            new._buffers[name] = t.detach().clone() if t is not None else None
        for cname, child in fa.named_children():
            if cname in ("drop", "act") and not (_has_act_attrs(cls)):
                continue
            new._modules[cname] = child
        new.training = fa.training
        return new

    @staticmethod
    def _from_affine(fa: FrozenAffine, base: type[_BatchNorm]) -> nn.Module:
        dtype, device = fa.scale.dtype, fa.scale.device
        bn = base(fa.num_features, eps=0.0, device=device, dtype=dtype)
        with torch.no_grad():
            bn.weight.copy_(fa.scale)
            bn.bias.copy_(fa.shift)
        if not isinstance(fa.act, nn.Identity) or not isinstance(fa.drop, nn.Identity):
            # the activation a timm BatchNormAct2d carried must keep running after the BatchNorm
            if base is nn.BatchNorm2d:
                from timm.layers.norm_act import BatchNormAct2d  # FrozenAffine only has an act when timm made it

                nb = BatchNormAct2d(fa.num_features, eps=0.0, apply_act=False, device=device, dtype=dtype)
                nb.load_state_dict(bn.state_dict())
                nb.drop, nb.act = fa.drop, fa.act
                bn = nb
            else:
                bn = nn.Sequential(bn, fa.drop, fa.act)  # type: ignore[assignment]
        bn.train(fa.training)
        return bn

    @staticmethod
    def _from_vision_frozen(m: nn.Module) -> nn.Module:
        dtype, device = m.weight.dtype, m.weight.device
        c = m.weight.numel()
        eps = float(getattr(m, "eps", 1e-5))
        if hasattr(m, "act") and hasattr(m, "drop"):
            from timm.layers.norm_act import BatchNormAct2d

            bn: nn.Module = BatchNormAct2d(c, eps=eps, apply_act=False, device=device, dtype=dtype)
            bn.drop, bn.act = m.drop, m.act
        else:
            bn = nn.BatchNorm2d(c, eps=eps, device=device, dtype=dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(getattr(m, name))
        bn.train(m.training)
        return bn


def _dims_class(cls: type) -> type[_BatchNorm] | None:
    """BatchNorm1d/2d/3d that ``cls`` is (a subclass of), or None (SyncBatchNorm has no dimensionality)."""
    for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        if issubclass(cls, c):
            return c
    return None


def _has_act_attrs(cls: type) -> bool:
    return cls.__name__ in {"BatchNormAct2d", "SyncBatchNormAct"}


def freeze_batchnorm(model: nn.Module, *, keep_statistics: bool = True, inplace: bool = False) -> PassResult:
    """Replace every BatchNorm with running statistics by a :class:`FrozenAffine` ``x * scale + shift``.

    ``keep_statistics`` keeps clones of each BatchNorm's parameters and
    statistics inside the FrozenAffine so that :func:`unfreeze_batchnorm`
    restores it exactly; False keeps only scale and shift (a leaner state_dict).
    """
    return FreezeBatchNorm(keep_statistics=keep_statistics)(model, inplace=inplace)


def unfreeze_batchnorm(model: nn.Module, *, example_inputs: Any = None, inplace: bool = False) -> PassResult:
    """Turn every :class:`FrozenAffine` (and torchvision/timm frozen BatchNorm) back into a trainable BatchNorm.

    The BatchNorm kept by :func:`freeze_batchnorm` comes back as it was;
    otherwise one is built whose eval output equals the affine, of the
    dimensionality of its input on ``example_inputs`` (inferred when omitted).
    """
    return UnfreezeBatchNorm(example_inputs=example_inputs)(model, inplace=inplace)
