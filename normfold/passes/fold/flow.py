"""How a per-channel affine travels through the ops between a BatchNorm and the layer it folds into.

Used by the forward / through-ops BatchNorm folding of nn.Modules
(:mod:`normfold.passes.fold_batchnorm_forward`) and of ExportedPrograms
(:mod:`normfold.passes.fold_exported`); each supplies a :class:`Dialect` that
says what the nodes of its graph are, and this module does the reasoning.

Math. In eval a BatchNorm is ``y = s * x + t`` per channel. An op ``f``
*carries* that affine when ``f(s * x + t) = s' * f(x) + t'`` for every ``x``,
with ``s'``, ``t'`` again constant per channel of ``f``'s output:

* data movement (view, reshape, flatten, permute, transpose, squeeze, slicing,
  split, pixel_shuffle, nearest upsampling, Identity, Dropout in eval) moves
  every element, so ``s'``/``t'`` are ``s``/``t`` moved the same way;
* a per-channel combination whose weights sum to 1 (average pools without
  counted zero padding, adaptive average pools, ``mean`` over non-channel
  axes, bilinear/bicubic interpolation, reflect/replicate/circular padding)
  carries any affine, provided it only combines values of one channel;
  zero padding and average pools that count it dilute ``t`` at the border and
  carry the affine only where ``t = 0``;
* order statistics (max pools, ``amax``) carry it where ``s >= 0``
  (``max(s x + t) = s max(x) + t`` needs a non-decreasing map).

Which channel lands where is tracked by shape propagation: an *index tensor*
of the activation's shape holding, at each element, the channel it came from
is pushed through the same ops (float64, exact for indices below 2**53). At a
consumer Conv (input channel axis) or Linear (last axis) the index must be
constant along every other axis; it then says which BatchNorm channel feeds
each input channel or feature. Backward folding reads the same map the other
way: the producer's output-feature index pushed down to the BatchNorm input.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.fx

__all__ = ["Rule", "Consumer", "Producer", "Constraint", "Dialect", "ForwardPlan", "BackwardPlan", "BackwardPart",
           "walk_forward", "walk_backward", "check_constraints", "channel_index", "forward_fold_tensors",
           "backward_fold_tensors", "zero_shift_reason", "NotConcrete"]

#: the sentinel for "not from this BatchNorm" in an index tensor
NO_CHANNEL = -1.0


class NotConcrete(Exception):
    """A value the analysis needs (a size, a shape) is not known."""


@dataclass
class Rule:
    """What an op does to a per-channel affine flowing through its first tensor argument.

    ``kind``: ``"move"`` (data movement: ``apply`` runs the op on the index
    tensor), ``"pool"`` (combines values of one channel along ``axes`` of its
    input), ``"block"`` (does not carry the affine; ``reason`` says why, naming
    the op) or ``"output"`` (the tensor leaves the model).
    """

    kind: str
    label: str
    apply: Callable[[Any], Any] | None = None
    axes: tuple[int, ...] = ()
    out_shape: tuple[int, ...] | None = None
    keepdim: bool = True
    nonneg_scale: bool = False
    keeps_shift: bool = True
    shift_why: str = ""
    reason: str = ""
    wrap_tuple: int = 0


@dataclass
class Consumer:
    """A Conv / ConvTranspose / Linear reading the affine on its input (forward folding).

    ``channel_axis`` is the input axis its weight sums over (1 for a batched
    conv, -1 for Linear); ``zero_pad`` is True when it pads its input with zeros;
    ``ref`` is the dialect's handle for the edit.
    """

    kind: str  # "conv" | "conv_transpose" | "linear"
    label: str
    channel_axis: int
    in_channels: int
    zero_pad: bool
    ref: Any


@dataclass
class Producer:
    """A Conv / ConvTranspose / Linear whose output the affine can be folded into (backward folding)."""

    kind: str
    label: str
    channel_axis: int
    out_channels: int
    ref: Any


@dataclass
class Constraint:
    """Channels (of the BatchNorm) on which an op needs ``s >= 0`` (``"nonneg"``) or ``t == 0`` (``"zero_shift"``)."""

    kind: str
    channels: torch.Tensor  # long, channel indices in the walk's index space
    label: str
    why: str = ""
    consumer: bool = False


class Dialect(Protocol):
    """What a graph's nodes are; implemented for nn.Module fx graphs and for ATen ExportedPrograms."""

    def value_users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """Users that read the node's values (not only its shape, dtype or device)."""

    def classify(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        """How ``node`` treats the affine arriving through its argument ``via``."""

    def producer(self, node: torch.fx.Node) -> Producer | str | None:
        """``node`` as a producer to fold into; a reason when it is one but cannot take it; None if not one."""

    def value_input(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """The argument whose values flow through ``node`` (its first tensor argument)."""

    def shape(self, node: torch.fx.Node) -> tuple[int, ...] | None:
        """Concrete shape of the tensor ``node`` produces, if known."""

    def describe(self, node: torch.fx.Node) -> str:
        """Short human description for reasons."""


@dataclass
class ForwardHit:
    """One consumer reached from the BatchNorm, with the BN channel feeding each of its input channels."""

    consumer: Consumer
    node: torch.fx.Node
    channel_of_input: torch.Tensor  # long, len = consumer.in_channels


@dataclass
class ForwardPlan:
    hits: list[ForwardHit]
    constraints: list[Constraint]
    ops: list[str] = field(default_factory=list)


@dataclass
class BackwardPart:
    """One producer of a backward fold: BatchNorm channel ``channels[i]`` is its output feature ``features[i]``."""

    producer: Producer
    node: torch.fx.Node
    channels: torch.Tensor  # long
    features: torch.Tensor  # long


@dataclass
class BackwardPlan:
    parts: list[BackwardPart]
    constraints: list[Constraint]
    ops: list[str] = field(default_factory=list)

    @property
    def producer(self) -> Producer:
        return self.parts[0].producer


def channel_index(shape: Sequence[int], axis: int) -> torch.Tensor:
    """A float64 tensor of ``shape`` holding at each element its index along ``axis``."""
    shape = tuple(int(s) for s in shape)
    axis = axis % len(shape)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return torch.arange(shape[axis], dtype=torch.float64).view(view).expand(shape).contiguous()


def _norm_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(sorted({a % ndim for a in axes})) if ndim else ()


def _constant_along(index: torch.Tensor, axes: tuple[int, ...]) -> bool:
    if not axes or index.numel() == 0:
        return True
    return bool((index.amin(dim=axes) == index.amax(dim=axes)).all())


def _map_along(index: torch.Tensor, axis: int) -> torch.Tensor | None:
    """The index values along ``axis`` when ``index`` is constant along every other axis, else None."""
    axis = axis % index.dim()
    others = tuple(a for a in range(index.dim()) if a != axis)
    if not _constant_along(index, others):
        return None
    return index.amin(dim=others) if others else index


def _present(index: torch.Tensor) -> torch.Tensor:
    vals = torch.unique(index)
    return vals[vals >= 0].long()


def _apply_rule(rule: Rule, index: Any) -> Any:
    """Push the index tensor through one op; a string says why it cannot."""
    if rule.kind == "move":
        try:
            return rule.apply(index)
        except NotConcrete as exc:
            return f"{rule.label}: {exc}"
        except Exception as exc:  # the op does not run on the index tensor: do not guess
            return f"could not follow the channels through {rule.label} ({type(exc).__name__})"
    if rule.kind == "pool":
        if not isinstance(index, torch.Tensor):
            return f"{rule.label} receives a tuple"
        axes = _norm_axes(rule.axes, index.dim())
        if not _constant_along(index, axes):
            return f"{rule.label} combines values across channels"
        red = index.amin(dim=axes, keepdim=rule.keepdim) if axes else index
        if rule.out_shape is None:
            return f"the output shape of {rule.label} is unknown (pass example_inputs)"
        if rule.keepdim:
            try:
                red = red.expand(rule.out_shape).contiguous()
            except RuntimeError:
                return f"could not follow the channels through {rule.label}"
        elif tuple(red.shape) != tuple(rule.out_shape):
            return f"could not follow the channels through {rule.label}"
        return tuple([red] * rule.wrap_tuple) if rule.wrap_tuple else red
    raise AssertionError(rule.kind)


def _pool_constraints(rule: Rule, index: torch.Tensor) -> list[Constraint]:
    out = []
    if rule.nonneg_scale:
        out.append(Constraint("nonneg", _present(index), rule.label))
    if not rule.keeps_shift:
        out.append(Constraint("zero_shift", _present(index), rule.label, rule.shift_why))
    return out


def walk_forward(d: Dialect, start: torch.fx.Node, index: torch.Tensor) -> ForwardPlan | str:
    """Follow the BatchNorm output ``start`` (channel index ``index``) to the layers that read it.

    Every path must end in a Conv/Linear consumer through ops that carry the
    affine; the first op that does not is named in the returned reason.
    """
    hits: list[ForwardHit] = []
    constraints: list[Constraint] = []
    ops: list[str] = []
    stack: list[tuple[torch.fx.Node, Any]] = [(start, index)]
    seen: set[torch.fx.Node] = set()
    while stack:
        node, idx = stack.pop()
        users = d.value_users(node)
        if not users:
            return f"{d.describe(node)} is not read by any layer"
        for u in users:
            if u in seen:
                return f"{d.describe(u)} reads the BatchNorm output along two paths"
            seen.add(u)
            r = d.classify(u, node)
            if isinstance(r, Consumer):
                if not isinstance(idx, torch.Tensor):
                    return f"{r.label} receives a tuple"
                cmap = _map_along(idx, r.channel_axis)
                if cmap is None:
                    return (f"the BatchNorm channels do not line up with the input channels of {r.label} "
                            f"(a channel is spread over several of its inputs)")
                if cmap.numel() != r.in_channels:
                    return f"channel mismatch: {r.label} expects {r.in_channels} input channels, gets {cmap.numel()}"
                cmap = cmap.long()
                if (cmap < 0).any():
                    return f"{r.label} also reads values that do not come from the BatchNorm"
                hits.append(ForwardHit(r, u, cmap))
                if r.zero_pad:
                    constraints.append(Constraint("zero_shift", torch.unique(cmap), r.label, "pads with zeros",
                                                  consumer=True))
                continue
            if r.kind == "block" or r.kind == "output":
                return r.reason
            nxt = _apply_rule(r, idx)
            if isinstance(nxt, str):
                return nxt
            if r.kind == "pool":
                constraints.extend(_pool_constraints(r, idx))
            ops.append(r.label)
            stack.append((u, nxt))
    return ForwardPlan(hits, constraints, ops)


def walk_backward(d: Dialect, bn_node: torch.fx.Node, bn_input: torch.fx.Node, num_channels: int) -> BackwardPlan | str:
    """Follow the BatchNorm input up through ops that carry an affine to the Conv/Linear producer(s).

    Every tensor on the way must be read by the next op only (else changing
    the producer changes another reader too). A concatenation along the
    channel axis (``cat``, when the dialect reports it) splits the BatchNorm
    between the producers of its inputs.
    """
    producers: list[tuple[Producer, torch.fx.Node, int]] = []
    constraints: list[Constraint] = []
    ops: list[str] = []
    concat = getattr(d, "concat", None)

    def up(node: torch.fx.Node, reader: torch.fx.Node, depth: int) -> Any:
        users = d.value_users(node)
        if len(users) != 1 or users[0] is not reader:
            others = _summarize([d.describe(u) for u in users if u is not reader])
            return f"{d.describe(node)} output has {len(users)} readers (also {others or 'unknown'})"
        p = d.producer(node)
        if isinstance(p, str):
            return p
        if isinstance(p, Producer):
            shape = d.shape(node)
            if shape is None:
                return f"the output shape of {p.label} is unknown (pass example_inputs)"
            offset = sum(q.out_channels for q, _, _ in producers)
            producers.append((p, node, offset))
            return channel_index(shape, p.channel_axis) + offset
        cat = concat(node) if concat is not None else None
        if cat is not None:
            inputs, dim = cat
            if len(set(inputs)) != len(inputs):
                return f"{d.describe(node)} concatenates the same tensor twice"
            parts = []
            for i in inputs:
                r = up(i, node, depth + 1)
                if isinstance(r, str):
                    return r
                parts.append(r)
            try:
                out = torch.cat(parts, dim)
            except RuntimeError:
                return f"could not follow the channels through {d.describe(node)}"
            ops.append(d.describe(node))
            return out
        src = d.value_input(node)
        if src is None:
            return f"its input is {d.describe(node)}, not a Conv, ConvTranspose or Linear"
        r = d.classify(node, src)
        if isinstance(r, Consumer) or r.kind in ("block", "output"):
            if depth == 0:
                return (r.reason.replace("reads it", "feeds it") if not isinstance(r, Consumer) and r.reason
                        else f"its input is {d.describe(node)}, not a Conv, ConvTranspose or Linear")
            return (f"the path up to the producer goes through {d.describe(node)}, which does not carry a "
                    "per-channel affine")
        idx = up(src, node, depth + 1)
        if isinstance(idx, str):
            return idx
        nxt = _apply_rule(r, idx)
        if isinstance(nxt, str):
            return nxt
        if r.kind == "pool":
            constraints.extend(_pool_constraints(r, idx))
        ops.append(r.label)
        return nxt

    idx = up(bn_input, bn_node, 0)
    if isinstance(idx, str):
        return idx
    if not isinstance(idx, torch.Tensor) or idx.dim() < 2:
        return "the BatchNorm input is not a batched tensor"
    labels = ", ".join(p.label for p, _, _ in producers)
    fmap = _map_along(idx, 1)
    if fmap is None:
        return (f"the output features of {labels} do not line up with the BatchNorm channels "
                f"(after {', '.join(ops) or 'no op'}, a BatchNorm channel holds several features)")
    fmap = fmap.long()
    if fmap.numel() != num_channels:
        return f"channel mismatch: the BatchNorm has {num_channels} channels, its input {fmap.numel()}"
    if (fmap < 0).any() or torch.unique(fmap).numel() != fmap.numel():
        return f"an output feature of {labels} lands in several BatchNorm channels"
    total = sum(p.out_channels for p, _, _ in producers)
    # Constraints were collected in producer-feature space; move them to BN channels.
    inv = torch.full((total,), -1, dtype=torch.long)
    inv[fmap] = torch.arange(fmap.numel())
    for c in constraints:
        mapped = inv[c.channels]
        c.channels = mapped[mapped >= 0]
    parts = []
    for p, node, off in producers:
        sel = (fmap >= off) & (fmap < off + p.out_channels)
        parts.append(BackwardPart(p, node, torch.nonzero(sel).flatten(), fmap[sel] - off))
    return BackwardPlan(parts, constraints, ops)


def _summarize(items: list[str], limit: int = 4) -> str:
    """``a, b, c x 12`` : repeated descriptions counted, at most ``limit`` distinct ones listed."""
    counts: dict[str, int] = {}
    for it in items:
        counts[it] = counts.get(it, 0) + 1
    parts = [f"{k} x {v}" if v > 1 else k for k, v in counts.items()]
    more = len(parts) - limit
    return ", ".join(parts[:limit]) + (f" and {more} more" if more > 0 else "")


def zero_shifts(affine: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Which channels have ``t = beta - mean * s == 0`` (up to the rounding of the BatchNorm's parameters).

    ``dtype`` is the BatchNorm's own dtype: a ``beta`` stored as ``mean * s``
    leaves ``t`` at that dtype's rounding level (:data:`normfold.tolerances.ZERO_SHIFT_ULPS`).
    """
    from normfold.tolerances import ZERO_SHIFT_ULPS

    t = affine.shift
    if dtype is None or not dtype.is_floating_point:
        return t == 0
    scale = affine.bias.abs() + (affine.mean * affine.scale).abs()
    return t.abs() <= ZERO_SHIFT_ULPS * torch.finfo(dtype).eps * scale


def zero_shift_reason(label: str, why: str, affine: Any, channels: torch.Tensor,
                      dtype: torch.dtype | None = None) -> str | None:
    """Why a zero-shift constraint fails, in terms of the border value ``v`` a user can look at."""
    bad = channels[~zero_shifts(affine, dtype)[channels]]
    if bad.numel() == 0:
        return None
    zero_gamma = int((affine.weight[bad] == 0).sum())
    extra = f" ({zero_gamma} of them have gamma = 0 and beta != 0)" if zero_gamma else ""
    return (f"{label} {why} and v = mean - beta*sqrt(var+eps)/gamma != 0 on {bad.numel()} of {channels.numel()} "
            f"channels{extra} (folded, the padding would have to be v)")


def check_constraints(constraints: list[Constraint], affine: Any, dtype: torch.dtype | None = None) -> str | None:
    """The first constraint the BatchNorm's affine violates, as a reason; None when all hold.

    ``dtype`` is the BatchNorm's parameter dtype (see :func:`zero_shifts`).
    """
    for c in constraints:
        if c.channels.numel() == 0:
            continue
        if c.kind == "nonneg":
            neg = int((affine.scale[c.channels] < 0).sum())
            if neg:
                return (f"{c.label} commutes with the BatchNorm only where gamma >= 0 (max(s*x+t) = s*max(x)+t "
                        f"needs s >= 0); gamma < 0 on {neg} of {c.channels.numel()} channels")
        elif c.kind == "zero_shift":
            why = c.why or "pads with zeros"
            r = zero_shift_reason(c.label, why, affine, c.channels, dtype)
            if r is not None:
                if c.consumer:
                    return "consumer " + r
                return r
    return None


# ------------------------------------------------------------------------------------------------
# weight arithmetic, float64 in, float64 out


def forward_fold_tensors(kind: str, weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
                         s_in: torch.Tensor, t_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of ``layer(s_in * x + t_in)`` written as ``layer'(x)``: scale on the input-channel axis, shift into the bias.

    * conv: weight ``(C_out, C_in/g, *k)``; output channel ``o`` of group
      ``o // (C_out/g)`` reads input channel ``g*(C_in/g) + j`` at weight
      column ``j``. The bias gains ``sum_{j,k} W[o,j,k] t[g*(C_in/g)+j]``,
      which is the conv of the constant input ``t`` (exact where the conv sees
      no zero padding).
    * conv_transpose: weight ``(C_in, C_out/g, *k)``, input channel on axis 0;
      only the scale is folded (the caller requires ``t == 0``: a transposed
      conv spreads a constant unevenly over its output).
    * linear: weight ``(out, in)``; columns scaled, bias gains ``W @ t``.

    Returns ``(new_weight, new_bias)``; ``new_bias`` is None when there was no
    bias and nothing to add.
    """
    w = weight.to(torch.float64)
    s = s_in.to(device=w.device, dtype=torch.float64)
    t = t_in.to(device=w.device, dtype=torch.float64)
    b = bias.to(torch.float64) if bias is not None else None
    if kind == "linear":
        new_w = w * s.view(1, -1)
        db = w @ t
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
        raise ValueError(kind)
    if db is None or (b is None and not bool((db != 0).any())):
        return new_w, b
    return new_w, (b if b is not None else torch.zeros_like(db)) + db


def backward_fold_tensors(kind: str, weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
                          s_out: torch.Tensor, t_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``s_out * layer(x) + t_out`` (per output channel), float64.

    Same math as :func:`normfold.passes.fold_batchnorm.fold_into_output_channels`,
    on tensors (for ExportedPrograms, whose weights are not module attributes).
    ``kind``: ``"conv"``, ``"conv_transpose"`` or ``"linear"``.
    """
    w = weight.to(torch.float64)
    s = s_out.to(device=w.device, dtype=torch.float64)
    t = t_out.to(device=w.device, dtype=torch.float64)
    if kind == "conv_transpose":
        cin, cout_g = w.shape[0], w.shape[1]
        k = w.shape[2:]
        new_w = (w.reshape(groups, cin // groups, cout_g, *k)
                 * s.reshape(groups, 1, cout_g, *([1] * len(k)))).reshape(w.shape)
    else:
        new_w = w * s.reshape(-1, *([1] * (w.dim() - 1)))
    b = bias.to(torch.float64) if bias is not None else torch.zeros_like(s)
    return new_w, b * s + t


# ------------------------------------------------------------------------------------------------
# helpers shared by the dialects


def substitute(value: Any, via: torch.fx.Node, index: Any, concrete: Callable[[torch.fx.Node], Any]) -> Any:
    """``value`` (node args) with ``via`` replaced by the index tensor and every other node by its concrete value."""
    def sub(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return index if a is via else concrete(a)
        if isinstance(a, (list, tuple)):
            out = [sub(x) for x in a]
            return type(a)(out) if not hasattr(a, "_fields") else type(a)(*out)
        if isinstance(a, dict):
            return {k: sub(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(sub(a.start), sub(a.stop), sub(a.step))
        return a
    return sub(value)


def bind_args(node: torch.fx.Node, names: Sequence[str], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Positional + keyword arguments of ``node`` by name, following ``names`` (the op's signature order)."""
    out = dict(defaults or {})
    for name, a in zip(names, node.args):
        out[name] = a
    out.update(node.kwargs)
    return out


def is_getitem(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem
