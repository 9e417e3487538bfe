"""Swap LayerNorm for RMSNorm: exactly where the model allows it, approximately elsewhere.

Math. Over the normalized (hidden) axis of size ``d``::

    LayerNorm(x) = g * (x - mean(x)) / sqrt(var(x) + eps) + b
    RMSNorm(x)   = g * x / sqrt(mean(x^2) + eps)

with ``var`` the biased variance. When ``mean(x) = 0`` then ``var(x) = mean(x^2)``
and the two are *equal*, with the same ``eps``. So the swap is exact once every
LayerNorm input is mean-free along the hidden axis.

Making the residual stream mean-free (``mode="exact"``). In a pre-LN
transformer the residual stream is a sum of *writers*: token / position
embeddings, class tokens, the patch-embedding convolution, attention output
projections and MLP output linears. Each is affine in its parameters along the
hidden axis, so multiplying its output by the centring projection
``P = I - 11^T/d`` is a change of parameters:

* Linear ``y = W u + c``: ``W <- P W`` (subtract the mean over output features, axis 0), ``c <- P c``;
  a Linear subclass with its own ``forward`` counts when that forward, traced, is ``x W^T (+ b)``
  and nothing else (Falcon's ``FalconLinear``);
* ``addmm(c, A, B) = c + A B`` and ``A @ B`` (Hugging Face GPT-2's ``Conv1D``, an (in, out) weight):
  ``B`` and ``c`` centred along their last (output) axis;
* Conv (groups=1) writing channels that become the hidden axis: the same on the output-channel axis;
* Embedding (and embedding-like parameters: position embeddings, class tokens):
  subtract each vector's mean over the hidden axis;
* MultiheadAttention: its ``out_proj`` as a Linear;
* a per-feature scale on a writer (LayerScale: ``s * Linear(u)`` with ``s`` a parameter read only
  there) is folded into it first as a diagonal scale, ``W <- diag(s) W``, ``c <- s * c``, ``s <- 1``,
  and the writer is then centred as usual.

Writers are recognised by what the graph shows they compute, never by class name.

Every LayerNorm is invariant to adding a constant along its normalized axis,
``LN(x) = LN(P x)``, so if the centred stream is read *only* by LayerNorms
(through ops that commute with ``P``: residual adds of centred streams, eval
dropout, identity, dtype casts, slicing / selecting / concatenating / permuting /
reshaping / expanding along the other axes, means over the other axes, scaling
by a constant) then
the model's output does not change, and afterwards every such LayerNorm sees a
mean-free input and equals an RMSNorm with the same scale, shift and eps. The
arithmetic is done in float64 and cast back once.

The dataflow comes from :func:`normfold.graph.build_graph` (torch.fx, or
torch.export with example inputs). Streams are found by walking back from each
LayerNorm's input with the hidden axis tracked through every op; shapes come from
the example inputs (torch.export placeholders get theirs from the recorded fake
values). A stream is refused, with the op named, when anything else reads it: a
post-LN block (the stream is a LayerNorm's output, also read by the next block's
projections), a head or the model output reading the stream without a final
LayerNorm, a gate. A weight tied to a reader that must keep it (an LM head tied
to the token embedding) is untied first and the untie is reported; which holder
of a tied tensor the stream reads comes from the graph, under torch.fx from the
attribute read, under torch.export (one placeholder per tied tensor) from the
module the reading op runs in. Exactness holds for eval forwards: dropout on
the stream in training mode breaks the mean-free property.

One explicit centring op. Where a stream starts at a map that is not linear in
any parameter (a GELU conv stem as in Whisper's encoder, an embedding LayerNorm
as in BLOOM, CLIP's ``pre_layrnorm``), no weight can centre it; normfold then
inserts ``x - mean(x)`` over the hidden axis once, at that point, and every
LayerNorm downstream becomes an exact RMSNorm. Where the start is a LayerNorm,
the op goes into its replacement (:class:`CentredRMSNorm`); at another module, that
module is wrapped in :class:`CentredOutput`; at a functional start, the first
module the stream enters is wrapped in :class:`CentredInput`.
It costs ``2 d`` FLOPs per token, what the centring part of
one LayerNorm costs, and is reported as a ``centre_op`` change with that cost.
The rule: at most one op per stream, and only when the stream feeds at least
:data:`MIN_LAYERNORMS_PER_CENTRING_OP` (2) LayerNorm calls, each of which then
saves its own mean and subtraction; otherwise the stream is converted
approximately, with the reason. The op is always a module (never a hook), so
normfold's safe files record and replay it like any module; a wrapped module's
parameters move under ``<path>.module``.

Hugging Face models are analysed as they come (:mod:`normfold.hf`): keyword
``example_inputs`` (a dict), caches off during the analysis and restored, the
``ModelOutput`` flattened to its tensors.

``mode="approx"`` swaps every LayerNorm for RMSNorm with the LayerNorm's scale
and eps and no centring; the output changes by the LayerNorm input's mean, and
the error is measured on example inputs (per layer and for the whole model) and
reported in ``PassResult.metrics``. ``mode="auto"`` is exact where that holds
and approximate elsewhere, and says which, and why, for every layer.

The LayerNorm's shift ``b`` is kept either in :class:`RMSNormWithBias` or, when
the LayerNorm's output is read only by one Linear (possibly through a selection
along other axes, like ViT's class-token ``x[:, 0]``), folded into that
Linear's bias: ``W (y + b) + c = W y + (W b + c)``; likewise into the packed
``in_proj_bias`` of a MultiheadAttention whose query, key and value are all that
output (self-attention).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch import nn

from normfold import hf
from normfold.errors import UsageError
from normfold.graph import GNode, ModelGraph, as_input_tuple, build_graph, describe_node, eval_mode
from normfold.norms import set_submodule
from normfold.passes.base import Change, Pass, PassResult, Skip
from normfold.passes.fold_batchnorm import producer_problem
from normfold.tolerances import MEAN_FREE_RATIO, for_dtype
from normfold.verify import compare

__all__ = ["LayerNormToRMSNorm", "layernorm_to_rmsnorm", "RMSNormWithBias", "CentredRMSNorm", "CentredOutput",
           "CentredInput", "MODES"]

log = logging.getLogger(__name__)

MODES = ("exact", "approx", "auto")


class RMSNormWithBias(nn.RMSNorm):
    """``nn.RMSNorm`` followed by a per-feature bias: where a LayerNorm's shift goes when no Linear can take it."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True, device: Any = None, dtype: Any = None) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias


class CentredRMSNorm(RMSNormWithBias):
    """``y - mean(y)`` over the last axis of ``y = RMSNorm(x) + bias``: an RMSNorm whose output starts a mean-free stream.

    Where the stream starts at a LayerNorm (BLOOM's ``word_embeddings_layernorm``, CLIP's
    ``pre_layrnorm``), the one centring op goes into that (converted) norm. A LayerNorm without a
    shift gets a zero bias.
    """

    @classmethod
    def from_rmsnorm(cls, m: nn.RMSNorm) -> "CentredRMSNorm":
        w = m.weight
        new = cls(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                  device=w.device if w is not None else None, dtype=w.dtype if w is not None else None)
        with torch.no_grad():
            if w is not None:
                new.weight.copy_(w)
                new.weight.requires_grad_(w.requires_grad)
            b = getattr(m, "bias", None)
            if isinstance(b, torch.Tensor):
                new.bias.copy_(b)
                new.bias.requires_grad_(b.requires_grad)
        new.train(m.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y - y.mean(dim=-1, keepdim=True)


class _Centred(nn.Module):
    """A module wrapping ``self.module``; its paths stay reachable: ``get_submodule("a.b")`` finds ``a.module.b``.

    The pass reports and measures layers by the paths they had before the wrapping (``blocks.0.ln1``),
    so an attribute the wrapper lacks is looked up on the wrapped module.
    """

    _normfold_wraps = "module"  # normfold.recipe records a wrapper around a module as a "wrap" edit

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None or name == "module":
                raise
            return getattr(inner, name)


class CentredOutput(_Centred):
    """``y - mean(y, dim)`` for ``y = module(...)``: the one explicit centring op, on a module's output.

    Inserted where a residual stream starts at a non-linear map (an embedding LayerNorm, CLIP's
    ``pre_layrnorm``): no parameter can make that output mean-free, this op does, so every LayerNorm
    downstream becomes an exact RMSNorm. Cost: ``2 d`` FLOPs per token (a mean and a subtraction).
    A module wrapping the original (its parameters move under ``<path>.module``), not a hook, so that
    normfold's safe files record it like any module.
    """

    def __init__(self, module: nn.Module, dim: int) -> None:
        super().__init__()
        self.module, self.dim = module, dim

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.module(*args, **kwargs)
        return y - y.mean(dim=self.dim, keepdim=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class CentredInput(_Centred):
    """``module(..., x - mean(x, dim), ...)``: ``module`` called with one input centred (positional index or keyword).

    The centring op for a stream that starts at a functional non-linearity (Whisper's GELU conv stem):
    it goes where that stream enters the first block, the nearest module boundary. A module wrapping
    that block (its parameters move under ``<path>.module``), not a pre-hook, so that normfold's safe
    files record it like any module.
    """

    def __init__(self, module: nn.Module, dim: int, arg: int | str) -> None:
        super().__init__()
        self.module, self.dim, self.arg = module, dim, arg

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.arg, int):
            args = tuple(a - a.mean(dim=self.dim, keepdim=True) if i == self.arg else a for i, a in enumerate(args))
        else:
            kwargs = dict(kwargs)
            kwargs[self.arg] = kwargs[self.arg] - kwargs[self.arg].mean(dim=self.dim, keepdim=True)
        return self.module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, arg={self.arg!r}"


# ----------------------------------------------------------------------------------------------
# op classification


def _op_name(node: GNode) -> str:
    """A canonical name for a function/method node, the same for torch.fx and torch.export (ATen) graphs."""
    t = node.target
    if node.op == "method":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[-1]
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1]
    return getattr(t, "__name__", str(t))


