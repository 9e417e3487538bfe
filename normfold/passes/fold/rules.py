"""The facts about layers and ops that both graph readers share, each written once.

* which activations exist (a fold never crosses one), by name, for torch
  functions, tensor methods and ATen op packets alike;
* which Conv subclasses are still linear in ``(weight, bias)`` (timm's
  ``Conv2dSame``: pads, then calls ``F.conv2d`` with its own weight);
* :func:`producer_problem`: whether a Conv / ConvTranspose / Linear *module*
  can take a per-channel affine into its weights at all (its own forward, a
  parametrized weight...), the module-level half of layer eligibility (the
  graph-level half, called twice / output read twice / tied weights, is in
  :meth:`normfold.passes.fold.fx_reader.ModuleReader.layer`);
* when a padding or an average pool keeps the BatchNorm's shift (``t``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ACTIVATION_NAMES", "is_activation_name", "SAME_PADDING_CONVS", "producer_problem", "conv_zero_pads",
           "avg_pool_keeps_shift", "shared_parameters", "out_channels"]

#: activations by bare name (torch function, tensor method, ATen packet; a trailing ``_`` is the in-place form)
ACTIVATION_NAMES = frozenset({
    "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu", "elu", "selu",
    "celu", "mish", "softplus", "hardtanh", "prelu", "_prelu_kernel", "rrelu", "glu", "softmax", "_softmax",
    "log_softmax", "_log_softmax", "softsign", "tanhshrink", "hardshrink", "softshrink", "logsigmoid",
    "clamp", "clamp_min", "clamp_max", "threshold",
})


def is_activation_name(name: str) -> bool:
    """True for an activation's function / method / ATen name, in-place forms included."""
    return name in ACTIVATION_NAMES or name.rstrip("_") in ACTIVATION_NAMES or name.strip("_") in ACTIVATION_NAMES


#: Conv subclasses whose forward pads with zeros and then calls F.conv with self.weight / self.bias:
#: still linear in (weight, bias), so output-channel scaling is exact; their padding is "same" (zeros
#: whenever the kernel is larger than 1)
SAME_PADDING_CONVS = frozenset({"Conv2dSame", "Conv2dSameExport"})

_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_CONVT_FORWARDS = {nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward}


def producer_problem(layer: nn.Module) -> str | None:
    """Why module ``layer`` cannot take a per-channel affine into its weights, or None when it can.

    A phrase, not a full sentence: callers put the layer's path in front of it.
    """
    fwd = type(layer).forward
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        if fwd not in _CONVT_FORWARDS:
            return f"{type(layer).__name__} overrides forward()"
    elif isinstance(layer, nn.modules.conv._ConvNd):
        if fwd not in _CONV_FORWARDS and type(layer).__name__ not in SAME_PADDING_CONVS:
            return f"{type(layer).__name__} overrides forward() (run fold_batchnorm after baking its weight)"
    elif isinstance(layer, nn.Linear):
        if fwd is not nn.Linear.forward:
            return f"{type(layer).__name__} overrides forward()"
    else:
        return f"{type(layer).__name__} is not a Conv, ConvTranspose or Linear"
    if torch.nn.utils.parametrize.is_parametrized(layer):
        return "its weight is parametrized (weight_norm/spectral_norm): run fold_weight_norm first"
    if hasattr(layer, "weight_g") or hasattr(layer, "weight_orig"):
        return "its weight is recomputed by a weight_norm/spectral_norm hook: run fold_weight_norm first"
    if not isinstance(layer.weight, torch.Tensor) or not layer.weight.is_floating_point():
        return "its weight is not a floating-point tensor"
    return None


def out_channels(layer: nn.Module) -> int:
    """Output channels (features) of a Conv / ConvTranspose / Linear module."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def conv_zero_pads(m: nn.Module) -> bool:
    """True when conv module ``m`` pads its input with zeros (static padding or timm's dynamic 'SAME')."""
    if type(m).__name__ in SAME_PADDING_CONVS:
        return any(k > 1 for k in m.kernel_size)  # pad_same pads whenever the kernel is larger than 1
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return False
        pads = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation)]
    else:
        pads = list(m.padding)
    return any(pads) and m.padding_mode == "zeros"


def _any_nonzero(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return any(_any_nonzero(x) for x in v)
    if isinstance(v, str):
        return v != "valid"
    return bool(v)


def avg_pool_keeps_shift(padding: Any, count_include_pad: Any, divisor_override: Any) -> tuple[bool, str]:
    """(keeps ``t``, why not): an average pool carries the shift unless it averages in zeros or divides otherwise."""
    if divisor_override:
        return False, f"divides by divisor_override={divisor_override} instead of the window size"
    if count_include_pad is not False and _any_nonzero(padding):
        return False, "counts its zero padding (count_include_pad=True)"
    return True, ""


def shared_parameters(module: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every module path that owns it (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for mpath, m in module.named_modules(remove_duplicate=False):
        for p in m._parameters.values():  # the dict itself: named_parameters() costs 10x more per module
            if p is not None:
                lst = owners.setdefault(id(p), [])
                if mpath not in lst:
                    lst.append(mpath)
    return owners
