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
* Conv (groups=1) writing channels that become the hidden axis: the same on the output-channel axis;
* Embedding (and embedding-like parameters: position embeddings, class tokens):
  subtract each vector's mean over the hidden axis;
* MultiheadAttention: its ``out_proj`` as a Linear.

Every LayerNorm is invariant to adding a constant along its normalized axis,
``LN(x) = LN(P x)``, so if the centred stream is read *only* by LayerNorms
(through ops that commute with ``P``: residual adds of centred streams, eval
dropout, identity, slicing / selecting / concatenating / permuting / reshaping
along the other axes, means over the other axes, scaling by a constant) then
the model's output does not change, and afterwards every such LayerNorm sees a
mean-free input and equals an RMSNorm with the same scale, shift and eps. The
arithmetic is done in float64 and cast back once.

The dataflow comes from :func:`normfold.graph.build_graph` (torch.fx, or
torch.export with example inputs). Streams are found by walking back from each
LayerNorm's input with the hidden axis tracked through every op. A stream is
refused, with the op named, when anything else reads it: a post-LN block (the
stream is a LayerNorm's output, also read by the next block's projections), a
head reading the stream without a final LayerNorm, an activation, a gate. A
weight tied to a reader that must keep it (an LM head tied to the token
embedding) is untied first and the untie is reported. Exactness holds for eval
forwards: dropout on the stream in training mode breaks the mean-free property.

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

from normfold.errors import UsageError
from normfold.graph import GNode, ModelGraph, build_graph, describe_node, eval_mode
from normfold.norms import set_submodule
from normfold.passes.base import Change, Pass, PassResult, Skip
from normfold.passes.fold_batchnorm import producer_problem
from normfold.tolerances import LAYERNORM_TO_RMSNORM, MEAN_FREE_RATIO, for_dtype

