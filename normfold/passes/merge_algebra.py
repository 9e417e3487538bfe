"""The algebra of branch merging: every tensor of a region as one convolution of the region's input.

Shared by the two readers: the nn.Module pass (:mod:`normfold.passes.merge_branches`, torch.fx
graphs of blocks) and the ExportedProgram pass (:mod:`normfold.passes.merge_program`, ATen ops).
Each reader turns the ops it knows into terms (:func:`conv_term`, :func:`linear_term`,
:func:`batchnorm_term`, :func:`pool_term`); :class:`_Analysis` combines them at adds, scales and
chains; :func:`mergeable` decides whether a region's term may be written as one conv.

The algebra. Every tensor of a region is a *term*: ``conv(x; W, b)`` with a
kernel ``W`` of shape ``(C_out, C_in/groups, *k)``, a bias, a stride, a
dilation and a padding ``lo`` before / ``hi`` after each spatial axis, all in
float64. The rules that build terms:

* a conv module is its own term; a BatchNorm in eval (:func:`normfold.norms.batchnorm_affine`,
  ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``) and a per-channel
  constant scale are the diagonal term ``W[c, 0] = s_c`` (groups = C); the
  identity is the one-hot kernel ``s_c = 1``; an ``AvgPool`` (zero padding
  counted, no ceil mode) is the uniform depthwise kernel ``1/prod(k)``.
* ``a + b`` (and ``a - b``) of two terms of the same ``x``: both kernels are
  zero-padded to the smallest kernel covering both, with taps aligned
  (same stride; same dilation where a kernel has more than one tap; the
  difference of the ``lo`` paddings a multiple of the dilation; the same
  slack ``hi - reach`` so that both produce the same output size), the groups
  brought to their gcd (a conv with ``g`` groups is a block-diagonal conv with
  any ``d | g`` groups), then ``W = W_a +- W_b``, ``b = b_a +- b_b``. Zero-padded
  taps read zeros or real inputs times zero, so the sum is exact.
* ``op(T)`` where ``op`` is pointwise (1x1, stride 1, no padding):
  ``W[o, i] = sum_m W_op[o, m] W_T[m, i]``, ``b = W_op b_T + b_op`` -- exact. A
  BatchNorm or a scale after the add is this case; a 1x1 conv is taken in only
  after a merged sum (a plain conv -> 1x1 chain is not a re-parameterizable block).
* ``op(T)`` where ``T`` has one tap and stride 1 and ``op`` has a kxk kernel (the 1x1 ->
  kxk rule, the avg-pool branch of DBB): ``W[o, i, k] = sum_m W_op[o, m, k] W_T[m, i]``,
  ``b = b_op + sum_{m,k} W_op[o, m, k] b_T[m]``, padding ``lo_op + lo_T`` / ``hi_op + hi_T``.
  Exact when ``op`` reads no padding or ``b_T = 0``: ``op`` pads ``T``'s output with zeros where
  the merged conv would see ``b_T``. Otherwise the branch is left, with that reason.
* a pointwise ``T`` zero-padded by ``p`` on every side whose border is then written with a
  per-channel constant ``c`` (DBB's ``BNAndPadLayer``, read by the module pass) is, when
  ``c = b_T``, ``T`` with padding ``lo = hi = p``: a 1x1 conv of ``x`` with padding ``p`` reads
  zeros at the border and gives ``b_T`` there. The kxk conv with padding 0 after it then
  composes by the rule above into one conv with padding ``p``. Another ``c`` is refused, naming both.
* an ``nn.Linear`` is a pointwise term of rank 0 on the *last* axis: Linears of one
  input, the identity and scalars add and compose into one Linear (RepViT's
  ``(head(x) + head_dist(x)) / 2``), exact on a tensor of any rank. A Linear does
  not meet a BatchNorm, a conv or a per-channel scale (they act on axis 1, the
  same axis only on an (N, C) tensor, which the graph does not show).
* pass-throughs (``nn.Identity``, eval dropout; clone and same-dtype casts in a
  program) are the identity: an op behind one reads the branch input itself.
"""

from __future__ import annotations

import abc
import logging
import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from normfold.norms import BatchNormAffine

__all__ = ["PASS_NAME", "batchnorm_term", "conv_term", "linear_term", "mergeable", "pool_term", "region_tops",
           "worth_merging"]

log = logging.getLogger(__name__)

PASS_NAME = "merge_branches"

_CONV_FORWARDS = {nn.Conv1d.forward: 1, nn.Conv2d.forward: 2, nn.Conv3d.forward: 3}
_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_PASS_THROUGH = (nn.Identity,)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ADD = {operator.add, torch.add, "add"}
_SUB = {operator.sub, torch.sub, "sub"}
_MUL = {operator.mul, torch.mul, "mul"}
_DIV = {operator.truediv, torch.div, "div"}
_NEG = {operator.neg, torch.neg, "neg"}
#: ops evaluated on constants (parameters, buffers, numbers): layer-scale ``gamma.view(1, -1, 1, 1)`` and the like
_CONST_METHODS = {"view", "reshape", "unsqueeze", "squeeze", "flatten", "contiguous", "float", "double",
                  "to", "detach", "mul", "add", "sub", "div", "neg"}
