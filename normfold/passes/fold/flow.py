"""How a per-channel affine travels through the ops between a BatchNorm and the layer it folds into.

The one analysis behind every fold that is not a plain Conv -> BatchNorm
pair, and behind that pair too (its zero-op case). A graph reader
(:class:`normfold.passes.fold.reader.GraphReader`: one for torch.fx module
graphs, one for ATen ExportedPrograms) says what each node is; this module does
the reasoning and returns a plan or a :class:`~normfold.passes.fold.refusal.Refusal`.

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

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, Union

import torch
import torch.fx

from normfold.passes.fold.refusal import Refusal
from normfold.tolerances import ZERO_SHIFT_ULPS

__all__ = ["Rule", "Consumer", "Producer", "Constraint", "FlowReader", "ForwardHit", "ForwardPlan", "BackwardPlan",
           "BackwardPart", "walk_forward", "walk_backward", "check_constraints", "channel_index", "zero_shifts",
           "zero_shift_reason", "NotConcrete"]


class NotConcrete(Exception):
    """A value the analysis needs (a size, a shape) is not known."""


@dataclass
class Rule:
    """What an op does to a per-channel affine flowing through its first tensor argument.

    ``kind``: ``"move"`` (data movement: ``apply`` runs the op on the index
    tensor), ``"pool"`` (combines values of one channel along ``axes`` of its
    input), ``"block"`` (does not carry the affine; ``reason`` says why, naming
    the op; ``activation`` names it when it is an activation) or ``"output"``
    (the tensor leaves the model).
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
    activation: str = ""

    @property
    def carries(self) -> bool:
        """True when the affine passes through this op (data movement or a per-channel pool)."""
        return self.kind in ("move", "pool")


@dataclass
class Consumer:
    """A Conv / ConvTranspose / Linear reading the affine on its input (forward folding).

    ``channel_axis`` is the input axis its weight sums over, counted from the
    end (``-(k+1)`` for a conv with ``k`` spatial dims, -1 for Linear), so it
    is known without shapes; ``zero_pad`` is True when it pads its input with
    zeros; ``ref`` is the reader's handle for the edit.
    """

    kind: str  # "conv" | "conv_transpose" | "linear"
    label: str
    channel_axis: int
    in_channels: int
    zero_pad: bool
    ref: Any


@dataclass
class Producer:
    """A Conv / ConvTranspose / Linear whose output the affine can be folded into (backward folding).

    ``channel_axis`` counts from the end, as for :class:`Consumer`.
    """

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


