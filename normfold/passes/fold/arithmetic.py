"""The weight arithmetic of BatchNorm folding, written once for both IRs.

A BatchNorm in eval is ``y = s * x + t`` per channel (:func:`normfold.norms.affine_from_statistics`).

**Into output channels** (backward fold, the BatchNorm reads the layer's output):
``s * (W u + b) + t = (s W) u + (s b + t)``, so output channel ``o`` of the
weight is multiplied by ``s[o]`` and the bias becomes ``s * b + t``:

* Conv / Linear: weight ``(C_out, C_in/groups, *k)`` / ``(out, in)``; output channel on axis 0.
* ConvTranspose: weight ``(C_in, C_out/groups, *k)``; output channel
  ``o = g * (C_out/groups) + j`` is ``weight[g*C_in/groups:(g+1)*C_in/groups, j]``,
  so the rows of group ``g`` are scaled along axis 1 by ``s[g*C_out/g:(g+1)*C_out/g]``.

**Into input channels** (forward fold, the layer reads the BatchNorm's output):
``W (s * x + t) + b = (W diag(s)) x + (b + W t)``; for a conv the shift term is
``sum over the input channels j of its group and the kernel of W[o, j, k] * t[j]``
(exact only where the conv sees no zero padding: the caller checks that).

**Cast or refuse.** Everything is computed in float64 and rounded once to the
layer's dtype. A result that does not fit that dtype (float16 / bfloat16
overflow) or is not finite (``running_var + eps <= 0``, inf/NaN statistics) is
refused by :func:`cast_refusal`, the one verdict every fold path uses, before
any tensor is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from normfold.passes.fold.refusal import Refusal

__all__ = ["cast_refusal", "OutputChannelFold", "fold_output_channels", "fold_input_channels",
           "fold_into_output_channels", "layer_kind"]

#: float64 working set of one step of :meth:`OutputChannelFold.apply` (1 MiB): the fold's extra memory
#: stays bounded by this instead of growing with the largest layer, and a block that stays in the CPU's
#: cache makes widen-multiply-round three times faster than one pass over a large layer (measured on
#: resnet50's 512x512x3x3 convs: 3.1 ms in 1 MiB blocks, 10.2 ms in one 19 MiB step)
CHUNK_ELEMS = 1 << 17


def layer_kind(m: nn.Module) -> str:
    """``"conv"``, ``"conv_transpose"`` or ``"linear"`` for a Conv / ConvTranspose / Linear module."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "conv_transpose"
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    return "linear"