_CONST_FUNCTIONS = {operator.mul, operator.add, operator.sub, operator.truediv, operator.neg, torch.sqrt,
                    torch.unsqueeze, torch.reshape, torch.squeeze, torch.flatten, torch.mul, torch.add}
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


# ----------------------------------------------------------------------------------------------- terms


@dataclass
class _Term:
    """A tensor of a region as one convolution of ``root``: ``conv(root; weight, bias, stride, ...)``.

    ``weight`` is float64 ``(C_out, C_in/groups, *k)``. A *uniform* term (``groups is None``) is a
    depthwise kernel the same for every channel whose count is not known yet (identity, avg-pool,
    a scalar): ``weight`` is ``(1, 1, *k)`` and ``bias`` ``(1,)``. ``rank`` (spatial dims) is None for
    a pointwise term met before any op that fixes it; its kernel then has no spatial dims.
    """

    root: torch.fx.Node
    weight: torch.Tensor
    bias: torch.Tensor
    groups: int | None
    rank: int | None
    stride: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    lo: tuple[int, ...] = ()
    hi: tuple[int, ...] = ()
    #: region nodes this term replaces (the root excluded), in the order they were absorbed
    nodes: list[torch.fx.Node] = field(default_factory=list)
    #: nodes whose terms this one absorbed directly (where a too-costly merge falls back to)
    inputs: list[torch.fx.Node] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    branches: int = 1
    merges: int = 0
    convs: int = 0
    #: multiply-adds of the ops replaced, per pixel of ``root``
    cost: float = 0.0
    #: cost per channel of ops met while the channel count was unknown (an avg-pool on the identity)
    uniform_cost: float = 0.0
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    requires_grad: bool = False
    #: an ``nn.Linear`` (rank 0): it acts on the last axis, which is the channel axis of an (N, C) tensor only
    linear: bool = False
    #: why this op could not take in the term before it (it starts a new term at its input)
    refusal: str | None = None

    @property
    def uniform(self) -> bool:
        return self.groups is None

    @property
    def cout(self) -> int | None:
        return None if self.uniform else self.weight.shape[0]

    @property
    def cin(self) -> int | None:
        return None if self.uniform else self.weight.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    def is_one_tap(self) -> bool:
        """1 tap on every axis and stride 1; padding allowed (a padded 1x1 conv)."""
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride)

    def is_pointwise(self) -> bool:
        """1 tap on every axis, stride 1, no padding (or no spatial axes known yet)."""
        return all(k == 1 for k in self.kernel) and all(s == 1 for s in self.stride) and \
            not any(self.lo) and not any(self.hi)

    def is_diagonal(self) -> bool:
        """A per-channel scale: pointwise and one input per output channel."""
        return self.is_pointwise() and self.weight.shape[1] == 1 and (self.uniform or self.groups == self.cout)

    def conv_macs(self) -> float:
        """Multiply-adds of this term as one conv, per pixel of ``root`` (0 while channels are unknown)."""
        if self.uniform:
            return 0.0
        return self.weight.numel() / math.prod(self.stride or (1,))


def _identity(root: torch.fx.Node) -> _Term:
    one = torch.ones(1, 1, dtype=torch.float64)
    return _Term(root=root, weight=one, bias=torch.zeros(1, dtype=torch.float64), groups=None, rank=None)


def _is_plain_identity(t: _Term) -> bool:
    """``t`` is its root unchanged: nothing but pass-through ops (Identity, eval dropout, clone) since the root."""
    return t.uniform and t.is_pointwise() and t.weight.numel() == 1 and float(t.weight.reshape(-1)[0]) == 1.0 \
        and not bool(t.bias.ne(0).any()) and not t.convs and not t.merges


def _with_rank(t: _Term, rank: int | None) -> _Term | str:
    if rank is None or t.rank == rank:
        return t
    if t.rank is not None:
        return f"branches have {t.rank} and {rank} spatial dims"
    w = t.weight.reshape(*t.weight.shape[:2], *([1] * rank))
    return replace(t, weight=w, rank=rank, stride=(1,) * rank, dilation=(1,) * rank, lo=(0,) * rank, hi=(0,) * rank)


def _with_channels(t: _Term, channels: int | None) -> _Term | str:
    """Give a uniform term its channel count (depthwise: ``groups = channels``)."""
    if channels is None or not t.uniform:
        if channels is not None and t.cout != channels:
            return f"channel counts differ ({t.cout} vs {channels})"
        return t
    w = t.weight.expand(channels, *t.weight.shape[1:]).clone()
    return replace(t, weight=w, bias=t.bias.expand(channels).clone(), groups=channels,
                   cost=t.cost + t.uniform_cost * channels, uniform_cost=0.0)


