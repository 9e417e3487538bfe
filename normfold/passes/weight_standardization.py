"""Bake weight standardization (timm's StdConv2d / ScaledStdConv2d) into plain Conv2d weights.

Math. On every forward these convs normalize their own weight with a
training-mode ``F.batch_norm`` over each output filter::

    StdConv2d:        W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)
    ScaledStdConv2d:  W_hat[o] = gain[o] * scale * (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)

with the mean and the biased variance taken over the ``C_in/groups * k_h * k_w``
weights of filter ``o`` and ``scale = gamma / sqrt(fan_in)``. ``W_hat``
depends on the parameters only, so in eval it is a constant: computed once in
float64 and stored in a plain ``nn.Conv2d`` (timm's ``Conv2dSame`` for the
``*Same`` variants that pad dynamically), the conv computes the same outputs
without the per-forward batch_norm, and a BatchNorm after it can then fold
(:func:`normfold.fold_batchnorm` runs this pass first).

Rules. Only eval-mode modules are baked: in training, the standardization
must keep following the weights as they train. A module whose weight is
shared with another module, or that has hooks, is left alone. Each baked conv
is checked against the original module's forward on a random float64 input;
a mismatch (a timm version whose forward differs) is skipped, never guessed.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from normfold.norms import set_submodule
from normfold.passes.base import Change, Pass, PassResult, Skip
from normfold.tolerances import for_dtype

__all__ = ["BakeWeightStandardization", "fold_weight_standardization", "is_weight_standardized_conv",
           "standardized_weight"]

log = logging.getLogger(__name__)

_WS_CLASSES = {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}


def is_weight_standardized_conv(m: nn.Module) -> bool:
    """timm's StdConv2d, StdConv2dSame, ScaledStdConv2d or ScaledStdConv2dSame."""
    return (type(m).__name__ in _WS_CLASSES and isinstance(m, nn.Conv2d)
            and type(m).__module__.startswith("timm."))


def standardized_weight(m: nn.Module) -> torch.Tensor:
    """The weight ``m.forward`` convolves with, in float64 (see the module docstring)."""
    w = m.weight.detach().to(torch.float64)
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    out = (flat - mean) / torch.sqrt(var + float(m.eps))
    if hasattr(m, "gain"):
        out = out * (m.gain.detach().to(torch.float64).reshape(-1, 1) * float(m.scale))
    return out.reshape(w.shape)


def _plain_conv(m: nn.Conv2d) -> nn.Conv2d:
    kw: dict[str, Any] = dict(stride=m.stride, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                              device=m.weight.device, dtype=m.weight.dtype)
    if getattr(m, "same_pad", False):
        from timm.layers import Conv2dSame  # the model is a timm model: timm is importable

        return Conv2dSame(m.in_channels, m.out_channels, m.kernel_size, padding=0, **kw)
    return nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, padding=m.padding,
                     padding_mode=m.padding_mode, **kw)


def _shared(module: nn.Module) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


def _check(original: nn.Module, w64: torch.Tensor) -> float | None:
    """Max abs difference between ``original`` and a plain conv holding ``w64``, both in float64; None when equal.

    Both run in float64 so that only a difference in what is computed shows, not the final rounding.
    """
    a = copy.deepcopy(original).to(torch.float64).eval()
    b = _plain_conv(a)
    with torch.no_grad():
        b.weight.copy_(w64)
        if a.bias is not None:
            b.bias.copy_(a.bias)
    size = max(k * d for k, d in zip(original.kernel_size, original.dilation)) + 2 * max(original.stride) + 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, original.in_channels, size, size + 1, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    if ya.shape == yb.shape and for_dtype(torch.float64).allclose(yb, ya):
        return None
    return float((ya - yb).abs().max()) if ya.shape == yb.shape else float("inf")


class BakeWeightStandardization(Pass):
    """Replace eval-mode weight-standardized convs by plain convs holding the standardized weight."""

    name = "fold_weight_standardization"

    def call(self, module: nn.Module) -> PassResult:
        result = PassResult(module=module)
        counts = _shared(module)
        targets = [(p, m) for p, m in module.named_modules() if is_weight_standardized_conv(m)]
        for path, m in targets:
            kind = type(m).__name__
            skip = lambda reason: result.skipped.append(Skip(self.name, (path,), reason))  # noqa: E731
            if m.training:
                skip(f"{kind} in training mode: baking would stop the standardization from following the "
                     "weights as they train (call model.eval() first)")
                continue
            if m._forward_hooks or m._forward_pre_hooks:
                skip(f"{kind} has forward hooks that would be lost")
                continue
            if any(counts.get(id(p), 0) > 1 for p in m.parameters(recurse=False)):
                skip(f"{kind}: a parameter is shared with another module")
                continue
            if torch.nn.utils.parametrize.is_parametrized(m):
                skip(f"{kind}: its weight is parametrized")
                continue
            w64 = standardized_weight(m)
            cast = w64.to(m.weight.dtype)
            if not torch.isfinite(cast).all():
                skip(f"{kind}: the standardized weight is not finite in {str(m.weight.dtype).replace('torch.', '')}")
                continue
            err = _check(m, w64)
            if err is not None:
                skip(f"{kind}: the baked conv does not reproduce its forward (max abs error {err:.3g} in float64); "
                     "this timm version computes something normfold does not know")
                continue
            new = _plain_conv(m)
            with torch.no_grad():
                new.weight.copy_(cast)
            new.weight.requires_grad_(m.weight.requires_grad)
            if m.bias is not None:
                new.bias = m.bias  # the same Parameter: the bias is not touched
            new.train(m.training)
            set_submodule(module, path, new)
            result.changes.append(Change(self.name, "bake", (path,),
                                         f"baked the weight standardization of {path} ({kind}) into a plain "
                                         f"{type(new).__name__}", {"out_channels": m.out_channels}))
        return result


def fold_weight_standardization(model: nn.Module, *, inplace: bool = False) -> PassResult:
    """Bake timm StdConv2d / ScaledStdConv2d (eval mode) into plain convs; see the module docstring."""
    return BakeWeightStandardization()(model, inplace=inplace)
