"""What normfold knows about normalization layers: kinds, and BatchNorm's eval-mode affine.

In eval mode a BatchNorm with running statistics is a per-channel affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta = s * x + t
    s = gamma / sqrt(var + eps)         t = beta - mean * s

:func:`batchnorm_affine` returns ``(s, t)`` in float64 for every BatchNorm kind
whose eval forward is exactly that map, and a reason (a string) for every one
that is not: training mode, no running statistics, or a subclass with a
forward of its own that normfold does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.graph import is_frozen_batchnorm

__all__ = ["BatchNormAffine", "batchnorm_affine", "batchnorm_problem", "affine_from_statistics", "norm_kind", "is_batchnorm",
           "batchnorm_remnant", "STANDARD_BN_FORWARDS"]

#: forwards that compute exactly F.batch_norm in eval (SyncBatchNorm does in eval, on any device)
STANDARD_BN_FORWARDS: set[Callable] = {_BatchNorm.forward, nn.SyncBatchNorm.forward}

#: BatchNorm subclasses whose forward is F.batch_norm followed by ``self.drop`` then ``self.act``
#: (timm's norm_act layers). Folding keeps drop and act as the remnant.
_NORM_ACT_NAMES = {"BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"}


@dataclass
class BatchNormAffine:
    """A BatchNorm's eval map ``y = scale * x + shift`` per channel, in float64."""

    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    @property
    def num_features(self) -> int:
        return self.scale.numel()


def is_batchnorm(m: nn.Module) -> bool:
    """BatchNorm of any kind: 1d/2d/3d, SyncBatchNorm, subclasses, torchvision's FrozenBatchNorm2d."""
    return isinstance(m, _BatchNorm) or is_frozen_batchnorm(m)


def norm_kind(m: nn.Module) -> str | None:
    """A short registry name for a normalization layer, or None."""
    name = type(m).__name__
    if is_frozen_batchnorm(m):
        return "frozen_batchnorm"
    if isinstance(m, nn.SyncBatchNorm):
        return "syncbatchnorm"
    if isinstance(m, _BatchNorm):
        return "batchnorm"
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "instancenorm"
    if isinstance(m, nn.GroupNorm):
        return "groupnorm"
    if isinstance(m, nn.LayerNorm):
        return "layernorm"
    if (hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)) or name in {"RmsNorm", "RmsNorm2d"}:
        return "rmsnorm"
    if isinstance(m, nn.LocalResponseNorm):
        return "localresponsenorm"
    if type(m).__name__ == "FrozenAffine":
        return "frozen_affine"
    return None


def _is_norm_act(m: nn.Module) -> bool:
    return type(m).__name__ in _NORM_ACT_NAMES and hasattr(m, "act") and hasattr(m, "drop")


def batchnorm_remnant(m: nn.Module) -> nn.Module:
    """What stays in a BatchNorm's place once its affine is folded away: Identity, or its drop + act."""
    if _is_norm_act(m):
        parts = [p for p in (m.drop, m.act) if not isinstance(p, nn.Identity)]
        if not parts:
            return nn.Identity()
        return parts[0] if len(parts) == 1 else nn.Sequential(*parts)
    return nn.Identity()


def batchnorm_problem(m: nn.Module) -> str | None:
    """Why BatchNorm ``m`` has no eval-mode affine (training mode, no running statistics...), or None.

    The checks of :func:`batchnorm_affine` without its arithmetic, for callers
    that decide on structure first and compute the affine only when they use it.
    """
    if is_frozen_batchnorm(m):
        return None
    if not isinstance(m, _BatchNorm):
        return f"{type(m).__name__} is not a BatchNorm"
    if type(m).forward not in STANDARD_BN_FORWARDS and not _is_norm_act(m):
        return (f"{type(m).__name__} is a BatchNorm subclass with its own forward(); normfold does not "
                "guess what it computes")
    if m.training:
        return "in training mode (call model.eval() first)"
    if not m.track_running_stats or m.running_mean is None or m.running_var is None:
        return "track_running_stats=False: it normalizes with batch statistics even in eval"
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return "lazy BatchNorm not initialized yet (run one forward first)"
    return None


def batchnorm_affine(m: nn.Module) -> BatchNormAffine | str:
    """The eval-mode affine of BatchNorm ``m`` in float64, or why there is none (:func:`batchnorm_problem`)."""
    problem = batchnorm_problem(m)
    if problem is not None:
        return problem
    eps = float(getattr(m, "eps", 1e-5))
    return affine_from_statistics(m.running_mean, m.running_var, m.weight, m.bias, eps)


def affine_from_statistics(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, eps: float) -> BatchNormAffine:
    """``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s`` in float64 (gamma 1, beta 0 when None).

    The one place the formula is written: module BatchNorms, functional ``F.batch_norm`` calls and
    ATen ``batch_norm`` ops of an ExportedProgram all come through here.
    """
    mean, var = mean.detach().double(), var.detach().double()
    w = weight.detach().double() if weight is not None else torch.ones_like(mean)
    b = bias.detach().double() if bias is not None else torch.zeros_like(mean)
    scale = w / torch.sqrt(var + eps)
    return BatchNormAffine(scale=scale, shift=b - mean * scale, mean=mean, var=var, weight=w, bias=b, eps=float(eps))


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``path`` (works in Sequential, ModuleList and ModuleDict)."""
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)