def _f64(t: _Term) -> _Term:
    """``t`` with its kernel in float64 on the CPU, where the arithmetic happens."""
    if t.weight.dtype == torch.float64 and t.weight.device.type == "cpu":
        return t
    return replace(t, weight=t.weight.double().cpu())


def _regroup(t: _Term, groups: int) -> _Term:
    """The same conv written with ``groups`` groups (``groups`` divides ``t.groups``): block-diagonal."""
    if t.uniform or t.groups == groups:
        return t
    t = _f64(t)
    g, r = t.groups, t.groups // groups
    cout, cin_g = t.weight.shape[0], t.weight.shape[1]
    co = cout // g
    k = t.kernel
    wg = t.weight.reshape(groups, r, co, cin_g, *k)
    out = torch.zeros(groups, r, co, r, cin_g, *k, dtype=t.weight.dtype)
    idx = torch.arange(r)
    # out[:, j, :, j] = wg[:, j]: the j-th small group sits on the diagonal of its larger group
    out[:, idx, :, idx] = wg.transpose(0, 1)
    return replace(t, weight=out.reshape(cout, r * cin_g, *k), groups=groups)


def _axes_disagree(a: _Term, b: _Term) -> str | None:
    """Why a Linear term cannot meet a term that acts on axis 1 (a BatchNorm, a conv, a channel scale).

    A Linear acts on the last axis, the others on axis 1: the same axis only for an (N, C) tensor,
    which a module graph does not show. Linears, identities and scalars meet on any tensor (a sum
    of Linears of one input is the Linear of the summed weights, whatever its rank).
    """
    if a.linear == b.linear:
        return None
    other = b if a.linear else a
    if other.uniform:
        return None
    return (f"a Linear ({(a if a.linear else b).paths[:1]}) acts on the last axis and "
            f"{other.paths[:1] or 'a per-channel op'} on axis 1")


def _same_rank(a: _Term, b: _Term) -> tuple[_Term, _Term] | str:
    """Both terms at the spatial rank one of them has (a pointwise term of unknown rank takes the other's)."""
    rank = a.rank if a.rank is not None else b.rank
    a2, b2 = _with_rank(a, rank), _with_rank(b, rank)
    if isinstance(a2, str):
        return a2
    if isinstance(b2, str):
        return b2
    return a2, b2


def _common(a: _Term, b: _Term) -> tuple[_Term, _Term] | str:
    """Bring two terms to the same rank, channel count and groups."""
    why = _axes_disagree(a, b)
    if why:
        return why
    ranked = _same_rank(a, b)
    if isinstance(ranked, str):
        return ranked
    a2, b2 = ranked
    a2, b2 = _with_channels(a2, b2.cout), _with_channels(b2, a2.cout)
    if isinstance(a2, str):
        return a2
    if isinstance(b2, str):
        return b2
    if not a2.uniform:
        if a2.cin != b2.cin:
            return f"branches read {a2.cin} and {b2.cin} channels"
        g = math.gcd(a2.groups, b2.groups)
        a2, b2 = _regroup(a2, g), _regroup(b2, g)
    return a2, b2


def _merged_meta(a: _Term, b: _Term, **kw: Any) -> dict[str, Any]:
    return dict(nodes=a.nodes + b.nodes, paths=a.paths + b.paths, convs=a.convs + b.convs,
                cost=a.cost + b.cost, uniform_cost=a.uniform_cost + b.uniform_cost, dtype=a.dtype or b.dtype, device=a.device or b.device,
                requires_grad=a.requires_grad or b.requires_grad, linear=a.linear or b.linear, **kw)


def _add(a: _Term, b: _Term, sign: float) -> _Term | str:
    """``a + sign * b`` on the same root: kernels padded to the covering kernel, taps aligned."""
    a, b = _f64(a), _f64(b)
    pair = _common(a, b)
    if isinstance(pair, str):
        return pair
    a, b = pair
    stride, dil, lo, hi, k_new, pads_a, pads_b = [], [], [], [], [], [], []
    for d in range(a.rank or 0):
        ka, kb = a.kernel[d], b.kernel[d]
        if a.stride[d] != b.stride[d]:
            return f"strides differ ({a.stride} vs {b.stride})"
        da = a.dilation[d] if ka > 1 else None
        db = b.dilation[d] if kb > 1 else None
        if da is not None and db is not None and da != db:
            return f"dilations differ ({a.dilation} vs {b.dilation})"
        dd = da or db or 1
        # tap j of a reads position out*stride - lo + j*dil; reach = position of the last tap
        reach_a, reach_b = (ka - 1) * dd - a.lo[d], (kb - 1) * dd - b.lo[d]
        if a.hi[d] - reach_a != b.hi[d] - reach_b:
            return f"paddings do not line up (padding {a.lo}/{a.hi} with kernel {a.kernel} vs {b.lo}/{b.hi} with {b.kernel})"
        if (a.lo[d] - b.lo[d]) % dd:
            return f"taps do not line up (padding {a.lo} vs {b.lo} with dilation {dd})"
        lo_n, reach_n = max(a.lo[d], b.lo[d]), max(reach_a, reach_b)
        k_n = (reach_n + lo_n) // dd + 1
        pads_a.append(((lo_n - a.lo[d]) // dd, k_n - ka - (lo_n - a.lo[d]) // dd))
        pads_b.append(((lo_n - b.lo[d]) // dd, k_n - kb - (lo_n - b.lo[d]) // dd))
        stride.append(a.stride[d]), dil.append(dd), lo.append(lo_n), hi.append(reach_n + a.hi[d] - reach_a)
        k_new.append(k_n)

    def padded(w: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad wants the last axis first
        return F.pad(w, flat) if any(flat) else w

    w = padded(a.weight, pads_a) + sign * padded(b.weight, pads_b)
    return _Term(root=a.root, weight=w, bias=a.bias + sign * b.bias, groups=a.groups, rank=a.rank,
                 stride=tuple(stride), dilation=tuple(dil), lo=tuple(lo), hi=tuple(hi),
                 **_merged_meta(a, b, branches=a.branches + b.branches, merges=a.merges + b.merges + 1,
                                inputs=a.inputs + b.inputs))


def _scale(t: _Term, s: torch.Tensor, shift: torch.Tensor) -> _Term | str:
    """``s * T + shift`` per output channel (``s``/``shift`` of length C or 1)."""
    t = _f64(t)
    n = max(s.numel(), shift.numel())
    if n > 1:
        t2 = _with_channels(t, n)
        if isinstance(t2, str):
            return t2
        t = t2
    w = t.weight * s.reshape(-1, *([1] * (t.weight.dim() - 1)))
    per_pixel = 1 / math.prod(t.stride or (1,))
    if t.uniform:
        return replace(t, weight=w, bias=t.bias * s + shift, uniform_cost=t.uniform_cost + per_pixel)
    return replace(t, weight=w, bias=t.bias * s + shift, cost=t.cost + t.cout * per_pixel)


def _compose(outer: _Term, inner: _Term) -> _Term | str:
    """``outer(inner(x))``: exact when one of the two is pointwise (see the module docstring)."""
    why = _axes_disagree(outer, inner)
    if why:
        return why
    if outer.is_diagonal():
        r = _with_rank(inner, outer.rank)
        if isinstance(r, str):
            return r
        out = _scale(r, _f64(outer).weight.reshape(-1), outer.bias)
        if isinstance(out, str):
            return out
        return replace(out, nodes=inner.nodes + outer.nodes, paths=inner.paths + outer.paths,
                       dtype=inner.dtype or outer.dtype, device=inner.device or outer.device,
                       requires_grad=inner.requires_grad or outer.requires_grad, linear=inner.linear or outer.linear)
    if not (outer.is_pointwise() or inner.is_one_tap()):
        return (f"a kernel {outer.kernel} after a kernel {inner.kernel} is not one conv "
                "(only a pointwise conv on either side composes exactly)")
    pair = _common_chain(_f64(outer), _f64(inner))
    if isinstance(pair, str):
        return pair
    outer, inner = pair
    # A composition may cost more than its two ops and still pay off once a sibling branch of the
    # same size is added (DBB's 1x1 -> avg-pool branch); far beyond that (a dense 1x1 after a
    # depthwise 7x7) it never does, and computing it would take seconds and gigabytes.
    size = outer.weight.shape[0] * inner.weight.shape[1] * math.prod(outer.kernel) * math.prod(inner.kernel)
    ratio = size / max(outer.cost + inner.cost, 1.0)
    if ratio > 16 or (ratio > 1 and size > 4e6):
        return f"composing {outer.kernel} with {inner.kernel} would multiply the work by {ratio:.0f}"
    g = outer.groups or 1  # both uniform: computed as one channel, the result stays uniform
    meta = _merged_meta(outer, inner, branches=inner.branches, merges=inner.merges + outer.merges)
    meta["uniform_cost"] = inner.uniform_cost + outer.uniform_cost / math.prod(inner.stride or (1,))
    meta["cost"] = inner.cost + outer.cost / math.prod(inner.stride or (1,))
    if outer.is_pointwise():
        if not inner.merges:
            # conv -> 1x1 chains are not re-parameterization blocks; only a merged sum takes one in
            return "a pointwise conv after a single conv is left as it is"
        co, m = outer.weight.shape[0] // g, outer.weight.shape[1]
        wo = outer.weight.reshape(g, co, m)
        wi = inner.weight.reshape(g, m, -1)
        w = torch.einsum("gom,gmr->gor", wo, wi).reshape(outer.weight.shape[0], *inner.weight.shape[1:])
        b = (wo @ inner.bias.reshape(g, m, 1)).reshape(-1) + outer.bias
        return _Term(root=inner.root, weight=w, bias=b, groups=outer.groups, rank=inner.rank, stride=inner.stride,
                     dilation=inner.dilation, lo=inner.lo, hi=inner.hi, **meta)
    if inner.is_one_tap():
        # a padded one-tap inner (DBB's border-valued pad) holds b_T on its border: the merged conv's
        # zero padding of x gives b_T there too. The outer's own zero padding gives 0, not b_T.
        if (any(outer.lo) or any(outer.hi)) and bool(inner.bias.ne(0).any()):
            return ("a pointwise branch with a bias feeds a padded op: the merged conv would read "
                    "zeros where the original reads that bias at the border")
        co, m, k = outer.weight.shape[0] // g, outer.weight.shape[1], outer.kernel
        wo = outer.weight.reshape(g, co, m, -1)
        wi = inner.weight.reshape(g, m, -1)
        w = torch.einsum("gomk,gmi->goik", wo, wi).reshape(outer.weight.shape[0], wi.shape[-1], *k)
        b = (wo.sum(-1) @ inner.bias.reshape(g, m, 1)).reshape(-1) + outer.bias
        lo = tuple(o + i for o, i in zip(outer.lo, inner.lo))
        hi = tuple(o + i for o, i in zip(outer.hi, inner.hi))
        return _Term(root=inner.root, weight=w, bias=b, groups=outer.groups, rank=outer.rank, stride=outer.stride,
                     dilation=outer.dilation, lo=lo, hi=hi, **meta)
    return (f"a kernel {outer.kernel} after a kernel {inner.kernel} is not one conv "
            "(only a pointwise conv on either side composes exactly)")


def _common_chain(outer: _Term, inner: _Term) -> tuple[_Term, _Term] | str:
    """Rank, channels and groups for ``outer(inner)``: outer's inputs are inner's outputs."""
    ranked = _same_rank(outer, inner)
    if isinstance(ranked, str):
        return ranked
    o, i = ranked
    if o.uniform and not i.uniform:
        o = _with_channels(o, i.cout)
    elif i.uniform and not o.uniform:
        i = _with_channels(i, o.cin)
    if isinstance(o, str):
        return o
    if isinstance(i, str):
        return i
    if o.uniform:  # both uniform: compute as one channel, stays uniform
        return o, i
    if o.cin != i.cout:
        return f"{i.cout} channels feed an op that reads {o.cin}"
    g = math.gcd(o.groups, i.groups)
    return _regroup(o, g), _regroup(i, g)


# ----------------------------------------------------------------------------------------------- ops -> terms


@dataclass
class _Barrier:
    """A node that is not (or may not be treated as) a linear op of a tensor; ``reason`` says why."""

    reason: str
    nonlinear: bool = False


@dataclass
class _Const:
    value: Any


def conv_term(weight: torch.Tensor, bias: torch.Tensor | None, *, stride: Any, padding: Any, dilation: Any,
              groups: int, node: torch.fx.Node, root: torch.fx.Node, path: str) -> _Term:
    """The term of a zero-padded ``conv(root; weight, bias)`` (``padding`` as ints, or ``"same"`` / ``"valid"``).

    Both readers build conv terms here: the module pass from a ``ConvNd`` module, the program pass
    from an ``aten.conv*d`` / ``aten.convolution`` op and its parameters.
    """
    rank = weight.dim() - 2
    k, dil, stride = tuple(weight.shape[2:]), _tuple(dilation, rank), _tuple(stride, rank)
    if padding == "valid":
        lo = hi = (0,) * rank
    elif padding == "same":
        total = [d * (kk - 1) for d, kk in zip(dil, k)]
        lo, hi = tuple(t // 2 for t in total), tuple(t - t // 2 for t in total)
    else:
        lo = hi = _tuple(padding, rank)
    # the weight stays as it is until an op needs it in float64 (:func:`_f64`): most convs never merge,
    # and a float64 copy of every weight would double a large model's memory
    w = weight.detach()
    b = bias.detach().double().cpu() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return _Term(root=root, weight=w, bias=b, groups=int(groups), rank=rank, stride=stride,
                 dilation=dil, lo=lo, hi=hi, nodes=[node], paths=[path], convs=1, cost=w.numel() / math.prod(stride),
                 dtype=weight.dtype, device=weight.device, requires_grad=weight.requires_grad)


def linear_term(weight: torch.Tensor, bias: torch.Tensor | None, *, node: torch.fx.Node, root: torch.fx.Node,
                path: str) -> _Term:
    """The term of ``linear(root; weight, bias)``: a pointwise kernel (out, in) of rank 0 on the last axis."""
    w = weight.detach()
    b = bias.detach().double().cpu() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return _Term(root=root, weight=w, bias=b, groups=1, rank=0, nodes=[node], paths=[path], convs=1,
                 cost=float(w.numel()), dtype=weight.dtype, device=weight.device, requires_grad=weight.requires_grad,
                 linear=True)


def batchnorm_term(aff: BatchNormAffine, rank: int | None, *, dtype: torch.dtype, device: torch.device,
                   node: torch.fx.Node, root: torch.fx.Node, path: str) -> _Term | _Barrier:
    """The diagonal term ``W[c, 0] = s_c``, ``b = t`` of an eval BatchNorm's affine (groups = C)."""
    c = aff.scale.numel()
    t = _Term(root=root, weight=aff.scale.reshape(c, 1).cpu(), bias=aff.shift.cpu(), groups=c, rank=None,
              nodes=[node], paths=[path], cost=float(c), dtype=dtype, device=device)
    r = _with_rank(t, rank)
    return r if isinstance(r, _Term) else _Barrier(r)


def pool_term(kernel: Any, stride: Any, padding: Any, *, rank: int, ceil_mode: bool, count_include_pad: bool,
              divisor_override: int | None, node: torch.fx.Node, root: torch.fx.Node, path: str) -> _Term | _Barrier:
    """An average pool as the uniform depthwise kernel ``1/prod(k)`` (zero padding counted, no ceil mode)."""
    if ceil_mode:
        return _Barrier(f"{path} uses ceil_mode (its last window is not a fixed kernel)")
    k = _tuple(kernel, rank)
    stride = _tuple(stride if stride else kernel, rank)  # no stride (None, [] in ATen) is the kernel
    pad = _tuple(padding, rank)
    if any(pad) and not count_include_pad:
        return _Barrier(f"{path} excludes padding from its average (the border divisor varies)")
    w = torch.full((1, 1, *k), 1.0 / (divisor_override or math.prod(k)), dtype=torch.float64)
    return _Term(root=root, weight=w, bias=torch.zeros(1, dtype=torch.float64), groups=None, rank=rank,
                 stride=stride, dilation=(1,) * rank, lo=pad, hi=pad, nodes=[node], paths=[path],
                 uniform_cost=math.prod(k) / math.prod(stride))


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    """An int or a sequence as an ``n``-tuple (one value repeated; a symbolic int read as its traced value)."""
    if isinstance(v, (tuple, list)):
        return tuple(int(x) for x in v) if len(v) == n else tuple(int(v[0]) for _ in range(n))
    return (int(v),) * n


def _per_channel(value: Any, rank: int | None) -> tuple[torch.Tensor, int | None] | str:
    """A constant as a per-channel vector (length C, or 1 for a scalar) and the spatial rank it implies.

    With the tensor's rank known, the constant broadcasts from the right and its channel axis is
    the tensor's axis 1. Not known yet (a scale straight on a block's input), the constant is read
    as ``(1, C, 1, ...)`` or ``(C, 1, ...)`` of a tensor with ``v.dim()`` or ``v.dim() + 1`` axes, and
    that rank goes with the term: a branch of another rank then refuses to merge with it.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor([float(value)], dtype=torch.float64), rank
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return f"operand {type(value).__name__} is not a float constant"
    v = value.detach().double().cpu()
    if v.numel() == 1:
        return v.reshape(1), rank
    ranks = [rank + 2] if rank is not None else [v.dim(), v.dim() + 1]
    for n in ranks:
        if v.dim() > n or n < 3:
            continue
        shape = (1,) * (n - v.dim()) + tuple(v.shape)
        if all(s == 1 for i, s in enumerate(shape) if i != 1):
            return v.reshape(-1), n - 2
    return f"a constant of shape {tuple(v.shape)} is not a per-channel scale of this tensor"


# ----------------------------------------------------------------------------------------------- analysis


def _is_inplace(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False))
    return False


class _Analysis(abc.ABC):
    """Terms of every node of one graph, and the regions worth one conv.

    The rules that combine terms (adds, scales, an op applied to a term, why an add was not merged)
    live here, once; a reader subclass says what each node of its IR is: :class:`_BlockAnalysis`
    reads torch.fx graphs of modules, :class:`normfold.passes.merge_program._ProgramAnalysis` the
    ATen graph of an ExportedProgram.
    """

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.status: dict[torch.fx.Node, _Term | _Barrier | _Const] = {}
        self.skips: list[tuple[tuple[str, ...], str]] = []
        #: the add node of each skip (its scope names the block to report it at)
        self.skip_nodes: list[torch.fx.Node] = []
        for node in graph.nodes:
            self.status[node] = self._visit(node)

    # -- what the reader says ------------------------------------------------------------------------
    @abc.abstractmethod
    def _visit(self, node: torch.fx.Node) -> _Term | _Barrier | _Const:
        """What ``node`` is: a term of a region input, a barrier (an op the algebra does not take), a constant."""

    @abc.abstractmethod
    def _where(self, node: torch.fx.Node) -> str:
        """The block a refusal at ``node`` is reported at."""

    @abc.abstractmethod
    def _layer_path(self, node: torch.fx.Node) -> str | None:
        """The module path of a layer node (conv, BatchNorm, pool...), named in a refusal; None for other ops."""

    @abc.abstractmethod
    def _weighted(self, node: torch.fx.Node) -> int:
        """Weighted layers (conv, linear) a path node stands for: a merged term's convs, an opaque module's."""

    # -- the shared rules -----------------------------------------------------------------------------
    def _skip(self, node: torch.fx.Node, paths: tuple[str, ...], reason: str) -> None:
        self.skips.append((paths, reason))
        self.skip_nodes.append(node)

    def _readers(self, node: torch.fx.Node) -> int:
        """Users of ``node`` that read it; the in-place border writes its own term absorbed do not count."""
        st = self.status.get(node)
        own = set(st.nodes) if isinstance(st, _Term) else set()
        return sum(u not in own for u in node.users)

    # an operand as a term: its own term when this user is its only reader, else the identity of it
    def _operand(self, node: torch.fx.Node) -> _Term:
        st = self.status.get(node)
        if isinstance(st, _Term) and self._readers(node) == 1:
            return replace(st, inputs=[node])
        return _identity(node)

    def _apply(self, node: torch.fx.Node, op: _Term | None, source: torch.fx.Node) -> _Term:
        """The term of ``node`` = the layer term ``op`` (None: a pass-through) applied to ``source``."""
        inner = self._operand(source)
        if op is None:  # pass-through: the node is its input
            return replace(inner, nodes=inner.nodes + [node])
        if not inner.nodes:  # straight on a root
            return op
        if _is_plain_identity(inner):  # only pass-throughs before it (a folded BatchNorm's Identity, eval dropout)
            return replace(op, root=inner.root, nodes=inner.nodes + op.nodes)
        out = _compose(op, inner)
        if isinstance(out, str):
            return replace(op, root=source, refusal=out)
        return replace(out, nodes=out.nodes, inputs=[source])

    def _value_or_term(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            st = self.status.get(a)
            return st.value if isinstance(st, _Const) else None
        return a

    def _with_constant(self, tensor: Any, const: Any) -> tuple[_Term, torch.Tensor] | _Barrier:
        """The term of ``tensor`` and ``const`` as a per-channel vector, the term given the rank the constant
        implies; a barrier when the constant is not per-channel or the ranks disagree."""
        t = self._operand(tensor)
        c = _per_channel(const, t.rank)
        if isinstance(c, str):
            return _Barrier(c)
        c, rank = c
        t = _with_rank(t, rank)
        if isinstance(t, str):
            return _Barrier(t)
        return t, c

    def _add(self, node: torch.fx.Node, a: Any, b: Any, sign: float) -> _Term | _Barrier:
        a_const, b_const = self._value_or_term(a), self._value_or_term(b)
        if a_const is not None or b_const is not None:  # a bias: x + c, c + x, x - c
            if a_const is not None and b_const is not None:
                return _Barrier("constant")
            tensor, const = (b, a_const) if a_const is not None else (a, b_const)
            operand = self._with_constant(tensor, const)
            if isinstance(operand, _Barrier):
                return operand
            t, c = operand
            s = torch.tensor([sign if a_const is not None else 1.0], dtype=torch.float64)
            shift = c * (1.0 if a_const is not None else sign)
            out = _scale(t, s, shift)
            if isinstance(out, str):
                return _Barrier(out)
            return replace(out, nodes=out.nodes + [node])
        ta, tb = self._operand(a), self._operand(b)
        if ta.root is not tb.root:
            self._explain(node, a, b)
            return _Barrier("adds tensors of different sources")
        out = _add(ta, tb, sign)
        if isinstance(out, str):
            paths = tuple(ta.paths + tb.paths)
            self._skip(node, (self._where(node),) + paths, f"branches not merged: {out}")
            return _Barrier(out)
        # the add itself is an elementwise op the merged conv replaces
        return replace(out, nodes=out.nodes + [node], cost=out.cost + (out.cout or 0) / math.prod(out.stride or (1,)))

    def _mul(self, node: torch.fx.Node, a: Any, b: Any, *, div: bool) -> _Term | _Barrier:
        a_const, b_const = self._value_or_term(a), self._value_or_term(b)
        if (a_const is None) == (b_const is None):
            return _Barrier("product of two tensors", nonlinear=True)
        if div and a_const is not None:
            return _Barrier("division by a tensor", nonlinear=True)
        tensor, const = (b, a_const) if a_const is not None else (a, b_const)
        operand = self._with_constant(tensor, const)
        if isinstance(operand, _Barrier):
            return operand
        t, c = operand
        if div:
            c = 1.0 / c
        out = _scale(t, c, torch.zeros(1, dtype=torch.float64))
        if isinstance(out, str):
            return _Barrier(out)
        return replace(out, nodes=out.nodes + [node])

    def _explain(self, node: torch.fx.Node, a: Any, b: Any) -> None:
        """Why an add of two branches of one tensor was not merged.

        Reported only when the add looks like a re-parameterizable block: every branch short (a
        nonlinearity with at most one weighted layer on its path, another obstacle with at most
        two). A residual around a conv-act-conv stack, an attention module or an MLP is not one,
        and its add is not reported.
        """
        if not isinstance(a, torch.fx.Node) or not isinstance(b, torch.fx.Node):
            return
        chain_a, chain_b = self._chain(a), self._chain(b)
        fork = next((n for n in chain_a if n in chain_b), None)
        if fork is None:
            return
        where = self._where(node)
        found: list[tuple[tuple[str, ...], str]] = []
        for chain in (chain_a, chain_b):
            path = chain[:chain.index(fork)]
            modules = tuple(p for n in path if (p := self._layer_path(n)) is not None)
            # a sum already merged from the fork (the first branches of a chain of adds) is not one long branch
            weighted = sum(self._weighted(n) for n in path
                           if not (isinstance(st := self.status.get(n), _Term) and st.merges and st.root is fork))
            barriers = [self.status[n] for n in path if isinstance(self.status.get(n), _Barrier)]
            barriers += [_Barrier(st.refusal) for n in path
                         if isinstance(st := self.status.get(n), _Term) and st.refusal]
            nonlinear = [s for s in barriers if s.nonlinear]
            if (nonlinear and weighted > 1) or weighted > 2:
                return  # a long branch: not a re-parameterizable block
            shared = [n for n in path if isinstance(self.status.get(n), _Term) and self._readers(n) > 1]
            if shared:
                readers = ", ".join(u.name for u in shared[0].users if u is not node)
                found.append(((where, *modules), f"a branch output ({shared[0].name}) is also read by {readers}"))
            elif nonlinear:
                found.append(((where, *modules), f"a branch is not linear: {nonlinear[0].reason}"))
            elif barriers:
                found.append(((where, *modules), f"a branch was left: {barriers[0].reason}"))
        if found:
            self._skip(node, *found[0])

    def _chain(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """``node`` and its producers up through one-input ops (constants aside), nearest first."""
        chain = [node]
        cur = node
        for _ in range(16):
            st = self.status.get(cur)
            if isinstance(st, _Term) and cur is not st.root:  # a merged sum forks where its root does
                cur = st.root
                chain.append(cur)
                continue
            ins = [a for a in cur.all_input_nodes if not isinstance(self.status.get(a), _Const)]
            if len(ins) != 1:
                break
            cur = ins[0]
            chain.append(cur)
        return chain


def _scope(node: torch.fx.Node) -> str:
    """The module whose ``forward`` made ``node`` (a module call: the module that called it)."""
    if node.op == "call_module":
        return node.target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _common_scope(nodes: set[torch.fx.Node], scope: Callable[[torch.fx.Node], str] = _scope) -> str:
    """The innermost module whose call made all of ``nodes`` (``scope`` reads one node's module)."""
    parts = [p.split(".") if p else [] for p in map(scope, nodes)]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def region_tops(analysis: _Analysis) -> list[torch.fx.Node]:
    """The nodes whose terms no other term absorbed, in graph order: each one a region to write as one conv."""
    absorbed: set[torch.fx.Node] = set()
    for node, st in analysis.status.items():
        if isinstance(st, _Term):
            absorbed.update(n for n in st.nodes if n is not node)
    return [node for node, st in analysis.status.items() if isinstance(st, _Term) and node not in absorbed]


def worth_merging(t: _Term) -> bool:
    """Something merges: branches added, or convs composed (``x + x`` and identities alone stay as written)."""
    return bool((t.merges or t.convs >= 2) and t.paths)


def mergeable(t: _Term, input_info: Callable[[], tuple[int, torch.dtype, torch.device] | None],
              modifies_in_place: Callable[[torch.fx.Node], bool]) -> _Term | str | None:
    """``t`` ready to be written as one conv (channels, dtype and device known), or why it is not.

    A string is a refusal to report; None leaves the region without a word (a composition that does
    not pay off and merged nothing). ``input_info`` gives (channels, dtype, device) of the region's
    input when no op of the region does; ``modifies_in_place`` tells an op that writes its input.
    Both the module and the program pass decide here.
    """
    if t.uniform or t.dtype is None:
        info = input_info()
        if info is None:
            return "the channel count of the branches' input is not known (pass example_inputs)"
        t2 = _with_channels(t, info[0])
        if isinstance(t2, str):
            return t2
        t = replace(t2, dtype=t2.dtype or info[1], device=t2.device or info[2])
    if t.rank is None:
        return "no op of the region fixes its spatial rank (a conv, 2d/3d BatchNorm or pool)"
    if t.lo != t.hi:
        return f"the merged conv would need padding {t.lo} before and {t.hi} after"
    # the merged conv must not cost more than what it replaces (a dense 1x1 after a depthwise kxk)
    if t.conv_macs() > t.cost * (1 + 1e-9) + 1e-9:
        return (f"one conv would cost {t.conv_macs():.0f} multiply-adds per input pixel, the branches "
                f"{t.cost:.0f}" if t.merges else None)
    for user in t.root.users:
        if user not in t.nodes and modifies_in_place(user):
            return f"{user.name} modifies the branches' input in place"
    if t.dtype is None or not t.dtype.is_floating_point:
        return "no floating-point parameter to take the dtype from"
    if not torch.isfinite(t.weight.to(t.dtype)).all() or not torch.isfinite(t.bias.to(t.dtype)).all():
        return f"the merged weights overflow {t.dtype}"
    return t