def cast_refusal(largest: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> Refusal | None:
    """Whether folded weights whose largest magnitude is ``largest`` (and the float64 ``bias``) fit ``dtype``.

    Rounding is monotonic, so the largest ``|w|`` overflows ``dtype`` exactly
    when any weight does: one scalar decides for the whole weight. NaN
    propagates through the max and is reported as "not finite".
    """
    ok = bool(torch.isfinite(largest.to(dtype)))
    if ok and bias is not None:
        ok = bool(torch.isfinite(bias.to(dtype)).all())
    if ok:
        return None
    if bool(torch.isfinite(largest)) and (bias is None or bool(torch.isfinite(bias).all())):
        return Refusal(f"the folded weights overflow {str(dtype).replace('torch.', '')}")
    return Refusal("the folded weights are not finite (running_var + eps <= 0 or inf/NaN statistics)")


@dataclass
class OutputChannelFold:
    """A checked fold into output channels, ready to write: :meth:`apply` scales ``weight`` in place.

    Built by :func:`fold_output_channels`, which has already refused what
    would not fit the dtype, so that a caller folding into several layers can
    check them all before writing any.
    """

    weight: torch.Tensor
    kind: str
    groups: int
    scale: torch.Tensor  # float64, one per output channel
    bias: torch.Tensor  # the folded bias, already cast to the weight's dtype

    def apply(self) -> torch.Tensor:
        """Multiply the weight by ``scale`` per output channel, in place, in float64 blocks; returns the bias.

        Each block is widened exactly, multiplied in float64 and rounded once
        on the way back, so the extra memory is one block, not a float64 copy
        of the layer. The writes go through the detached weight (same
        storage), so autograd does not see them and no ``torch.no_grad()`` is needed.
        """
        wd = self.weight.detach()
        work = wd if wd.is_contiguous() else wd.contiguous()
        s = self.scale.to(device=work.device)
        v, blocks = _row_blocks(work, self.kind, self.groups, s)
        per_row = s.view(-1, 1, 1)
        rows_per_step = max(1, CHUNK_ELEMS // max(1, v.shape[1] * v.shape[2]))
        if blocks[0][2] is None and v.shape[0] <= rows_per_step:
            # the whole layer is one step (most layers): no slicing, less per-layer overhead
            buf = v.to(torch.float64)
            buf.mul_(per_row)
            v.copy_(buf)
        else:
            buf = torch.empty((min(rows_per_step, v.shape[0]), *v.shape[1:]), dtype=torch.float64,
                              device=work.device)
            for a, b, sc in blocks:
                for i in range(a, b, rows_per_step):
                    j = min(b, i + rows_per_step)
                    out = buf[: j - i]
                    # three plain copy/mul kernels are about twice as fast on CPU as one mixed-dtype mul
                    out.copy_(v[i:j])
                    out.mul_(sc if sc is not None else per_row[i:j])
                    v[i:j].copy_(out)
        if work is not wd:
            wd.copy_(work)
        return self.bias


def _row_blocks(w: torch.Tensor, kind: str, groups: int, s: torch.Tensor
                ) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor | None]]]:
    """The weight viewed as (rows, cols, k) and its (first row, end row, scale) blocks.

    Conv/Linear: a row is an output channel, its scale ``s[row]`` (None: per row).
    ConvTranspose: the rows of group ``g`` share the scale ``s[g*C_out/g:(g+1)*C_out/g]`` along cols.
    """
    if kind == "conv_transpose":
        v = w.view(w.shape[0], w.shape[1], -1)
        rows_g, cols = v.shape[0] // groups, v.shape[1]
        return v, [(g * rows_g, (g + 1) * rows_g, s[g * cols:(g + 1) * cols].view(1, cols, 1))
                   for g in range(groups)]
    return w.view(w.shape[0], 1, -1), [(0, w.shape[0], None)]


def _exact_largest_product(w: torch.Tensor, kind: str, groups: int, s: torch.Tensor) -> torch.Tensor:
    """max |w * s| over the fold, per row (float64 scalar; NaN propagates)."""
    if not w.numel():
        return torch.zeros((), dtype=torch.float64, device=w.device)
    v, blocks = _row_blocks(w if w.is_contiguous() else w.contiguous(), kind, groups, s)
    row_max = torch.maximum(v.amax(dim=2), -v.amin(dim=2)).to(torch.float64)  # (rows, cols)
    largest = torch.zeros((), dtype=torch.float64, device=w.device)
    for a, b, sc in blocks:
        prod = row_max[a:b] * (sc[..., 0] if sc is not None else s[a:b].view(-1, 1)).abs()
        if prod.numel():
            largest = torch.maximum(largest, prod.max())
    return largest


def _surely_fits(w: torch.Tensor, s: torch.Tensor) -> bool:
    """True when ``max|w| * max|s|``, a bound on every product, fits the weight's dtype (one pass over ``w``).

    Rounding is monotonic, so then no product can overflow. False (NaN, inf,
    or a bound past the dtype's range) sends the caller to the exact check.
    """
    if not w.numel():
        return True
    lo, hi = torch.aminmax(w)  # one pass, the fastest reduction on CPU
    bound = max(float(hi), -float(lo)) * float(s.abs().max())  # float64, like the fold itself
    return bound <= torch.finfo(w.dtype).max  # False for NaN