class FlowReader(Protocol):
    """What the walks ask of a graph reader (implemented for torch.fx module graphs and ATen programs)."""

    def value_users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """Users that read the node's values (not only its shape, dtype or device)."""

    def classify(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        """How ``node`` treats the affine arriving through its argument ``via``."""

    def producer(self, node: torch.fx.Node) -> Producer | Refusal | None:
        """``node`` as a layer to fold into; a Refusal when it is one that cannot take it; None if not a layer."""

    def concat(self, node: torch.fx.Node) -> tuple[list[torch.fx.Node], int] | None:
        """(inputs, dim) when ``node`` concatenates traced tensors, else None."""

    def value_input(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """The argument whose values flow through ``node`` (its first tensor argument)."""

    def shape(self, node: torch.fx.Node) -> tuple[int, ...] | None:
        """Concrete shape of the tensor ``node`` produces, if known (a reader may compute shapes on first use)."""

    def describe(self, node: torch.fx.Node) -> str:
        """Short human description for reasons."""


@dataclass
class ForwardHit:
    """One consumer reached from the BatchNorm, with the BN channel feeding each of its input channels."""

    consumer: Consumer
    node: torch.fx.Node
    channel_of_input: torch.Tensor  # long, len = consumer.in_channels

    def scale_shift(self, affine: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)`` per input channel of the consumer (float64, on the CPU)."""
        return affine.scale.cpu()[self.channel_of_input], affine.shift.cpu()[self.channel_of_input]


@dataclass
class ForwardPlan:
    """A forward fold: every consumer reached, the constraints the affine must meet, the ops crossed."""

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
    #: channel i is feature i for every channel (the direct pair): no indexing needed
    direct: bool = False

    def scale_shift(self, affine: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)`` per output feature of the producer: the BatchNorm's where it lands, ``(1, 0)`` elsewhere."""
        if self.direct:
            return affine.scale, affine.shift
        n = self.producer.out_channels
        scale = torch.ones(n, dtype=torch.float64)
        shift = torch.zeros(n, dtype=torch.float64)
        scale[self.features] = affine.scale.cpu()[self.channels]
        shift[self.features] = affine.shift.cpu()[self.channels]
        return scale, shift


@dataclass
class BackwardPlan:
    """A backward fold: one part per producer (several after a ``cat``), constraints, the ops crossed.

    A direct Conv -> BatchNorm pair is the plan with one part, no constraint and no op.
    """

    parts: list[BackwardPart]
    constraints: list[Constraint]
    ops: list[str] = field(default_factory=list)


#: a walk's index: the tensor, or a function computing it (or refusing) on first need
LazyIndex = Union[torch.Tensor, Callable[[], Union[torch.Tensor, Refusal]]]


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


def _step_through(r: Rule, idx: torch.Tensor, node: Any, constraints: list[Constraint],
                  ops: list[str]) -> torch.Tensor | Refusal:
    """One op on a fold's path: the channel map after it, a pool's constraints, the op's label recorded."""
    nxt = _apply_rule(r, idx, node)
    if isinstance(nxt, Refusal):
        return nxt
    if r.kind == "pool":
        constraints.extend(_pool_constraints(r, idx))
    ops.append(r.label)
    return nxt


def _apply_rule(rule: Rule, index: Any, node: torch.fx.Node) -> Any:
    """Push the index tensor through one op; a Refusal says why it cannot."""
    if rule.kind == "move":
        try:
            return rule.apply(index)
        except NotConcrete as exc:
            return Refusal(f"{rule.label}: {exc}", node)
        except Exception as exc:  # the op does not run on the index tensor: do not guess
            return Refusal(f"could not follow the channels through {rule.label} ({type(exc).__name__})", node)
    if rule.kind == "pool":
        if not isinstance(index, torch.Tensor):
            return Refusal(f"{rule.label} receives a tuple", node)
        axes = _norm_axes(rule.axes, index.dim())
        if not _constant_along(index, axes):
            return Refusal(f"{rule.label} combines values across channels", node)
        red = index.amin(dim=axes, keepdim=rule.keepdim) if axes else index
        if rule.out_shape is None:
            return Refusal(f"the output shape of {rule.label} is unknown (pass example_inputs)", node)
        if rule.keepdim:
            try:
                red = red.expand(rule.out_shape).contiguous()
            except RuntimeError:
                return Refusal(f"could not follow the channels through {rule.label}", node)
        elif tuple(red.shape) != tuple(rule.out_shape):
            return Refusal(f"could not follow the channels through {rule.label}", node)
        return tuple([red] * rule.wrap_tuple) if rule.wrap_tuple else red
    raise AssertionError(rule.kind)


def _pool_constraints(rule: Rule, index: torch.Tensor) -> list[Constraint]:
    out = []
    if rule.nonneg_scale:
        out.append(Constraint("nonneg", _present(index), rule.label))
    if not rule.keeps_shift:
        out.append(Constraint("zero_shift", _present(index), rule.label, rule.shift_why))
    return out


def walk_forward(d: FlowReader, start: torch.fx.Node, index: LazyIndex) -> ForwardPlan | Refusal:
    """Follow the BatchNorm output ``start`` (channel index ``index``) to the layers that read it.

    Every path must end in a Conv/Linear consumer through ops that carry the
    affine; the first op that does not is named in the returned Refusal. A
    transposed-conv consumer takes only ``t = 0`` (it spreads a constant
    unevenly over its output): the plan carries that constraint. The
    readers of a node are classified before its index is needed, so a
    BatchNorm whose output goes straight into an activation is refused before
    any shape is computed (``index`` may be a function computing it then).
    """
    hits: list[ForwardHit] = []
    constraints: list[Constraint] = []
    ops: list[str] = []
    stack: list[tuple[torch.fx.Node, LazyIndex]] = [(start, index)]
    seen: set[torch.fx.Node] = set()
    while stack:
        node, idx = stack.pop()
        users = d.value_users(node)
        if not users:
            return Refusal(f"{d.describe(node)} is not read by any layer", node)
        rules = []
        for u in users:
            if u in seen:
                return Refusal(f"{d.describe(u)} reads the BatchNorm output along two paths", u)
            seen.add(u)
            r = d.classify(u, node)
            if isinstance(r, Rule) and not r.carries:
                return Refusal(r.reason, u)
            rules.append((u, r))
        if callable(idx):
            idx = idx()
            if isinstance(idx, Refusal):
                return idx
        for u, r in rules:
            if isinstance(r, Consumer):
                if not isinstance(idx, torch.Tensor):
                    return Refusal(f"{r.label} receives a tuple", u)
                cmap = _map_along(idx, r.channel_axis)
                if cmap is None:
                    return Refusal(f"the BatchNorm channels do not line up with the input channels of {r.label} "
                                   f"(a channel is spread over several of its inputs)", u)
                if cmap.numel() != r.in_channels:
                    return Refusal(f"channel mismatch: {r.label} expects {r.in_channels} input channels, "
                                   f"gets {cmap.numel()}", u)
                cmap = cmap.long()
                if (cmap < 0).any():
                    return Refusal(f"{r.label} also reads values that do not come from the BatchNorm", u)
                hits.append(ForwardHit(r, u, cmap))
                if r.zero_pad:
                    constraints.append(Constraint("zero_shift", torch.unique(cmap), r.label, "pads with zeros",
                                                  consumer=True))
                continue
            nxt = _step_through(r, idx, u, constraints, ops)
            if isinstance(nxt, Refusal):
                return nxt
            stack.append((u, nxt))
    for h in hits:
        if h.consumer.kind == "conv_transpose":
            constraints.append(Constraint("zero_shift", torch.unique(h.channel_of_input), h.consumer.label,
                                          "spreads a constant unevenly over its output (transposed conv)",
                                          consumer=True))
    return ForwardPlan(hits, constraints, ops)


def _not_a_layer(d: FlowReader, node: torch.fx.Node, rule: Rule | Consumer | None) -> Refusal:
    """Why the BatchNorm input ``node`` gives no layer to fold into: an activation sits there, or another op."""
    if isinstance(rule, Rule) and rule.activation:
        inner = d.value_input(node)
        what = d.describe(inner) if inner is not None else "its input"
        return Refusal(f"an activation ({rule.activation}) sits between {what} and the BatchNorm", node)
    return Refusal(f"its input is {d.describe(node)}, not a Conv, ConvTranspose or Linear", node)


def _readers_refusal(d: FlowReader, node: torch.fx.Node, reader: torch.fx.Node) -> Refusal | None:
    """Refuses when ``node``'s values are read by anything but ``reader`` (changing it would change them too)."""
    users = d.value_users(node)
    if len(users) == 1 and users[0] is reader:
        return None
    others = _summarize([d.describe(u) for u in users if u is not reader])
    return Refusal(f"{d.describe(node)} output has {len(users)} users (also read by {others or 'unknown'})", node)


def _direct(d: FlowReader, p: Producer, node: torch.fx.Node, num_channels: int) -> BackwardPlan | Refusal:
    """The zero-op plan: the producer's output is the BatchNorm's input, channel ``i`` is feature ``i``.

    A conv's output channel is axis 1 of the batched tensor the BatchNorm
    normalizes, so no shape is needed; a Linear writes its features on the
    last axis, which is the BatchNorm's channel axis only on a 2-D ``(N, C)``
    tensor, so its rank is looked up (the one case that needs shapes).
    """
    if p.out_channels != num_channels:
        return Refusal(f"channel mismatch: {p.label} has {p.out_channels} output channels, the BatchNorm "
                       f"{num_channels}", node)
    if p.kind == "linear":
        shape = d.shape(node)
        if shape is None:
            return Refusal("Linear -> BatchNorm needs the tensor rank to know the BN channel axis; "
                           "pass example_inputs (or --input-shape)", node)
        if len(shape) != 2:
            return Refusal(f"the BatchNorm normalizes axis 1 of a {len(shape)}-D tensor {tuple(shape)} "
                           "but the Linear writes its features on the last axis", node)
    every = torch.arange(num_channels)
    return BackwardPlan([BackwardPart(p, node, every, every, direct=True)], [], [])


def walk_backward(d: FlowReader, bn_node: torch.fx.Node, bn_input: torch.fx.Node, num_channels: int, *,
                  through_ops: bool = True) -> BackwardPlan | Refusal:
    """Follow the BatchNorm input up to the Conv/Linear producer(s), through ops that carry an affine.

    Every tensor on the way must be read by the next op only (else changing
    the producer changes another reader too). A concatenation along the
    channel axis (``cat``, when the reader reports it) splits the BatchNorm
    between the producers of its inputs. With ``through_ops=False`` only the
    direct pair (the zero-op case) is accepted. Readers are counted before any
    op is classified, so a tensor that several layers read refuses the fold
    before a shape is computed.
    """
    p = d.producer(bn_input)
    if p is not None:
        refused = _readers_refusal(d, bn_input, bn_node)
        if refused is not None:
            return refused
        return p if isinstance(p, Refusal) else _direct(d, p, bn_input, num_channels)
    if not through_ops or d.concat(bn_input) is None:
        src = d.value_input(bn_input) if bn_input.op.startswith("call_") else None
        first = d.classify(bn_input, src) if src is not None else None
        if not through_ops or not isinstance(first, Rule) or not first.carries:
            return _not_a_layer(d, bn_input, first)

    producers: list[tuple[Producer, torch.fx.Node, int]] = []
    constraints: list[Constraint] = []
    ops: list[str] = []

    def up(node: torch.fx.Node, reader: torch.fx.Node, depth: int) -> Any:
        if not node.op.startswith("call_"):
            return Refusal(f"its input is {d.describe(node)}, not a Conv, ConvTranspose or Linear", node)
        refused = _readers_refusal(d, node, reader)
        if refused is not None:
            return refused
        p = d.producer(node)
        if isinstance(p, Refusal):
            return p
        if isinstance(p, Producer):
            shape = d.shape(node)
            if shape is None:
                return Refusal(f"the output shape of {p.label} is unknown (pass example_inputs)", node)
            offset = sum(q.out_channels for q, _, _ in producers)
            producers.append((p, node, offset))
            return channel_index(shape, p.channel_axis) + offset
        cat = d.concat(node)
        if cat is not None:
            inputs, dim = cat
            if len(set(inputs)) != len(inputs):
                return Refusal(f"{d.describe(node)} concatenates the same tensor twice", node)
            parts = []
            for i in inputs:
                r = up(i, node, depth + 1)
                if isinstance(r, Refusal):
                    return r
                parts.append(r)
            try:
                out = torch.cat(parts, dim)
            except RuntimeError:
                return Refusal(f"could not follow the channels through {d.describe(node)}", node)
            ops.append(d.describe(node))
            return out
        src = d.value_input(node)
        if src is None:
            return Refusal(f"its input is {d.describe(node)}, not a Conv, ConvTranspose or Linear", node)
        r = d.classify(node, src)
        if isinstance(r, Consumer) or not r.carries:
            if depth == 0 or (isinstance(r, Rule) and r.activation):
                return _not_a_layer(d, node, r)
            return Refusal(f"the path up to the producer goes through {d.describe(node)}, which does not carry a "
                           "per-channel affine", node)
        idx = up(src, node, depth + 1)
        if isinstance(idx, Refusal):
            return idx
        return _step_through(r, idx, node, constraints, ops)

    idx = up(bn_input, bn_node, 0)
    if isinstance(idx, Refusal):
        return idx
    if not isinstance(idx, torch.Tensor) or idx.dim() < 2:
        return Refusal("the BatchNorm input is not a batched tensor", bn_input)
    labels = ", ".join(p.label for p, _, _ in producers)
    fmap = _map_along(idx, 1)
    if fmap is None:
        return Refusal(f"the output features of {labels} do not line up with the BatchNorm channels "
                       f"(after {', '.join(ops) or 'no op'}, a BatchNorm channel holds several features)", bn_input)
    fmap = fmap.long()
    if fmap.numel() != num_channels:
        return Refusal(f"channel mismatch: the BatchNorm has {num_channels} channels, its input {fmap.numel()}",
                       bn_input)
    if (fmap < 0).any() or torch.unique(fmap).numel() != fmap.numel():
        return Refusal(f"an output feature of {labels} lands in several BatchNorm channels", bn_input)
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


def check_constraints(constraints: list[Constraint], affine: Any, dtype: torch.dtype | None = None
                      ) -> Refusal | None:
    """The first constraint the BatchNorm's affine violates, as a Refusal; None when all hold.

    ``dtype`` is the BatchNorm's parameter dtype (see :func:`zero_shifts`).
    """
    for c in constraints:
        if c.channels.numel() == 0:
            continue
        if c.kind == "nonneg":
            neg = int((affine.scale[c.channels] < 0).sum())
            if neg:
                return Refusal(f"{c.label} commutes with the BatchNorm only where gamma >= 0 (max(s*x+t) = "
                               f"s*max(x)+t needs s >= 0); gamma < 0 on {neg} of {c.channels.numel()} channels")
        elif c.kind == "zero_shift":
            r = zero_shift_reason(c.label, c.why or "pads with zeros", affine, c.channels, dtype)
            if r is not None:
                return Refusal(("consumer " if c.consumer else "") + r)
    return None