__all__ = ["LayerNormToRMSNorm", "layernorm_to_rmsnorm", "RMSNormWithBias", "MODES"]

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
_META_OPS = {"dim", "size", "sym_size", "sym_numel", "sym_stride", "numel", "_assert", "stride", "is_contiguous"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}
#: ops that are the identity on values in eval
_IDENTITY_OPS = {"contiguous", "clone", "dropout", "alias", "feature_dropout", "alpha_dropout", "lift_fresh_copy",
                 "detach"}
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
            raise _Refuse(f"{n.target} is tied to {', '.join(_slot_name(h) for h in holders if _slot_name(h) != n.target)} "
                          "(tied weights) and the model was traced with torch.export, which does not tell normfold "
                          "which reader is which: untie them, or make the model traceable by torch.fx")
        if owner in g.calls:
            raise _Refuse(f"{n.target} is also read inside {owner} ({type(t).__name__}), which normfold would change too")
        self.a.writers[n] = _Writer(n, f"the parameter {n.target}", [(owner, name, value.dim() + axis)], None)

    def module_node(self, n: GNode, axis: int) -> None:
        g = self.g
        path = n.target
        m = g.modules[path]
        if isinstance(m, _DROPOUT_MODULES):
            if not n.args:
                raise _Refuse(f"the input of {path} could not be traced")
            return self.demand(n, n.args[0], axis)
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or type(m).__name__.endswith("Norm"):
            raise _Refuse(f"the stream is the output of {path} ({type(m).__name__}), which cannot be made mean-free "
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
            problem = producer_problem(m)
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
        raise _Refuse(f"{path} ({type(m).__name__}) writes into the stream; normfold can centre Linear, Conv (groups=1), "
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
        if name in _IDENTITY_OPS:
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
        if name == "embedding":
            # F.embedding(input, weight, ...) ; aten.embedding(weight, indices, ...)
            is_aten = isinstance(n.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
            w = gn(args[0]) if is_aten else (gn(args[1]) if len(args) > 1 else gn(kwargs.get("weight")))
            if not is_aten and (kwargs.get("max_norm") is not None or (len(args) > 3 and args[3] is not None)):
                raise _Refuse("an embedding call with max_norm renormalizes rows, which centring would change")
            if w is None or axis != -1:
                raise _Refuse("an embedding call normfold cannot centre")
            return self.demand(n, w, -1)
        raise _Refuse(f"{describe_node(g, n)} writes into the stream and does not commute with centring")

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
        if len(stream) != 1 or (name in ("truediv", "div", "itruediv", "div_") and stream[0][0] != 0):
            raise _Refuse(f"a {name} multiplies the stream by a tensor that varies along the hidden axis "
                          "(a gate or a per-feature scale such as LayerScale: fold it into the layer before first)")
        self.demand(n, stream[0][1], axis)

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
    following = _SELECT_OPS | _IDENTITY_OPS | _SHAPE_OPS | _ADD_OPS | {"cat"}
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
        result = PassResult(module=module)
        inputs = _as_tuple(self.example_inputs)
        with eval_mode(module):
            graph = build_graph(module, inputs or None)
        result.metrics["graph_source"] = graph.source
        result.metrics["mode"] = self.mode
        slots = _tensor_slots(module)
        analysis = _StreamFinder(graph, slots).run()
        exact_roots, comp_reasons = self._exact_streams(analysis, slots)
        plans = self._plan_layers(module, graph, analysis, exact_roots, comp_reasons, result)

        reference = _capture(module, inputs, [p.path for p in plans if p.conversion != "skip"]) if inputs else None

        # 1. centre the writers of every exact stream that feeds a LayerNorm converted exactly
        needed = {analysis.find(analysis.reader_key(c)) for p in plans if p.conversion == "exact" for c in p.calls}
        self._centre(module, graph, analysis, needed, slots, result)
        # 2. swap the LayerNorms (and fold shifts into the following Linear where possible)
        folded: dict[str, torch.Tensor] = {}
        for p in plans:
            if p.conversion == "skip":
                continue
            folded_bias = self._swap(module, graph, p, slots, result)
            if folded_bias is not None:
                folded[p.path] = folded_bias
        # 3. measure
        if reference is not None:
            self._measure(module, inputs, plans, reference, folded, result)
        else:
            result.metrics["error"] = ("not measured: no example inputs " +
                                       (f"({self.inputs_note})" if self.inputs_note else "") +
                                       "; pass example_inputs to measure the output error")
        result.metrics["layers_exact"] = sum(p.conversion == "exact" for p in plans)
        result.metrics["layers_approx"] = sum(p.conversion == "approx" for p in plans)
        return result

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
                owners = slots.get(pid, [])
                writer_slots = {(o, nm) for w, _, _ in uses for (o, nm, _) in w.slots}
                others = [s for s in owners if s not in writer_slots]
                if others and g.source != "fx":
                    for r in roots_here:
                        if r in exact:
                            changed |= bad(r, f"{uses[0][0].desc} shares its weight with {_slot_name(others[0])} "
                                              "(tied weights) and the model was traced with torch.export, which "
                                              "does not tell normfold which reader is which")
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
        if target is not None:
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
                     slots: dict[int, list[tuple[str, str]]]) -> str | None:
        """The Linear (or self-attention) that alone reads this LayerNorm's output (through selections), or None."""
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
                if not isinstance(m, nn.Linear) or producer_problem(m) is not None or graph.call_count(u.target) != 1:
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
            return None
        return None

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
        # With every swap exact, the whole model must match the original within rounding.
        if converted and all(p.conversion == "exact" for p in converted):
            tol = LAYERNORM_TO_RMSNORM.get(dtype, for_dtype(dtype))
            scale = max((y.double().abs().max().item() for y in _flatten(reference.output)
                         if y.is_floating_point() and y.numel()), default=0.0)
            within = out_abs <= tol.atol + tol.rtol * scale
            result.metrics["output_within_tolerance"] = within
            if not within:
                log.warning("layernorm_to_rmsnorm: every swap is exact but the output changed by %.3g (tolerance "
                            "%g + %g * %.3g)", out_abs, tol.atol, tol.rtol, scale)
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


def _as_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def layernorm_to_rmsnorm(model: nn.Module, *, mode: str = "auto", example_inputs: Any = None,
                         inplace: bool = False, fold_bias: bool = True) -> PassResult:
    """Replace every ``nn.LayerNorm`` with ``nn.RMSNorm`` (same scale and eps); see the module docstring.

    ``mode="exact"`` centres the writers of each residual stream so that the
    swap does not change the model, and skips (with the reason) every
    LayerNorm where that cannot be done; ``"approx"`` swaps every LayerNorm
    without centring; ``"auto"`` (default) is exact where possible and
    approximate elsewhere. The LayerNorm's shift is folded into the following
    Linear when that Linear alone reads it (``fold_bias=True``), else kept in
    :class:`RMSNormWithBias`. ``example_inputs`` (a tensor or a tuple of
    positional inputs; inferred from the first layer when omitted) give the
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
    the output matches within :data:`normfold.tolerances.LAYERNORM_TO_RMSNORM`.
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