def fold_output_channels(weight: torch.Tensor, bias: torch.Tensor | None, kind: str, groups: int,
                         scale: torch.Tensor, shift: torch.Tensor) -> OutputChannelFold | Refusal:
    """Check the fold ``scale * layer(x) + shift`` (per output channel) and prepare it; nothing is written yet.

    ``weight`` is the layer's canonical weight (see the module docstring for
    the layouts); ``scale``/``shift`` are float64.
    """
    dev = weight.device
    s = scale.to(device=dev, dtype=torch.float64)
    t = shift.to(device=dev, dtype=torch.float64)
    new_b = t.clone() if bias is None else bias.detach().to(torch.float64) * s + t
    cast_b = new_b.to(weight.dtype)
    if _surely_fits(weight.detach(), s) and bool(torch.isfinite(cast_b).all()):
        return OutputChannelFold(weight, kind, groups, s, cast_b)
    refused = cast_refusal(_exact_largest_product(weight.detach(), kind, groups, s), new_b, weight.dtype)
    if refused is not None:
        return refused
    return OutputChannelFold(weight, kind, groups, s, cast_b)


def fold_input_channels(kind: str, weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
                        s_in: torch.Tensor, t_in: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor | None] | Refusal:
    """Weights of ``layer(s_in * x + t_in)`` written as ``layer'(x)``, cast to the weight's dtype.

    * conv: weight ``(C_out, C_in/g, *k)``; output channel ``o`` of group
      ``o // (C_out/g)`` reads input channel ``g*(C_in/g) + j`` at weight
      column ``j``; the bias gains ``sum_{j,k} W[o,j,k] t[g*(C_in/g)+j]``.
    * conv_transpose: weight ``(C_in, C_out/g, *k)``, input channel on axis 0;
      only the scale is folded (the caller requires ``t == 0``: a transposed
      conv spreads a constant unevenly over its output).
    * linear: weight ``(out, in)``; columns scaled, bias gains ``W @ t``.

    Returns ``(new_weight, new_bias)`` (``new_bias`` None when there was no
    bias and nothing to add) or the :func:`cast_refusal`.
    """
    w = weight.detach().to(torch.float64)
    s = s_in.to(device=w.device, dtype=torch.float64)
    t = t_in.to(device=w.device, dtype=torch.float64)
    b = bias.detach().to(torch.float64) if bias is not None else None
    if kind == "linear":
        new_w = w * s.view(1, -1)
        db: torch.Tensor | None = w @ t
    elif kind == "conv":
        c_out, cin_g = w.shape[0], w.shape[1]
        k = w.shape[2:]
        cout_g = c_out // groups
        s_mat = s.view(groups, 1, cin_g).expand(groups, cout_g, cin_g).reshape(c_out, cin_g)
        t_mat = t.view(groups, 1, cin_g).expand(groups, cout_g, cin_g).reshape(c_out, cin_g)
        new_w = w * s_mat.view(c_out, cin_g, *([1] * len(k)))
        db = (w * t_mat.view(c_out, cin_g, *([1] * len(k)))).flatten(1).sum(1)
    elif kind == "conv_transpose":
        new_w = w * s.view(-1, *([1] * (w.dim() - 1)))
        db = None
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    if db is not None and (b is not None or bool((db != 0).any())):
        b = (b if b is not None else torch.zeros_like(db)) + db
    largest = new_w.abs().amax() if new_w.numel() else torch.zeros((), dtype=torch.float64)
    refused = cast_refusal(largest, b, weight.dtype)
    if refused is not None:
        return refused
    return new_w.to(weight.dtype), (b.to(weight.dtype) if b is not None else None)


def fold_into_output_channels(producer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> Refusal | None:
    """Make module ``producer`` compute ``scale * producer(x) + shift`` per output channel, in place.

    A missing bias is created (``b = 0``) with the weight's ``requires_grad``.
    Returns None on success, or the :class:`Refusal` (the module is untouched then).
    """
    fold = fold_output_channels(producer.weight, producer.bias, layer_kind(producer),
                                getattr(producer, "groups", 1), scale, shift)
    if isinstance(fold, Refusal):
        return fold
    new_b = fold.apply()
    if producer.bias is not None:
        producer.bias.detach().copy_(new_b)
    else:
        producer.bias = nn.Parameter(new_b, requires_grad=producer.weight.requires_grad)
    return None