#: ops that read only a tensor's metadata, never its values
_META_OPS = {"_assert_tensor_metadata", "dim", "size", "sym_size", "sym_numel", "sym_stride", "numel", "_assert", "stride", "is_contiguous"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
#: ops that are the identity on values in eval
_IDENTITY_OPS = {"contiguous", "clone", "dropout", "alias", "feature_dropout", "alpha_dropout", "lift_fresh_copy",
                 "detach"}
#: dtype (and device) casts: the identity on values up to one rounding, which commutes with centring
_CAST_OPS = {"to", "_to_copy", "type_as", "float", "half", "double", "bfloat16", "type"}
_SHAPE_OPS = {"reshape", "view", "flatten", "unflatten", "_unsafe_view", "squeeze", "unsqueeze", "view_as",
              "reshape_as"}
_ADD_OPS = {"add", "iadd", "sub", "isub", "add_", "sub_"}
_SCALE_OPS = {"mul", "imul", "truediv", "itruediv", "div", "mul_", "div_"}
_REDUCE_OPS = {"mean", "sum"}
_SELECT_OPS = {"getitem", "select", "slice", "narrow"}
_DROPOUT_MODULES = (nn.modules.dropout._DropoutNd, nn.Identity)


#: LayerNorm subclasses whose forward is F.layer_norm over the trailing normalized_shape, by (module, qualname)
_KNOWN_LAYERNORM_FORWARDS = {("timm.layers.norm", "LayerNorm.forward")}


def _is_standard_layernorm(m: nn.Module) -> bool:
    if not isinstance(m, nn.LayerNorm):
        return False
    fwd = type(m).forward
    return fwd is nn.LayerNorm.forward or (getattr(fwd, "__module__", ""), getattr(fwd, "__qualname__", "")) \
        in _KNOWN_LAYERNORM_FORWARDS


def _norm_rank(m: nn.LayerNorm) -> int:
    return len(tuple(m.normalized_shape))


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


@dataclass
class _Writer:
    """A node whose output is made mean-free by centring parameters."""

    node: GNode
    desc: str
    #: (owner module path, attribute name, axis to centre along) of every tensor it centres
    slots: list[tuple[str, str, int]]
    #: module path whose every call must be a writer in an exact stream (None for a bare parameter)
    module_path: str | None


@dataclass(frozen=True)
class _AddmmTarget:
    """An ``addmm(bias, x, weight)`` reader (HF Conv1D, an (in, out) weight) that takes a LayerNorm's shift."""

    path: str
    weight: str
    bias: str


@dataclass
class _LayerScale:
    """A per-feature parameter ``scale`` (axis ``axis`` of it) multiplying the output of ``writer``."""

    scale: tuple[str, str]
    writer: str
    axis: int


@dataclass
class _Analysis:
    """Where the residual streams are, who writes them, and what stops each from being made mean-free."""

    graph: ModelGraph
    axis: dict[GNode, int] = field(default_factory=dict)        # stream node -> hidden axis (negative)
    reads_ok: set[tuple[GNode, GNode]] = field(default_factory=set)  # (reader, stream node) pairs accounted for
    problems: dict[Any, list[str]] = field(default_factory=dict)
    writers: dict[GNode, _Writer] = field(default_factory=dict)
    ln_calls: list[GNode] = field(default_factory=list)
    parent: dict[Any, Any] = field(default_factory=dict)
    ln_keys: dict[GNode, "_ReaderKey"] = field(default_factory=dict)
    #: stream nodes computed by a non-linear map (stream node -> (hidden axis, why its parameters cannot centre it)):
    #: where one explicit centring op can start a mean-free stream
    sites: dict[GNode, tuple[int, str]] = field(default_factory=dict)
    #: per-feature scales on writers (mul node -> what to fold where)
    layerscales: dict[GNode, "_LayerScale"] = field(default_factory=dict)

    def reader_key(self, ln_call: GNode) -> "_ReaderKey":
        """The union-find key of a LayerNorm call as a *reader* of its input.

        A LayerNorm call's output is another tensor (in a post-LN model, the next stream): keeping its
        reading side apart stops the stream it reads and the stream it writes from merging.
        """
        return self.ln_keys.setdefault(ln_call, _ReaderKey(ln_call))

    # union-find over stream nodes and LayerNorm calls (as readers)
    def find(self, n: Any) -> Any:
        self.parent.setdefault(n, n)
        while self.parent[n] is not n:
            self.parent[n] = self.parent[self.parent[n]]
            n = self.parent[n]
        return n

    def union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[ra] = rb

    def problem(self, n: Any, reason: str) -> None:
        lst = self.problems.setdefault(n, [])
        if reason not in lst:
            lst.append(reason)


@dataclass(eq=False)
class _ReaderKey:
    ln_call: GNode


class _StreamFinder:
    """Walks back from every LayerNorm input, tracking the hidden axis, to the writers of each stream."""

    def __init__(self, graph: ModelGraph, shared_slots: dict[int, list[tuple[str, str]]]) -> None:
        self.g = graph
        self.a = _Analysis(graph)
        self.shared_slots = shared_slots
        self.work: list[GNode] = []

    # -- helpers ------------------------------------------------------------------------------
    def demand(self, reader: GNode, n: GNode, axis: int, key: Any = None) -> None:
        """``reader`` needs ``n`` mean-free along ``axis`` (negative)."""
        a = self.a
        a.reads_ok.add((reader, n))
        a.union(reader if key is None else key, n)
        if n in a.axis:
            if a.axis[n] != axis:
                a.problem(n, f"{describe_node(self.g, n)} would have to be mean-free along two different axes "
                             f"({a.axis[n]} and {axis})")
            return
        a.axis[n] = axis
        self.work.append(n)

    def _fx_args(self, n: GNode) -> tuple[tuple, dict, dict[torch.fx.Node, GNode]]:
        fx = n.fx_node
        args, kwargs = (tuple(fx.args), dict(fx.kwargs)) if fx is not None else ((), {})
        tensor_nodes: list[torch.fx.Node] = []
        torch.fx.node.map_arg((args, kwargs), lambda x: tensor_nodes.append(x))
        mapping = {t: g for t, g in zip(tensor_nodes, n.args)}
        return args, kwargs, mapping

    @staticmethod
    def _rank(n: GNode) -> int | None:
        return len(n.shape) if n.shape is not None else None

    # -- the walk -----------------------------------------------------------------------------
    def run(self) -> _Analysis:
        g, a = self.g, self.a
        for n in g.nodes:
            if n.op == "module" and _is_standard_layernorm(g.modules[n.target]):
                a.ln_calls.append(n)
                key = a.reader_key(n)
                a.find(key)
                if _norm_rank(g.modules[n.target]) != 1:
                    a.problem(key, "it normalizes over several axes; the exact swap is made for one hidden axis")
                    continue
                if not n.args:
                    a.problem(key, "its input could not be traced")
                    continue
                self.demand(n, n.args[0], -1, key=key)
        while self.work:
            n = self.work.pop()
            try:
                self.visit(n, a.axis[n])
            except _NonLinear as r:
                a.sites[n] = (a.axis[n], str(r))
            except _Refuse as r:
                a.problem(n, str(r))
        self.check_readers()
        return a

    def visit(self, n: GNode, axis: int) -> None:
        g = self.g
        if n.op == "input":
            raise _Refuse(f"the stream includes the model input {n.target!r}, which normfold cannot centre")
        if n.op == "attr":
            return self.param_writer(n, axis)
        if n.op == "module":
            return self.module_node(n, axis)
        if n.op in ("function", "method"):
            return self.function_node(n, axis)
        raise _Refuse(f"{describe_node(g, n)} is not a tensor op normfold understands")

    def param_writer(self, n: GNode, axis: int) -> None:
        g = self.g
        owner, _, name = str(n.target).rpartition(".")
        try:
            t = g.root.get_submodule(owner) if owner else g.root
            value = getattr(t, name)
        except AttributeError:
            raise _Refuse(f"the tensor {n.target} is not a parameter or buffer of the model") from None
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise _Refuse(f"{n.target} is not a floating-point tensor")
        if value.dim() < -axis:
            raise _Refuse(f"{n.target} {tuple(value.shape)} is broadcast along the hidden axis")
        if value.shape[axis] == 1:
            raise _Refuse(f"{n.target} {tuple(value.shape)} has size 1 along the hidden axis (a constant "
                          "broadcast over it cannot be mean-free)")
        holders = self.shared_slots.get(id(value), [])
        if len(holders) > 1 and g.source != "fx":
            # torch.export keeps one placeholder for a tied tensor, under one of its names: which holder the
            # stream reads is the one whose module the reading ops run in (their nn_module_stack).
            owner, name = self.export_slot(n, holders)
        if owner in g.calls:
            raise _Refuse(f"{_slot_name((owner, name))} is also read inside {owner} ({type(g.modules[owner]).__name__}), "
                          "which normfold would change too")
        self.a.writers[n] = _Writer(n, f"the parameter {_slot_name((owner, name))}", [(owner, name, value.dim() + axis)],
                                    None)

    def export_slot(self, n: GNode, holders: list[tuple[str, str]]) -> tuple[str, str]:
        """The (module path, attribute) of a tied tensor that the stream's reads of placeholder ``n`` go through."""
        found: set[tuple[str, str]] = set()
        for u in n.users:
            if (u, n) not in self.a.reads_ok:
                continue
            stack = u.fx_node.meta.get("nn_module_stack", {}) if u.fx_node is not None else {}
            paths = [_stack_path(v) for v in reversed(list(stack.values()))]
            slot = next((h for p in paths for h in holders if h[0] == p), None)
            if slot is None:
                raise _Refuse(f"{n.target} is tied to {', '.join(_slot_name(h) for h in holders if _slot_name(h) != n.target)} "
                              "(tied weights) and torch.export does not say which of them the stream reads")
            found.add(slot)
        if len(found) != 1:
            raise _Refuse(f"{n.target} is tied to {_short_list([_slot_name(h) for h in holders])} and the stream reads "
                          "it through several of them")
        return found.pop()

    def module_node(self, n: GNode, axis: int) -> None:
        g = self.g
        path = n.target
        m = g.modules[path]
        if isinstance(m, _DROPOUT_MODULES):
            if not n.args:
                raise _Refuse(f"the input of {path} could not be traced")
            return self.demand(n, n.args[0], axis)
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(m).__name__.endswith("Norm"):
            raise _NonLinear(f"the stream is the output of {path} ({type(m).__name__}), which cannot be made mean-free "
                          "(a post-LN block: the normalized output is itself the residual stream)")
        if isinstance(m, nn.MultiheadAttention):
            raise _Refuse(f"{path} (MultiheadAttention) is read as a tuple")
        if isinstance(m, nn.Embedding):
            if type(m).forward is not nn.Embedding.forward:
                raise _Refuse(f"{path} ({type(m).__name__}) overrides forward()")
            if m.max_norm is not None:
                raise _Refuse(f"{path} (Embedding) renormalizes rows (max_norm), which centring would change")
            if axis != -1:
                raise _Refuse(f"{path} (Embedding) writes its features on the last axis, the stream's hidden axis is {axis}")
            return self.module_writer(n, path, [(path, "weight", 1)], f"{path} (Embedding)")
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            raise _Refuse(f"{path} ({type(m).__name__}) writes into the stream; normfold centres only Conv with groups=1")
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            problem = _writer_problem(m)
            if problem is not None:
                raise _Refuse(f"{path}: {problem}")
            if isinstance(m, nn.Linear):
                if axis != -1:
                    raise _Refuse(f"{path} (Linear) writes its features on the last axis, the stream's hidden axis is {axis}")
            else:
                if m.groups != 1:
                    raise _Refuse(f"{path} ({type(m).__name__}) has groups={m.groups}; centring its output channels "
                                  "needs groups=1")
                rank = self._rank(n)
                if rank is None:
                    raise _Refuse(f"the output rank of {path} is unknown; pass example_inputs")
                if rank + axis != 1:
                    raise _Refuse(f"{path} ({type(m).__name__}) writes channels on axis 1, the stream's hidden axis "
                                  f"is {rank + axis}")
            slots = [(path, "weight", 0)] + ([(path, "bias", 0)] if m.bias is not None else [])
            return self.module_writer(n, path, slots, f"{path} ({type(m).__name__})")
        raise _NonLinear(f"{path} ({type(m).__name__}) writes into the stream; normfold can centre Linear, Conv (groups=1), "
                      "Embedding and MultiheadAttention outputs, and parameters")

    def module_writer(self, n: GNode, path: str, slots: list[tuple[str, str, int]], desc: str) -> None:
        g = self.g
        external = g.external_param_reads(path)
        if external:
            raise _Refuse(f"the parameters of {path} are also read directly in forward() ({', '.join(external)})")
        self.a.writers[n] = _Writer(n, desc, slots, path)

    def function_node(self, n: GNode, axis: int) -> None:
        g = self.g
        name = _op_name(n)
        args, kwargs, fx2g = self._fx_args(n)

        def gn(x: Any) -> GNode | None:
            return fx2g.get(x) if isinstance(x, torch.fx.Node) else None

        first = gn(args[0]) if args else None
        if name in _IDENTITY_OPS or name in _CAST_OPS:
            if first is None:
                raise _Refuse(f"a {name} call reads something normfold cannot trace")
            return self.demand(n, first, axis)
        if name == "getitem" and first is not None and first.op == "module" and \
                isinstance(g.modules[first.target], nn.MultiheadAttention):
            return self.mha_writer(n, first, args[1] if len(args) > 1 else None, axis)
        if name in _SELECT_OPS:
            if first is None:
                raise _Refuse(f"a {name} call reads something normfold cannot trace")
            in_axis = _selection_input_axis(name, args, kwargs, first, n, axis, gn)
            return self.demand(n, first, in_axis)
        if name in _ADD_OPS:
            return self.add_node(n, name, args, kwargs, axis, gn)
        if name in _SCALE_OPS or name == "neg":
            return self.scale_node(n, name, args, axis, gn)
        if name in _SHAPE_OPS:
            if first is None or first.shape is None or n.shape is None:
                raise _Refuse(f"a {name} call on the stream needs tensor shapes; pass example_inputs")
            in_axis = _reshape_input_axis(n.shape, first.shape, axis)
            if in_axis is None:
                raise _Refuse(f"a {name} call from {tuple(first.shape)} to {tuple(n.shape)} splits or merges the "
                              "hidden axis")
            return self.demand(n, first, in_axis)
        if name in ("permute", "transpose", "swapaxes", "movedim"):
            return self.permute_node(n, name, args, kwargs, axis, first)
        if name == "expand" or name == "expand_as" or name == "broadcast_to":
            if first is None or first.shape is None or n.shape is None:
                raise _Refuse("an expand of the stream needs tensor shapes; pass example_inputs")
            if len(first.shape) < -axis or first.shape[axis] != n.shape[axis]:
                raise _Refuse(f"an expand broadcasts {tuple(first.shape)} along the hidden axis")
            return self.demand(n, first, axis)
        if name in ("cat", "concat", "concatenate"):
            return self.cat_node(n, args, kwargs, axis, gn)
        if name in _REDUCE_OPS:
            return self.reduce_node(n, name, args, kwargs, axis, first)
        if name == "linear":
            # F.linear / aten.linear(x, W, b): mean-free output features <=> W, b centred along output features
            if axis != -1:
                raise _Refuse(f"a linear call writes features on the last axis, the stream's hidden axis is {axis}")
            w = gn(args[1]) if len(args) > 1 else gn(kwargs.get("weight"))
            b = gn(args[2]) if len(args) > 2 else gn(kwargs.get("bias"))
            if w is None:
                raise _Refuse("a linear call whose weight normfold cannot trace")
            self.demand(n, w, -2)
            if b is not None:
                self.demand(n, b, -1)
            return
        if name in ("addmm", "mm", "matmul", "bmm", "baddbmm"):
            # addmm(c, A, B) = c + A @ B (HF GPT-2's Conv1D: B an (in, out) weight) and A @ B: output feature j is
            # column j of B, so a mean-free output <=> B (and c) centred along their last axis
            if axis != -1:
                raise _Refuse(f"a {name} writes features on the last axis, the stream's hidden axis is {axis}")
            c, mats = (args[0], args[1:3]) if name in ("addmm", "baddbmm") else (None, args[0:2])
            b_node = gn(mats[1]) if len(mats) > 1 else None
            if b_node is None:
                raise _Refuse(f"a {name} whose right operand normfold cannot trace")
            for k in ("beta", "alpha"):
                if not isinstance(kwargs.get(k, 1), (int, float)):
                    raise _Refuse(f"a {name} with a tensor {k}")
            self.demand(n, b_node, -1)
            if c is not None:
                c_node = gn(c)
                if c_node is None:
                    if not (isinstance(c, (int, float)) and c == 0):
                        raise _Refuse(f"a {name} adds the constant {c!r} to the stream, which is not mean-free")
                else:
                    self.demand(n, c_node, -1)
            return
        if name in ("t", "numpy_T") or (name == "getattr" and len(args) > 1 and args[1] in ("T", "mT")):
            if first is None or first.shape is None or len(first.shape) != 2:
                raise _Refuse(f"a transpose ({name}) of the stream needs a 2-D tensor of known shape")
            return self.demand(n, first, -1 if axis == -2 else -2)
        if name == "embedding":
            # F.embedding(input, weight, ...) ; aten.embedding(weight, indices, ...)
            is_aten = isinstance(n.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
            w = gn(args[0]) if is_aten else (gn(args[1]) if len(args) > 1 else gn(kwargs.get("weight")))
            if not is_aten and (kwargs.get("max_norm") is not None or (len(args) > 3 and args[3] is not None)):
                raise _Refuse("an embedding call with max_norm renormalizes rows, which centring would change")
            if w is None or axis != -1:
                raise _Refuse("an embedding call normfold cannot centre")
            return self.demand(n, w, -1)
        raise _NonLinear(f"{describe_node(g, n)} writes into the stream and does not commute with centring")

    def mha_writer(self, n: GNode, mha_node: GNode, index: Any, axis: int) -> None:
        g = self.g
        path = mha_node.target
        m = g.modules[path]
        if index != 0:
            raise _Refuse(f"the stream reads output {index!r} of {path} (MultiheadAttention), not its attention output")
        if type(m).forward is not nn.MultiheadAttention.forward:
            raise _Refuse(f"{path} ({type(m).__name__}) overrides forward()")
        if axis != -1:
            raise _Refuse(f"{path} (MultiheadAttention) writes features on the last axis, the hidden axis is {axis}")
        out = m.out_proj
        problem = producer_problem(out)
        if problem is not None:
            raise _Refuse(f"{path}.out_proj: {problem}")
        a = self.a
        a.reads_ok.add((n, mha_node))
        a.union(n, mha_node)
        # The other outputs (attention weights) do not depend on out_proj.
        for u in mha_node.users:
            if u is not n and u.op == "function" and _op_name(u) == "getitem" and u.fx_node is not None \
                    and len(u.fx_node.args) > 1 and u.fx_node.args[1] != 0:
                a.reads_ok.add((u, mha_node))
        a.axis.setdefault(mha_node, axis)
        op = f"{path}.out_proj"
        slots = [(op, "weight", 0)] + ([(op, "bias", 0)] if out.bias is not None else [])
        external = g.external_param_reads(path)
        if external:
            raise _Refuse(f"the parameters of {path} are also read directly in forward() ({', '.join(external)})")
        a.writers[mha_node] = _Writer(mha_node, f"{path} (MultiheadAttention, out_proj)", slots, path)

    def add_node(self, n: GNode, name: str, args: tuple, kwargs: dict, axis: int, gn: Callable) -> None:
        operands = list(args[:2]) + [kwargs[k] for k in ("other",) if k in kwargs]
        for x in operands:
            x_node = gn(x)
            if x_node is None:
                if isinstance(x, (int, float)) and x == 0:
                    continue
                raise _Refuse(f"an {name} adds the constant {x!r} to the stream, which is not mean-free")
            if x_node.shape is not None and (len(x_node.shape) < -axis or
                                             (n.shape is not None and x_node.shape[axis] != n.shape[axis])):
                raise _Refuse(f"an {name} broadcasts {describe_node(self.g, x_node)} {tuple(x_node.shape)} along the "
                              "hidden axis")
            self.demand(n, x_node, axis)

    def scale_node(self, n: GNode, name: str, args: tuple, axis: int, gn: Callable) -> None:
        if name == "neg":
            first = gn(args[0]) if args else None
            if first is None:
                raise _Refuse("a neg call reads something normfold cannot trace")
            return self.demand(n, first, axis)
        tensors = [(i, gn(x)) for i, x in enumerate(args[:2]) if gn(x) is not None]
        stream = []
        for i, t in tensors:
            # A factor that is constant along the hidden axis (a number, or size 1 there) commutes with centring.
            const_along_hidden = t.shape is not None and (len(t.shape) < -axis or t.shape[axis] == 1) and \
                not (n.shape is not None and n.shape[axis] == 1)
            if not const_along_hidden:
                stream.append((i, t))
        if len(stream) == 2 and name in ("mul", "imul", "mul_"):
            for (_, s), (_, x) in ((stream[0], stream[1]), (stream[1], stream[0])):
                fold = self.layerscale(n, s, x, axis)
                if fold is not None:
                    self.a.layerscales[n] = fold
                    return self.demand(n, x, axis)
        if len(stream) != 1 or (name in ("truediv", "div", "itruediv", "div_") and stream[0][0] != 0):
            raise _Refuse(f"a {name} multiplies the stream by a tensor that varies along the hidden axis "
                          "(a gate, or a per-feature scale that is not a parameter read only there applied to "
                          "the output of a Linear or Conv)")
        self.demand(n, stream[0][1], axis)

    def layerscale(self, n: GNode, s: GNode, x: GNode, axis: int) -> "_LayerScale | None":
        """``s * x`` with ``s`` a per-feature parameter (LayerScale) and ``x`` a Linear/Conv output read only here.

        ``diag(s) (W u + c) = (diag(s) W) u + s * c``: the scale folds into the writer's weights.
        """
        g = self.g
        if s.op != "attr" or len([u for u in s.users if not _reads_metadata_only(u)]) != 1:
            return None
        owner, _, name = str(s.target).rpartition(".")
        value = _get_tensor(g.root, owner, name)
        if value is None or not value.is_floating_point() or value.dim() < -axis or n.shape is None:
            return None
        if value.shape[axis] != n.shape[axis] or value.numel() != n.shape[axis] or \
                len(self.shared_slots.get(id(value), [])) > 1:
            return None
        cur = x
        for _ in range(8):
            if len([u for u in cur.users if not _reads_metadata_only(u)]) != 1:
                return None
            if cur.op == "module" and isinstance(g.modules[cur.target], _DROPOUT_MODULES) and cur.args:
                cur = cur.args[0]
            elif cur.op in ("function", "method") and _op_name(cur) in _IDENTITY_OPS and cur.args:
                cur = cur.args[0]
            else:
                break
        if cur.op != "module" or g.call_count(cur.target) != 1:
            return None
        m = g.modules[cur.target]
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or isinstance(m, nn.modules.conv._ConvTransposeNd) \
                or _writer_problem(m) is not None:
            return None
        return _LayerScale((owner, name), cur.target, value.dim() + axis)

    def permute_node(self, n: GNode, name: str, args: tuple, kwargs: dict, axis: int, first: GNode | None) -> None:
        if first is None or n.shape is None:
            raise _Refuse(f"a {name} of the stream needs tensor shapes; pass example_inputs")
        rank = len(n.shape)
        out_ax = rank + axis
        if name == "permute":
            dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else \
                (args[1] if len(args) > 1 else kwargs.get("dims"))
            dims = [int(d) % rank for d in dims]
            in_ax = dims[out_ax]
        elif name in ("transpose", "swapaxes"):
            d0, d1 = (int(args[1]) % rank, int(args[2]) % rank) if len(args) > 2 else \
                (int(kwargs.get("dim0")) % rank, int(kwargs.get("dim1")) % rank)
            in_ax = d1 if out_ax == d0 else d0 if out_ax == d1 else out_ax
        else:
            raise _Refuse(f"a {name} of the stream is not supported")
        self.demand(n, first, in_ax - rank)

    def cat_node(self, n: GNode, args: tuple, kwargs: dict, axis: int, gn: Callable) -> None:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if n.shape is None:
            raise _Refuse("a cat of the stream needs tensor shapes; pass example_inputs")
        rank = len(n.shape)
        if int(dim) % rank == rank + axis:
            raise _Refuse("a cat joins tensors along the hidden axis")
        for t in tensors:
            t_node = gn(t)
            if t_node is None:
                raise _Refuse("a cat reads something normfold cannot trace")
            self.demand(n, t_node, axis)

    def reduce_node(self, n: GNode, name: str, args: tuple, kwargs: dict, axis: int, first: GNode | None) -> None:
        if first is None or first.shape is None or n.shape is None:
            raise _Refuse(f"a {name} of the stream needs tensor shapes; pass example_inputs")
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keep = bool(args[2]) if len(args) > 2 else bool(kwargs.get("keepdim", False))
        in_rank = len(first.shape)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            raise _Refuse(f"a {name} over every axis of the stream")
        dims = [int(d) % in_rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        kept = list(range(in_rank)) if keep else [d for d in range(in_rank) if d not in dims]
        out_ax = len(n.shape) + axis
        in_ax = kept[out_ax]
        if in_ax in dims:
            raise _Refuse(f"a {name} over the hidden axis")
        self.demand(n, first, in_ax - in_rank)

    # -- who reads the stream --------------------------------------------------------------------
    def check_readers(self) -> None:
        g, a = self.g, self.a
        for n in list(a.axis):
            readers = [_consumer(g, u) for u in n.users if (u, n) not in a.reads_ok and not _reads_metadata_only(u)]
            if readers:
                what = f"the output of {describe_node(g, n)}" if n.op == "module" else "the residual stream"
                a.problem(n, f"{what} is also read by {_short_list(list(dict.fromkeys(readers)))}, not only by "
                             "LayerNorms and residual adds")


class _Refuse(Exception):
    """Raised inside the stream walk: this node stops its stream from being made mean-free."""


class _NonLinear(_Refuse):
    """This stream node is a non-linear map of its inputs: its output can only be centred by an explicit op."""


def _reads_metadata_only(u: GNode) -> bool:
    name = _op_name(u) if u.op in ("function", "method") else ""
    if name in _META_OPS:
        return True
    if name == "getattr" and u.fx_node is not None and len(u.fx_node.args) > 1 and u.fx_node.args[1] in _META_ATTRS:
        return True
    return False


def _consumer(graph: ModelGraph, u: GNode) -> str:
    """Name the op that really consumes the stream, following selections, identities and adds a few steps."""
    via: list[str] = []
    following = _SELECT_OPS | _IDENTITY_OPS | _CAST_OPS | _SHAPE_OPS | _ADD_OPS | {"cat"}
    for _ in range(6):
        passes_through = (u.op in ("function", "method") and _op_name(u) in following) or \
            (u.op == "module" and isinstance(graph.modules.get(u.target), _DROPOUT_MODULES))
        real = [x for x in u.users if not _reads_metadata_only(x)]
        if not passes_through or len(real) != 1:
            break
        via.append(u.target if u.op == "module" else _op_name(u))
        u = real[0]
    name = "the model output" if u.op == "output" else describe_node(graph, u)
    return f"{name} (via {', '.join(via)})" if via else name


def _selection_input_axis(name: str, args: tuple, kwargs: dict, src: GNode, n: GNode, axis: int,
                          gn: Callable) -> int:
    """The input axis (negative) that a selection's output ``axis`` comes from, or raise _Refuse."""
    in_rank = len(src.shape) if src.shape is not None else None
    out_rank = len(n.shape) if n.shape is not None else None
    if in_rank is None or out_rank is None:
        raise _Refuse(f"a {name} of the stream needs tensor shapes; pass example_inputs")
    out_ax = out_rank + axis
    if name in ("select", "slice", "narrow"):
        dim = int(args[1]) % in_rank if len(args) > 1 else int(kwargs.get("dim", 0)) % in_rank
        if name == "select":
            in_ax = out_ax if out_ax < dim else out_ax + 1
            return in_ax - in_rank
        if out_ax == dim:
            if name == "slice":
                start = args[2] if len(args) > 2 else kwargs.get("start")
                end = args[3] if len(args) > 3 else kwargs.get("end")
                step = args[4] if len(args) > 4 else kwargs.get("step", 1)
                if (start in (None, 0)) and (end is None or (isinstance(end, int) and end >= src.shape[dim])) \
                        and step in (None, 1):
                    return out_ax - in_rank
            raise _Refuse(f"a {name} cuts the hidden axis")
        return out_ax - in_rank
    # getitem with basic indexing
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    for it in items:
        if isinstance(it, torch.fx.Node):
            tn = gn(it)
            if tn is not None and tn.shape is not None and len(tn.shape) > 0:
                raise _Refuse("an advanced (tensor) index of the stream")
        elif isinstance(it, (list, torch.Tensor)) or isinstance(it, bool):
            raise _Refuse("an advanced (tensor) index of the stream")
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded: list[Any] = []
    has_ellipsis = any(it is Ellipsis for it in items)
    for it in items:
        if it is Ellipsis:
            expanded.extend([slice(None)] * (in_rank - consuming))
        else:
            expanded.append(it)
    if not has_ellipsis:
        expanded.extend([slice(None)] * (in_rank - consuming))
    i_ax = o_ax = 0
    for it in expanded:
        if it is None:
            if o_ax == out_ax:
                raise _Refuse("an index inserts the hidden axis")
            o_ax += 1
        elif isinstance(it, slice):
            if o_ax == out_ax:
                full = it.start in (None, 0) and it.step in (None, 1) and (
                    it.stop is None or (isinstance(it.stop, int) and it.stop >= src.shape[i_ax]))
                if not full:
                    raise _Refuse("an index slices the hidden axis")
                return i_ax - in_rank
            i_ax += 1
            o_ax += 1
        else:  # an integer (constant or traced scalar) drops that axis
            i_ax += 1
    raise _Refuse("an index of the stream normfold cannot follow")


def _writer_problem(m: nn.Module) -> str | None:
    """Why ``m`` cannot have its output features centred through its weights, or None.

    :func:`normfold.passes.fold_batchnorm.producer_problem`, except that a Linear subclass with its own
    ``forward`` is accepted when its traced forward *is* ``x W^T + b`` (Falcon's ``FalconLinear``).
    """
    problem = producer_problem(m)
    if problem is not None and isinstance(m, nn.Linear) and problem.endswith("overrides forward()") \
            and _forward_is_linear(m):
        problem = producer_problem(_PlainLinearView(m))
    return problem


class _PlainLinearView(nn.Linear):
    """The same weight and bias seen as a plain ``nn.Linear``, to ask producer_problem about the rest."""

    def __init__(self, m: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.weight, self.bias = m.weight, m.bias
        self._orig = m

    def __getattr__(self, name: str) -> Any:  # parametrization / weight_norm attributes of the original
        if name in ("weight_g", "weight_orig", "parametrizations"):
            return getattr(self._orig, name)
        return super().__getattr__(name)


_LINEAR_FORWARD_CACHE: dict[tuple[type, bool], bool] = {}


def _forward_is_linear(m: nn.Linear) -> bool:
    """Whether ``type(m).forward``, traced by torch.fx, computes exactly ``x W^T (+ b)`` and nothing else.

    Accepted graphs: ``linear(x, weight[, bias])``, or ``matmul(x, weight^T)`` (``weight.T``, ``weight.t()``,
    ``weight.transpose(0, 1)``) followed, when the module has a bias, by ``+ bias``.
    """
    key = (type(m), m.bias is not None)
    if key in _LINEAR_FORWARD_CACHE:
        return _LINEAR_FORWARD_CACHE[key]
    import operator

    ok = False
    try:
        graph = torch.fx.Tracer().trace(m)
    except Exception:
        graph = None
    if graph is not None:
        nodes = list(graph.nodes)
        ph = [n for n in nodes if n.op == "placeholder"]
        out = [n for n in nodes if n.op == "output"]

        def attr(n: Any, name: str) -> bool:
            return isinstance(n, torch.fx.Node) and n.op == "get_attr" and n.target == name

        def w_t(n: Any) -> bool:
            if not isinstance(n, torch.fx.Node) or not n.args or not attr(n.args[0], "weight"):
                return False
            if n.op == "call_function" and n.target is getattr and n.args[1:] == ("T",):
                return True
            if n.op in ("call_method", "call_function") and (n.target in ("t", torch.t)):
                return len(n.args) == 1
            if n.op in ("call_method", "call_function") and n.target in ("transpose", torch.transpose):
                return {int(d) % 2 for d in n.args[1:3]} == {0, 1} if len(n.args) == 3 else False
            return False

        def core(n: Any) -> bool:
            if not isinstance(n, torch.fx.Node) or n.op != "call_function":
                return False
            if n.target in (operator.matmul, torch.matmul) and len(n.args) == 2 and n.args[0] is ph[0]:
                return w_t(n.args[1])
            return False

        if len(ph) == 1 and len(out) == 1:
            y = out[0].args[0]
            used = {n for n in nodes if n.op not in ("placeholder", "output")}
            if isinstance(y, torch.fx.Node) and y.op == "call_function" and y.target is torch.nn.functional.linear:
                a = list(y.args) + [y.kwargs.get("bias")] * (3 - len(y.args))
                ok = a[0] is ph[0] and attr(a[1], "weight") and (attr(a[2], "bias") if m.bias is not None else a[2] is None)
                ok = ok and len(used) == 1 + 1 + (m.bias is not None)
            elif m.bias is None:
                ok = core(y) and len(used) == 3
            elif isinstance(y, torch.fx.Node) and y.op == "call_function" and y.target in (operator.add, torch.add) \
                    and len(y.args) == 2:
                lhs, rhs = y.args
                ok = ((core(lhs) and attr(rhs, "bias")) or (core(rhs) and attr(lhs, "bias"))) and len(used) == 5
    _LINEAR_FORWARD_CACHE[key] = ok
    return ok


@dataclass
class _Site:
    """Where the one explicit centring op of a stream goes."""

    node: GNode                 # the non-linear stream node
    kind: str                   # "output": forward hook on the module computing it; "input": pre-hook where it enters
    path: str
    dim: int                    # hidden axis (negative) of the centred tensor
    shape: tuple[int, ...] | None
    reason: str                 # why the stream's parameters cannot centre it
    arg: int | str | None = None

    @property
    def width(self) -> int:
        return int(self.shape[self.dim]) if self.shape else 0


#: a centring op costs what the centring part of one LayerNorm costs; it pays only when it makes at least this
#: many LayerNorm calls exact (each of them then drops its own mean and subtraction)
MIN_LAYERNORMS_PER_CENTRING_OP = 2


def _place_centring_ops(module: nn.Module, graph: ModelGraph, a: _Analysis, inputs: tuple) -> list[_Site]:
    """One centring op per stream that starts at a non-linear map, where it is worth it and can be placed.

    The rule: at most one op per stream (more non-linear starts -> approximate), and only when the stream
    feeds at least :data:`MIN_LAYERNORMS_PER_CENTRING_OP` LayerNorm calls. Refusals become problems of the
    stream (it is then converted approximately, with the reason).
    """
    by_root: dict[Any, list[GNode]] = {}
    for n in a.sites:
        by_root.setdefault(a.find(n), []).append(n)
    placed: list[_Site] = []
    troubled = {a.find(k) for k in a.problems}
    for root, nodes in by_root.items():
        reasons = [a.sites[n][1] for n in nodes]
        if root in troubled:  # not exact anyway (a post-LN block, a head reading the stream): no op to discuss
            for n in nodes:
                a.problem(n, a.sites[n][1])
            continue
        if len(nodes) > 1:
            for n in nodes:
                a.problem(n, f"{a.sites[n][1]} (the stream starts at {len(nodes)} non-linear maps; normfold adds at "
                             "most one centring op per stream)")
            continue
        n = nodes[0]
        axis, reason = a.sites[n]
        lns = sum(1 for c in a.ln_calls if a.find(a.reader_key(c)) is root)
        if lns < MIN_LAYERNORMS_PER_CENTRING_OP:
            a.problem(n, f"{reason} (a centring op there would make only {lns} LayerNorm call exact, which saves no "
                         "more than it costs)")
            continue
        if not inputs:
            a.problem(n, f"{reason} (a centring op could make it exact: pass example_inputs)")
            continue
        try:
            placed.append(_site_for(graph, a, n, axis, reasons[0]))
        except _Refuse as r:
            a.problem(n, f"{reason} ({r})")
    if placed:
        for site, problem in zip(list(placed), _probe_sites(module, inputs, placed)):
            if problem is not None:
                a.problem(site.node, f"{site.reason} ({problem})")
                placed.remove(site)
    return placed


def _node_stack(n: GNode) -> list[str]:
    stack = n.fx_node.meta.get("nn_module_stack") if n.fx_node is not None else None
    return [p for p in (_stack_path(v) for v in (stack or {}).values()) if p and not p.startswith("L[")]


def _site_for(graph: ModelGraph, a: _Analysis, n: GNode, axis: int, reason: str) -> _Site:
    """A module output hook when ``n`` is a module call; else a pre-hook on the first module the stream enters."""
    if n.op == "module":
        if graph.call_count(n.target) != 1:
            raise _Refuse(f"{n.target} is called {graph.call_count(n.target)} times")
        return _Site(n, "output", n.target, axis, n.shape, reason)
    cur = n
    for _ in range(32):
        users = [u for u in cur.users if not _reads_metadata_only(u)]
        if not users:
            break
        here = set(_node_stack(cur))
        stacks = [_node_stack(u) for u in users]
        common = [p for p in stacks[0] if p not in here and all(p in st for st in stacks[1:])]
        if common:
            return _Site(cur, "input", common[0], a.axis.get(cur, axis), cur.shape, reason)
        if len(users) == 1 and users[0] in a.axis and users[0].op in ("function", "method"):
            cur = users[0]
            continue
        break
    raise _Refuse("no module boundary where the stream enters a block, to put a centring op on")


def _probe_sites(module: nn.Module, inputs: tuple, sites: list[_Site]) -> list[str | None]:
    """Run the model once with recording hooks: each site's module must be called once, with the tensor expected."""
    seen: list[list[Any]] = [[] for _ in sites]
    handles = []
    for i, site in enumerate(sites):
        m = module.get_submodule(site.path)
        if site.kind == "output":
            handles.append(m.register_forward_hook(
                lambda mod, args, out, i=i: seen[i].append(tuple(out.shape) if isinstance(out, torch.Tensor) else None)))
        else:
            def pre(mod: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                seen[i].append(([tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in args],
                                {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}))
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with eval_mode(module), torch.no_grad():
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    problems: list[str | None] = []
    for site, calls in zip(sites, seen):
        if len(calls) != 1:
            problems.append(f"{site.path} is called {len(calls)} times")
            continue
        if site.kind == "output":
            problems.append(None if calls[0] == site.shape else f"{site.path} does not return the stream as one tensor")
            continue
        pos, kw = calls[0]
        match = [i for i, sh in enumerate(pos) if sh == site.shape]
        kw_match = [k for k, sh in kw.items() if sh == site.shape]
        if len(match) + len(kw_match) != 1:
            problems.append(f"cannot tell which input of {site.path} is the stream")
            continue
        site.arg = match[0] if match else kw_match[0]
        problems.append(None)
    return problems


def _stack_path(entry: Any) -> str:
    """A dotted module path from one ``nn_module_stack`` entry ("L['self'].h.0" or "h.0")."""
    path = str(entry[0] if isinstance(entry, (tuple, list)) else entry)
    for prefix in ("L['self'].", "L__self__.", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "").strip(".")


def _fill_shapes(graph: ModelGraph) -> None:
    """Give every node whose shape the graph left out (torch.export placeholders: inputs, parameters) its shape.

    The fake value torch.export recorded on the node gives it; a parameter read falls back to the tensor itself.
    """
    for n in graph.nodes:
        if n.shape is not None:
            continue
        val = n.fx_node.meta.get("val") if n.fx_node is not None else None
        if isinstance(val, torch.Tensor):
            try:
                n.shape = tuple(int(s) for s in val.shape)
                n.dtype = val.dtype
                continue
            except Exception:  # a symbolic size
                pass
        if n.op == "attr":
            owner, _, name = str(n.target).rpartition(".")
            t = _get_tensor(graph.root, owner, name)
            if t is not None:
                n.shape, n.dtype = tuple(t.shape), t.dtype


def _reshape_input_axis(out_shape: Sequence[int], in_shape: Sequence[int], axis: int) -> int | None:
    """Input axis (negative) that output ``axis`` is, when a reshape keeps it whole; None when it splits/merges."""
    out_ax = len(out_shape) + axis
    before, size = _numel(out_shape[:out_ax]), int(out_shape[out_ax])
    acc = 1
    for i, s in enumerate(in_shape):
        if acc == before and int(s) == size:
            return i - len(in_shape)
        acc *= int(s)
    return None


# ----------------------------------------------------------------------------------------------
# the pass


@dataclass
class _LayerPlan:
    path: str
    calls: list[GNode]
    conversion: str               # "exact" | "approx" | "skip"
    reason: str                   # why not exact (empty when exact)
    bias_into: str | None = None  # Linear path the LayerNorm's shift is folded into


class LayerNormToRMSNorm(Pass):
    """Replace LayerNorm with RMSNorm; see the module docstring for the math and the rules."""

    name = "layernorm_to_rmsnorm"

    def __init__(self, *, mode: str = "auto", example_inputs: Any = None, fold_bias: bool = True,
                 inputs_note: str | None = None) -> None:
        if mode not in MODES:
            raise UsageError(f"layernorm_to_rmsnorm: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.example_inputs = example_inputs
        self.fold_bias = fold_bias
        self.inputs_note = inputs_note

    def call(self, module: nn.Module) -> PassResult:
        if hf.needs_wrapping(module, self.example_inputs):
            # Hugging Face models (and keyword inputs): caches off, a flat tuple of tensors out, same module paths
            with hf.traceable(module, self.example_inputs) as inputs:
                return self._call(module, inputs)
        return self._call(module, as_input_tuple(self.example_inputs))

    def _call(self, module: nn.Module, inputs: tuple) -> PassResult:
        result = PassResult(module=module)
        with eval_mode(module):
            graph = build_graph(module, inputs or None)
        _fill_shapes(graph)
        result.metrics["graph_source"] = graph.source
        result.metrics["mode"] = self.mode
        slots = _tensor_slots(module)
        analysis = _StreamFinder(graph, slots).run()
        sites = _place_centring_ops(module, graph, analysis, inputs)
        exact_roots, comp_reasons = self._exact_streams(analysis, slots)
        plans = self._plan_layers(module, graph, analysis, exact_roots, comp_reasons, result)

        reference = _capture(module, inputs, [p.path for p in plans if p.conversion != "skip"]) if inputs else None

        # 1. centre the writers of every exact stream that feeds a LayerNorm converted exactly
        needed = {analysis.find(analysis.reader_key(c)) for p in plans if p.conversion == "exact" for c in p.calls}
        self._fold_layerscales(module, analysis, needed, result)
        self._centre(module, graph, analysis, needed, slots, result)
        # 2. swap the LayerNorms (and fold shifts into the following Linear where possible)
        folded: dict[str, torch.Tensor] = {}
        for p in plans:
            if p.conversion == "skip":
                continue
            folded_bias = self._swap(module, graph, p, slots, result)
            if folded_bias is not None:
                folded[p.path] = folded_bias
        # 2b. one explicit centring op where an exact stream starts at a non-linear map (after the swaps: the
        # op may sit on a LayerNorm that was just replaced)
        for site in sites:
            if analysis.find(site.node) in needed:
                self._insert_centring(module, analysis, site, result)
        # 3. measure
        if reference is not None:
            self._measure(module, inputs, plans, reference, folded, result)
        else:
            result.metrics["error"] = ("not measured: no example inputs " +
                                       (f"({self.inputs_note})" if self.inputs_note else "") +
                                       "; pass example_inputs to measure the output error")
        result.metrics["layers_exact"] = sum(p.conversion == "exact" for p in plans)
        result.metrics["layers_approx"] = sum(p.conversion == "approx" for p in plans)
        result.metrics["centring_ops"] = sum(c.action == "centre_op" for c in result.changes)
        return result

    def _fold_layerscales(self, module: nn.Module, a: _Analysis, roots: set[GNode], result: PassResult) -> None:
        """``W <- diag(s) W``, ``c <- s * c``, ``s <- 1`` for every LayerScale on a stream about to be centred."""
        for n, ls in a.layerscales.items():
            if a.find(n) not in roots:
                continue
            scale = _get_tensor(module, *ls.scale)
            writer = module.get_submodule(ls.writer)
            with torch.no_grad():
                s64 = scale.detach().to(torch.float64).reshape(-1)
                for pname in ("weight", "bias"):
                    t = getattr(writer, pname, None)
                    if t is None:
                        continue
                    shape = [1] * t.dim()
                    shape[0] = -1  # output features / channels are axis 0 of Linear and Conv weights and biases
                    t.copy_((t.detach().to(torch.float64) * s64.reshape(shape)).to(t.dtype))
                scale.fill_(1.0)
            result.changes.append(Change(self.name, "fold_scale", (_slot_name(ls.scale), ls.writer),
                                         f"folded the per-feature scale {_slot_name(ls.scale)} (LayerScale) into "
                                         f"{ls.writer} ({type(writer).__name__}) as a diagonal scale; it is now 1",
                                         {"scale": _slot_name(ls.scale), "writer": ls.writer}))

    def _insert_centring(self, module: nn.Module, a: _Analysis, site: "_Site", result: PassResult) -> None:
        target = module.get_submodule(site.path)
        if site.kind == "output" and isinstance(target, nn.RMSNorm) and site.dim == -1 \
                and len(target.normalized_shape) == 1 and not target._forward_hooks:
            # a LayerNorm just swapped (BLOOM's embedding LayerNorm, CLIP's pre_layrnorm): the op goes into the
            # norm module itself, so that it is part of the model's structure (a safe file can record it)
            new = CentredRMSNorm.from_rmsnorm(target)
            set_submodule(module, site.path, new)
            where = f"in {site.path} (now {type(new).__name__})"
        elif site.kind == "output":
            set_submodule(module, site.path, CentredOutput(target, site.dim))
            where = f"on the output of {site.path} ({type(target).__name__}, now wrapped in CentredOutput)"
        else:
            set_submodule(module, site.path, CentredInput(target, site.dim, site.arg))
            where = (f"on input {site.arg!r} of {site.path} ({type(target).__name__}, now wrapped in CentredInput), "
                     "where the stream enters it")
        root = a.find(site.node)
        ln_paths = sorted({c.target for c in a.ln_calls if a.find(a.reader_key(c)) is root})
        tokens = _numel(site.shape) // int(site.shape[site.dim]) if site.shape else None
        result.changes.append(Change(self.name, "centre_op", (site.path,),
                                     f"added one centring op (x - mean over the hidden axis) {where}: {site.reason}; "
                                     f"it makes {len(ln_paths)} LayerNorms exact ({_short_list(ln_paths)}) at a cost "
                                     f"of 2*{site.width} FLOPs per token",
                                     {"kind": site.kind, "path": site.path, "dim": site.dim, "arg": site.arg,
                                      "hidden": site.width, "flops_per_token": 2 * site.width,
                                      "tokens_on_example_inputs": tokens, "layernorms_made_exact": len(ln_paths),
                                      "why": site.reason}))

    # -- analysis -> decisions ------------------------------------------------------------------
    def _exact_streams(self, a: _Analysis, slots: dict[int, list[tuple[str, str]]]) -> tuple[set[GNode], dict[GNode, list[str]]]:
        g = a.graph
        reasons: dict[GNode, list[str]] = {}
        members: dict[GNode, list[GNode]] = {}
        for n in list(a.axis) + [a.reader_key(c) for c in a.ln_calls]:
            members.setdefault(a.find(n), []).append(n)
        for n, probs in a.problems.items():
            reasons.setdefault(a.find(n), []).extend(p for p in probs if p not in reasons.get(a.find(n), []))
        roots = set(members)

        def bad(root: GNode, reason: str) -> bool:
            lst = reasons.setdefault(root, [])
            if reason not in lst:
                lst.append(reason)
                return True
            return False

        # Tensors normfold would change must be changed consistently everywhere they are read.
        changed = True
        while changed:
            changed = False
            exact = {r for r in roots if not reasons.get(r)}
            by_param: dict[int, list[tuple[_Writer, int, GNode]]] = {}
            for w in a.writers.values():
                root = a.find(w.node)
                if w.module_path is not None:
                    for call in g.calls.get(w.module_path, []):
                        if call not in a.writers or a.find(call) not in exact:
                            if root in exact:
                                changed |= bad(root, f"{w.desc} is called {g.call_count(w.module_path)} times and "
                                                     "not every call writes a stream normfold can centre")
                for owner, name, ax in w.slots:
                    t = _get_tensor(g.root, owner, name)
                    if t is not None:
                        by_param.setdefault(id(t), []).append((w, ax, root))
            for pid, uses in by_param.items():
                roots_here = {r for _, _, r in uses}
                axes = {ax for _, ax, _ in uses}
                if len(axes) > 1 or not roots_here <= exact:
                    for r in roots_here:
                        if r in exact:
                            changed |= bad(r, f"{uses[0][0].desc} shares a tensor with a writer of a stream that "
                                              "cannot be made mean-free")
                # A tied tensor's other holders (an LM head) are untied before centring and keep the original
                # values: which holder the stream reads is known from the graph, whichever tracer ran.
        exact = {r for r in roots if not reasons.get(r)}
        return exact, reasons

    def _plan_layers(self, module: nn.Module, graph: ModelGraph, a: _Analysis, exact: set[GNode],
                     reasons: dict[GNode, list[str]], result: PassResult) -> list[_LayerPlan]:
        plans: list[_LayerPlan] = []
        for path, m in module.named_modules():
            if not isinstance(m, nn.LayerNorm):
                continue
            calls = graph.calls.get(path, [])
            if not _is_standard_layernorm(m):
                result.skipped.append(Skip(self.name, (path,), f"{type(m).__name__} is a LayerNorm subclass with its "
                                           "own forward(); normfold does not guess what it computes"))
                continue
            if not calls:
                result.skipped.append(Skip(self.name, (path,), "not called in forward()"))
                continue
            why: list[str] = []
            for c in calls:
                for r in reasons.get(a.find(a.reader_key(c)), []):
                    if r not in why:
                        why.append(r)
            is_exact = not why and all(a.find(a.reader_key(c)) in exact for c in calls)
            reason = "; ".join(why[:3]) + (f" (and {len(why) - 3} more)" if len(why) > 3 else "")
            if self.mode == "approx":
                hint = "exact would be possible (use mode='auto')" if is_exact else f"exact is not possible: {reason}"
                plans.append(_LayerPlan(path, calls, "approx", f"mode='approx'; {hint}"))
            elif is_exact:
                plans.append(_LayerPlan(path, calls, "exact", ""))
            elif self.mode == "exact":
                result.skipped.append(Skip(self.name, (path,), f"cannot be made exact: {reason}; use mode='auto' or "
                                           "'approx' to convert it approximately"))
                plans.append(_LayerPlan(path, calls, "skip", reason))
            else:
                plans.append(_LayerPlan(path, calls, "approx", reason))
        for n in graph.nodes:
            if n.op in ("function", "method") and _op_name(n) in ("layer_norm", "native_layer_norm"):
                result.skipped.append(Skip(self.name, (n.name,), "a functional layer_norm call in forward(): only "
                                           "nn.LayerNorm modules are swapped"))
        return plans

    # -- edits ------------------------------------------------------------------------------------
    def _centre(self, module: nn.Module, graph: ModelGraph, a: _Analysis, roots: set[GNode],
                slots: dict[int, list[tuple[str, str]]], result: PassResult) -> None:
        todo: dict[int, tuple[torch.Tensor, int, list[_Writer]]] = {}
        for w in a.writers.values():
            if a.find(w.node) not in roots:
                continue
            for owner, name, ax in w.slots:
                t = _get_tensor(module, owner, name)
                entry = todo.setdefault(id(t), (t, ax, []))
                if w not in entry[2]:
                    entry[2].append(w)
        writer_slots = {(o, nm) for w in a.writers.values() if a.find(w.node) in roots for (o, nm, _) in w.slots}
        # Untie first: readers outside the stream keep the original values in a copy of their own.
        for pid, (t, _, ws) in todo.items():
            others = [s for s in slots.get(pid, []) if s not in writer_slots]
            for owner, name in others:
                holder = module.get_submodule(owner) if owner else module
                copy_t = t.detach().clone()
                if isinstance(t, nn.Parameter):
                    setattr(holder, name, nn.Parameter(copy_t, requires_grad=t.requires_grad))
                else:
                    holder._buffers[name] = copy_t
                result.changes.append(Change(self.name, "untie", (_slot_name((owner, name)), _slot_name(ws[0].slots[0][:2])),
                                             f"untied {_slot_name((owner, name))} from {ws[0].desc}: the writer is "
                                             "centred, and this reader keeps the original values in its own copy",
                                             {"shape": tuple(t.shape)}))
        for pid, (t, ax, ws) in todo.items():
            with torch.no_grad():
                t64 = t.detach().to(torch.float64)
                t.copy_((t64 - t64.mean(dim=ax, keepdim=True)).to(t.dtype))
        order = {n: i for i, n in enumerate(graph.nodes)}
        centred = {id(w): w for _, _, ws in todo.values() for w in ws}.values()
        for w in sorted(centred, key=lambda w: order.get(w.node, 0)):
            root = a.find(w.node)
            ln_paths = sorted({c.target for c in a.ln_calls if a.find(a.reader_key(c)) is root})
            result.changes.append(Change(self.name, "centre", tuple(_slot_name((o, nm)) for o, nm, _ in w.slots),
                                         f"centred {w.desc} along the hidden axis so that the stream read by "
                                         f"{_short_list(ln_paths)} is mean-free",
                                         {"slots": [_slot_name((o, nm)) for o, nm, _ in w.slots]}))

    def _swap(self, module: nn.Module, graph: ModelGraph, p: _LayerPlan, slots: dict[int, list[tuple[str, str]]],
              result: PassResult) -> torch.Tensor | None:
        ln: nn.LayerNorm = module.get_submodule(p.path)  # type: ignore[assignment]
        w, b = ln.weight, getattr(ln, "bias", None)
        target = self._bias_target(module, graph, p, slots) if (b is not None and self.fold_bias) else None
        kwargs = dict(eps=ln.eps, elementwise_affine=ln.elementwise_affine,
                      device=(w.device if w is not None else None), dtype=(w.dtype if w is not None else None))
        new: nn.Module = RMSNormWithBias(ln.normalized_shape, **kwargs) if (b is not None and target is None) else \
            nn.RMSNorm(ln.normalized_shape, **kwargs)
        with torch.no_grad():
            if w is not None:
                new.weight.copy_(w)
                new.weight.requires_grad_(w.requires_grad)
            if isinstance(new, RMSNormWithBias):
                new.bias.copy_(b)
                new.bias.requires_grad_(b.requires_grad)
        new.train(ln.training)
        folded_bias = None
        bias_note = "no shift" if b is None else "shift kept as RMSNormWithBias.bias"
        if isinstance(target, _AddmmTarget):
            holder = module.get_submodule(target.path)
            weight, bias = getattr(holder, target.weight), getattr(holder, target.bias)
            with torch.no_grad():  # (y + b) W + c = y W + (b W + c), W an (in, out) weight
                new_c = bias.detach().to(torch.float64) + b.detach().to(torch.float64) @ weight.detach().to(torch.float64)
                bias.copy_(new_c.to(bias.dtype))
            folded_bias = b.detach().clone()
            bias_note = f"shift folded into {target.path}.{target.bias} ({type(holder).__name__}, addmm)"
            target = target.path
        elif target is not None:
            reader = module.get_submodule(target)
            holder, wname, bname = (reader, "in_proj_weight", "in_proj_bias") \
                if isinstance(reader, nn.MultiheadAttention) else (reader, "weight", "bias")
            weight, bias = getattr(holder, wname), getattr(holder, bname)
            with torch.no_grad():
                beta = b.detach().to(torch.float64)
                w64 = weight.detach().to(torch.float64)
                c64 = bias.detach().to(torch.float64) if bias is not None else torch.zeros(
                    w64.shape[0], dtype=torch.float64, device=w64.device)
                new_c = (c64 + w64 @ beta).to(weight.dtype)
                if bias is not None:
                    bias.copy_(new_c)
                else:
                    setattr(holder, bname, nn.Parameter(new_c, requires_grad=weight.requires_grad))
            folded_bias = b.detach().clone()
            bias_note = f"shift folded into {target}.{bname} ({type(reader).__name__})"
        set_submodule(module, p.path, new)
        how = "exact: its input is mean-free" if p.conversion == "exact" else f"approx: {p.reason}"
        result.changes.append(Change(self.name, "to_rmsnorm", (p.path,) + ((target,) if target else ()),
                                     f"{p.path}: LayerNorm -> {type(new).__name__} ({how}); {bias_note}",
                                     {"conversion": p.conversion, "reason": p.reason, "eps": ln.eps,
                                      "bias": bias_note, "bias_folded_into": target}))
        return folded_bias

    def _bias_target(self, module: nn.Module, graph: ModelGraph, p: _LayerPlan,
                     slots: dict[int, list[tuple[str, str]]]) -> "str | _AddmmTarget | None":
        """The Linear (self-attention, HF Conv1D) that alone reads this LayerNorm's output (through selections), or None."""
        if len(p.calls) != 1 or _norm_rank(module.get_submodule(p.path)) != 1:
            return None
        node, axis = p.calls[0], -1
        finder = _StreamFinder(graph, slots)
        for _ in range(6):
            users = [u for u in node.users if not _reads_metadata_only(u)]
            if len(users) != 1:
                return None
            u = users[0]
            if u.op == "module" and (isinstance(graph.modules[u.target], nn.Identity) or (
                    isinstance(graph.modules[u.target], nn.modules.dropout._DropoutNd) and graph.modules[u.target].p == 0)):
                # identities on values in training too (dropout with p > 0 would scale the shift by its mask)
                node = u
                continue
            if u.op == "module" and isinstance(graph.modules[u.target], nn.MultiheadAttention):
                return u.target if self._mha_takes_shift(graph, u, node, slots) else None
            if u.op == "module":
                m = graph.modules[u.target]
                if not isinstance(m, nn.Linear) or _writer_problem(m) is not None or graph.call_count(u.target) != 1:
                    return None
                if graph.external_param_reads(u.target) or not u.args or u.args[0] is not node:
                    return None
                if m.bias is not None and len(slots.get(id(m.bias), [])) > 1:
                    return None
                if node.shape is not None and axis != -1:
                    return None
                return u.target
            if u.op in ("function", "method") and _op_name(u) in ("getitem", "select", "slice"):
                args, kwargs, fx2g = finder._fx_args(u)
                if not args or fx2g.get(args[0]) is not node:
                    return None
                # the shift is constant along every other axis, so any selection that keeps the hidden axis whole
                # commutes with adding it
                try:
                    in_rank = len(node.shape) if node.shape is not None else None
                    if in_rank is None or u.shape is None:
                        return None
                    if _selection_input_axis(_op_name(u), args, kwargs, node, u, -1,
                                             lambda x: fx2g.get(x) if isinstance(x, torch.fx.Node) else None) != -1:
                        return None
                except _Refuse:
                    return None
                node = u
                continue
            if u.op in ("function", "method") and _op_name(u) in _SHAPE_OPS:
                # a reshape that keeps the hidden (last) axis whole, as Conv1D's x.view(-1, d)
                if node.shape is None or u.shape is None or _reshape_input_axis(u.shape, node.shape, -1) != -1:
                    return None
                node = u
                continue
            if u.op in ("function", "method") and _op_name(u) == "addmm":
                return self._addmm_takes_shift(graph, finder, u, node, slots)
            return None
        return None

    @staticmethod
    def _addmm_takes_shift(graph: ModelGraph, finder: "_StreamFinder", u: GNode, node: GNode,
                           slots: dict[int, list[tuple[str, str]]]) -> "_AddmmTarget | None":
        """``addmm(c, y, W)`` (HF Conv1D) reading the LayerNorm output ``y``: ``(y + b) W + c = y W + (b W + c)``.

        ``c`` and ``W`` must be parameters of one module, read nowhere else, untied.
        """
        args, kwargs, fx2g = finder._fx_args(u)
        if len(args) != 3 or kwargs or fx2g.get(args[1]) is not node:
            return None
        c, w = fx2g.get(args[0]), fx2g.get(args[2])
        if c is None or w is None or c.op != "attr" or w.op != "attr":
            return None
        (c_owner, _, c_name), (w_owner, _, w_name) = str(c.target).rpartition("."), str(w.target).rpartition(".")
        if c_owner != w_owner:
            return None
        tc, tw = _get_tensor(graph.root, c_owner, c_name), _get_tensor(graph.root, w_owner, w_name)
        if tc is None or tw is None or tc.dim() != 1 or tw.dim() != 2 or tw.shape[1] != tc.shape[0]:
            return None
        for attr, t in ((c, tc), (w, tw)):
            reads = [x for x in attr.users if not _reads_metadata_only(x)]
            if len(slots.get(id(t), [])) != 1 or len(reads) != 1 or len(graph.attr_reads.get(attr.target, [])) > 1:
                return None
        return _AddmmTarget(c_owner, w_name, c_name)

    @staticmethod
    def _mha_takes_shift(graph: ModelGraph, u: GNode, ln_node: GNode, slots: dict[int, list[tuple[str, str]]]) -> bool:
        """Self-attention whose query, key and value are all this LayerNorm's output: the shift goes into in_proj_bias.

        ``in_proj(y + b) = W_in y + (W_in b + c_in)`` for the packed q/k/v projection; masks and
        ``bias_k``/``bias_v`` are added after the projection and do not matter.
        """
        m = graph.modules[u.target]
        if type(m).forward is not nn.MultiheadAttention.forward or not m._qkv_same_embed_dim:
            return False
        if m.in_proj_weight is None or m.in_proj_bias is None or graph.call_count(u.target) != 1:
            return False
        if graph.external_param_reads(u.target) or len(slots.get(id(m.in_proj_bias), [])) > 1:
            return False
        fx = u.fx_node
        if fx is None or graph.source != "fx":
            return False
        qkv = list(fx.args[:3]) + [fx.kwargs[k] for k in ("query", "key", "value") if k in fx.kwargs]
        return len(qkv) == 3 and all(isinstance(a, torch.fx.Node) and a is ln_node.fx_node for a in qkv)

    # -- measurement ------------------------------------------------------------------------------
    def _measure(self, module: nn.Module, inputs: tuple, plans: list[_LayerPlan], reference: "_Captured",
                 folded: dict[str, torch.Tensor], result: PassResult) -> None:
        converted = [p for p in plans if p.conversion != "skip"]
        now = _capture(module, inputs, [p.path for p in converted])
        layers: dict[str, dict[str, Any]] = {}
        dtype = torch.float32
        for p in converted:
            ref_outs, new_outs, new_ins = reference.outputs[p.path], now.outputs[p.path], now.inputs[p.path]
            max_abs, rel, ratio = 0.0, 0.0, 0.0
            for r, o, x in zip(ref_outs, new_outs, new_ins):
                dtype = r.dtype
                o = o.double() + (folded[p.path].double() if p.path in folded else 0.0)
                if isinstance(module.get_submodule(p.path), CentredRMSNorm):
                    # it starts a stream with the centring op: it is meant to differ by its output's mean
                    r = r.double() - r.double().mean(dim=-1, keepdim=True)
                d = (o - r.double()).abs().max().item() if r.numel() else 0.0
                scale = r.double().abs().max().item() if r.numel() else 0.0
                max_abs, rel = max(max_abs, d), max(rel, d / scale if scale > 0 else d)
                ratio = max(ratio, _mean_over_rms(x.double(), p_dims=len(module.get_submodule(p.path).normalized_shape)))
            layers[p.path] = {"conversion": p.conversion, "max_abs_error": max_abs, "rel_error": rel,
                              "input_mean_over_rms": ratio}
        out_abs, out_rel = _output_error(now.output, reference.output)
        result.metrics["layers"] = layers
        result.metrics["output_max_abs_error"] = out_abs
        result.metrics["output_rel_error"] = out_rel
        # The exact swap relies on mean-free inputs: check it really is so on the example inputs.
        limit = MEAN_FREE_RATIO.get(dtype, MEAN_FREE_RATIO[torch.float32])
        bad = [path for path, v in layers.items() if v["conversion"] == "exact" and v["input_mean_over_rms"] > limit]
        result.metrics["exact_verified"] = (not bad) if any(p.conversion == "exact" for p in converted) else None
        for path in bad:
            log.warning("%s: converted as exact but its input has |mean|/rms = %.3g on the example inputs (limit %g); "
                        "the swap may not be exact", path, layers[path]["input_mean_over_rms"], limit)
        # With every swap exact, the whole model must match the original within rounding: the one rule
        # (normfold.verify, the policy of the comparison dtype) that `normfold convert` judges by too
        if converted and all(p.conversion == "exact" for p in converted):
            verdict = compare(reference.output, now.output)
            result.metrics["output_within_tolerance"] = verdict.passed
            if not verdict.passed:
                log.warning("layernorm_to_rmsnorm: every swap is exact but the output changed: %s",
                            verdict.describe())
        else:
            result.metrics["output_within_tolerance"] = None


@dataclass
class _Captured:
    output: Any
    inputs: dict[str, list[torch.Tensor]]
    outputs: dict[str, list[torch.Tensor]]


def _capture(module: nn.Module, inputs: tuple, paths: list[str]) -> _Captured:
    ins: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    outs: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    handles = []
    for p in paths:
        def hook(m: nn.Module, args: tuple, out: Any, p: str = p) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                ins[p].append(args[0].detach().clone())
                outs[p].append(out.detach().clone())
        handles.append(module.get_submodule(p).register_forward_hook(hook))
    try:
        with eval_mode(module), torch.no_grad():
            output = module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return _Captured(output, ins, outs)


def _mean_over_rms(x: torch.Tensor, p_dims: int = 1) -> float:
    dims = tuple(range(-p_dims, 0))
    mean = x.mean(dim=dims)
    rms = x.pow(2).mean(dim=dims).sqrt().clamp_min(1e-30)
    return (mean.abs() / rms).max().item() if x.numel() else 0.0


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in _flatten(out[k])]
    if hasattr(out, "to_tuple"):
        return _flatten(out.to_tuple())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flatten(o)]
    return []


def _output_error(a: Any, b: Any) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|) over every floating tensor of two outputs."""
    abs_err = rel_err = 0.0
    for x, y in zip(_flatten(a), _flatten(b)):
        if not y.is_floating_point() or not y.numel():
            continue
        d = (x.double() - y.double()).abs().max().item()
        s = y.double().abs().max().item()
        abs_err, rel_err = max(abs_err, d), max(rel_err, d / s if s > 0 else d)
    return abs_err, rel_err


def _tensor_slots(module: nn.Module) -> dict[int, list[tuple[str, str]]]:
    """id(tensor) -> every (module path, attribute) that holds it: tied weights have several."""
    out: dict[int, list[tuple[str, str]]] = {}
    for mpath, m in module.named_modules(remove_duplicate=False):
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and (mpath, name) not in out.setdefault(id(t), []):
                out[id(t)].append((mpath, name))
    return out


def _get_tensor(root: nn.Module, owner: str, name: str) -> torch.Tensor | None:
    try:
        holder = root.get_submodule(owner) if owner else root
    except AttributeError:
        return None
    t = getattr(holder, name, None)
    return t if isinstance(t, torch.Tensor) else None


def _slot_name(slot: tuple[str, str]) -> str:
    return f"{slot[0]}.{slot[1]}" if slot[0] else slot[1]


def _short_list(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def layernorm_to_rmsnorm(model: nn.Module, *, mode: str = "auto", example_inputs: Any = None,
                         inplace: bool = False, fold_bias: bool = True) -> PassResult:
    """Replace every ``nn.LayerNorm`` with ``nn.RMSNorm`` (same scale and eps); see the module docstring.

    ``mode="exact"`` centres the writers of each residual stream so that the
    swap does not change the model, and skips (with the reason) every
    LayerNorm where that cannot be done; ``"approx"`` swaps every LayerNorm
    without centring; ``"auto"`` (default) is exact where possible and
    approximate elsewhere. The LayerNorm's shift is folded into the following
    Linear when that Linear alone reads it (``fold_bias=True``), else kept in
    :class:`RMSNormWithBias`. ``example_inputs`` (a tensor, a tuple of
    positional inputs, or a dict of keyword inputs such as a Hugging Face
    model's ``input_ids`` and ``attention_mask``; inferred from the first layer
    when omitted) give the
    tensor shapes the analysis needs and the inputs on which the output error
    is measured: ``metrics["layers"][path]`` has each layer's ``max_abs_error``
    and ``rel_error`` (relative to the layer's max |output|) between its output
    in the converted model and the LayerNorm's output in the original, on the
    same inputs (so it includes what the layers before it changed), and
    ``input_mean_over_rms`` (about 1e-7 in float32 where the swap is exact);
    ``metrics["output_max_abs_error"]`` and ``metrics["output_rel_error"]`` are
    for the whole model. ``metrics["exact_verified"]`` says whether every
    exact layer's input was mean-free on the example inputs, and
    ``metrics["output_within_tolerance"]`` (when every swap is exact) whether
    the output matches by :func:`normfold.verify.compare` (the policy of its dtype).
    """
    if mode not in MODES:
        raise UsageError(f"layernorm_to_rmsnorm: mode must be one of {', '.join(MODES)}, got {mode!r}")
    note = None
    if example_inputs is None:
        example_inputs, note = _maybe_infer_inputs(model)
    return LayerNormToRMSNorm(mode=mode, example_inputs=example_inputs, fold_bias=fold_bias,
                              inputs_note=note)(model, inplace=inplace)


def _maybe_infer_inputs(model: nn.Module) -> tuple[tuple | None, str | None]:
    from normfold.inputs import infer_input_shapes, model_dtype_device, random_inputs

    try:
        inferred = infer_input_shapes(model)
    except Exception as exc:
        return None, f"could not infer them: {exc}"
    dtype, device = model_dtype_device(model)
    log.info("layernorm_to_rmsnorm: %s", inferred.reason)
    return random_inputs(inferred.shapes, dtype=dtype, device=device, integer_high=inferred.integer_high), None
