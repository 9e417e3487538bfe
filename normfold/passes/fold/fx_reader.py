"""The torch.fx reader: what the nodes of an ``nn.Module``'s traced graph are, for the fold analysis.

Nodes are module calls (``call_module``, resolved on the live model, so a
BatchNorm already folded reads as the ``nn.Identity`` that replaced it),
torch functions and tensor methods. Shapes are computed on first use: the
graph is traced without them, and :meth:`ModuleReader.shape` runs the one
shape-propagating forward pass only when a fold really needs a shape (a
Linear's rank, a pool, a walk through reshapes). Structural refusals (a
tensor read twice, an activation) come before that, so a model whose
leftover BatchNorms are all blocked never pays for it.

:meth:`ModuleReader.layer` is the one place that decides whether a Conv /
ConvTranspose / Linear call may take a fold, as a producer or as a consumer.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from normfold.graph import ModelGraph, is_leaf_type
from normfold.norms import is_batchnorm
from normfold.passes.fold.flow import Consumer, NotConcrete, Producer, Rule
from normfold.passes.fold.reader import GraphReader, bind_args, flat_nodes
from normfold.passes.fold.refusal import Refusal
from normfold.passes.fold.rules import (avg_pool_keeps_shift, conv_zero_pads, is_activation_name, out_channels,
                                        producer_problem, shared_parameters)

__all__ = ["ModuleReader"]

# ------------------------------------------------------------------------------------------------
# op tables (what torch.fx records for nn.Module code)

_MOVE_FUNCTIONS: set[Any] = {operator.getitem}
for _name in ("flatten", "reshape", "permute", "transpose", "swapaxes", "swapdims", "squeeze", "unsqueeze",
              "movedim", "moveaxis", "narrow", "split", "chunk", "unbind", "flip", "roll", "t", "unflatten",
              "select", "tensor_split", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
              "native_channel_shuffle", "clone", "detach", "tile", "hsplit", "vsplit", "dsplit"):
    if hasattr(torch, _name):
        _MOVE_FUNCTIONS.add(getattr(torch, _name))
for _name in ("pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle"):
    if hasattr(F, _name):
        _MOVE_FUNCTIONS.add(getattr(F, _name))

_MOVE_METHODS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims", "t",
                 "contiguous", "squeeze", "unsqueeze", "expand", "repeat", "tile", "flip", "roll", "split", "chunk",
                 "unbind", "narrow", "movedim", "moveaxis", "select", "view_as", "reshape_as", "expand_as", "clone",
                 "detach", "tensor_split", "split_with_sizes"}
#: methods that read only the tensor's metadata
_META_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_contiguous", "stride",
                 "is_floating_point", "element_size"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
#: methods whose second argument only lends its shape / dtype
_SHAPE_FROM_ARG1 = {"view_as", "reshape_as", "expand_as", "type_as"}
_COMBINING = {"add", "mul", "sub", "cat", "stack", "matmul", "iadd", "add_", "mul_"}

_DROPOUT_FUNCTIONS = {F.dropout, F.alpha_dropout, F.feature_alpha_dropout}
for _name in ("dropout1d", "dropout2d", "dropout3d"):
    if hasattr(F, _name):
        _DROPOUT_FUNCTIONS.add(getattr(F, _name))

_MAX_POOL_FUNCTIONS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_ADAPTIVE_MAX_FUNCTIONS = {F.adaptive_max_pool1d: 1, F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3}
_AVG_POOL_FUNCTIONS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_ADAPTIVE_AVG_FUNCTIONS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
for _table, _prefix in ((_MAX_POOL_FUNCTIONS, "max_pool"), (_AVG_POOL_FUNCTIONS, "avg_pool"),
                        (_ADAPTIVE_AVG_FUNCTIONS, "adaptive_avg_pool"), (_ADAPTIVE_MAX_FUNCTIONS, "adaptive_max_pool")):
    for _k in (1, 2, 3):
        if hasattr(torch, f"{_prefix}{_k}d"):
            _table.setdefault(getattr(torch, f"{_prefix}{_k}d"), _k)

_FUNCTIONAL_BN = {F.batch_norm, torch.batch_norm}
_CAT_FUNCTIONS = {torch.cat, getattr(torch, "concat", torch.cat), getattr(torch, "concatenate", torch.cat)}

_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_ADAPTIVE_ARGS = ("input", "output_size", "return_indices")
_INTERP_ARGS = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_PAD_ARGS = ("input", "pad", "mode", "value")
_DROPOUT_ARGS = ("input", "p", "training", "inplace")
_REDUCE_ARGS = ("input", "dim", "keepdim")

_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
              nn.AdaptiveMaxPool3d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_COPY_PADS = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
              nn.ReplicationPad3d) + tuple(getattr(nn, n) for n in ("CircularPad1d", "CircularPad2d", "CircularPad3d")
                                           if hasattr(nn, n))
_CONSTANT_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad2d) + tuple(
    getattr(nn, n) for n in ("ZeroPad1d", "ZeroPad3d") if hasattr(nn, n))


def _fn_name(target: Any) -> str:
    """The name of a call target (a function, or a method name)."""
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_layer(m: nn.Module) -> bool:
    """A Conv / ConvTranspose / Linear the tracer keeps as a leaf."""
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and is_leaf_type(m)


def _spatial_dims(m: nn.Module) -> int:
    """Spatial dims of a conv (0 for a Linear): its channel axis is ``-(dims + 1)``."""
    return 0 if isinstance(m, nn.Linear) else len(m.kernel_size)


class ModuleReader(GraphReader):
    """Reads the torch.fx graph of ``root`` (traced by :func:`normfold.graph.build_graph`) for the fold analysis.

    ``inputs_for_shapes`` is called once, the first time a shape is needed
    and the graph has no example inputs: it returns inputs (inferred from the
    first layer) or None.
    """

    def __init__(self, root: nn.Module, graph: ModelGraph,
                 inputs_for_shapes: Callable[[], tuple | None] | None = None) -> None:
        self.root = root
        self.graph = graph
        self.shared = shared_parameters(root)
        self._inputs_for_shapes = inputs_for_shapes
        self._shapes_tried = False
        self._concrete: dict[torch.fx.Node, Any] = {}

    # -- basics -------------------------------------------------------------------------------------
    def module(self, node: torch.fx.Node) -> nn.Module:
        """The live module a ``call_module`` node calls (after edits: what replaced it)."""
        return self.module_at(node.target)

    def module_at(self, path: str) -> nn.Module:
        """The live submodule at dotted ``path`` (a plain dict walk: ``get_submodule`` costs 30 us a call)."""
        m = self.root
        try:
            for part in path.split(".") if path else ():
                m = m._modules[part]
        except KeyError:
            raise AttributeError(f"{type(self.root).__name__} has no submodule {path!r}") from None
        return m

    def shape(self, node: torch.fx.Node) -> tuple[int, ...] | None:
        tm = node.meta.get("tensor_meta")
        if tm is None and not self._shapes_tried:
            self._shapes_tried = True
            if not self.graph.example_inputs and self._inputs_for_shapes is not None:
                self.graph.example_inputs = self._inputs_for_shapes()
            self.graph.ensure_shapes()
            tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(int(s) for s in tm.shape)
        return None

    def _dtype(self, node: torch.fx.Node) -> torch.dtype | None:
        self.shape(node)
        tm = node.meta.get("tensor_meta")
        return getattr(tm, "dtype", None)

    def holds_tensor(self, node: torch.fx.Node) -> bool:
        return self.shape(node) is not None

    def lends_shape_only(self, node: torch.fx.Node) -> bool:
        return node.op == "call_method" and node.target in _SHAPE_FROM_ARG1

    def run(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.module(node)(*args, **kwargs)
        return node.target(*args, **kwargs)

    def describe(self, node: torch.fx.Node) -> str:
        if node.op == "call_module":
            try:
                return f"{node.target} ({type(self.module(node)).__name__})"
            except AttributeError:
                return str(node.target)
        if node.op == "call_function":
            return f"a call to {_fn_name(node.target)}"
        if node.op == "call_method":
            return f"a call to .{node.target}()"
        if node.op == "placeholder":
            return "the model input"
        if node.op == "output":
            return "the model output"
        return f"the parameter {node.target}"

    def _is_meta_use(self, user: torch.fx.Node, node: torch.fx.Node) -> bool:
        """True when ``user`` reads only ``node``'s shape, dtype or device, not its values."""
        if user.op == "call_method":
            if user.target in _META_METHODS and user.args and user.args[0] is node:
                return True
            if user.target in _SHAPE_FROM_ARG1 and user.args and user.args[0] is not node:
                return True
        return (user.op == "call_function" and user.target is getattr and len(user.args) > 1
                and user.args[1] in _META_ATTRS)

    def value_users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [u for u in node.users if not self._is_meta_use(u, node)]

    def value_input(self, node: torch.fx.Node) -> torch.fx.Node | None:
        if node.op in ("call_module", "call_function", "call_method") and node.args and \
                isinstance(node.args[0], torch.fx.Node):
            return node.args[0]
        return None

    def concrete(self, node: torch.fx.Node) -> Any:
        """The value of a non-tensor node (a size, a shape), computed from the traced shapes."""
        if node not in self._concrete:
            self._concrete[node] = self._eval_concrete(node)
        return self._concrete[node]

    def _eval_concrete(self, node: torch.fx.Node) -> Any:
        """Compute a size / shape value from the propagated shapes (raises NotConcrete when it cannot)."""
        shape = self.shape(node)
        if shape is not None:
            # a tensor used only for its shape (view_as / reshape_as / expand_as)
            return torch.empty(shape, dtype=torch.float64)
        c = lambda a: self.concrete(a) if isinstance(a, torch.fx.Node) else a  # noqa: E731
        if node.op == "call_method" and node.args:
            src = self.shape(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
            if src is not None:
                if node.target == "size":
                    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
                    return torch.Size(src) if dim is None else src[c(dim)]
                if node.target in ("dim", "ndimension"):
                    return len(src)
                if node.target in ("numel", "nelement"):
                    return math.prod(src)
        if node.op == "call_function":
            if node.target is getattr and isinstance(node.args[0], torch.fx.Node):
                src = self.shape(node.args[0])
                if src is not None and node.args[1] == "shape":
                    return torch.Size(src)
                if src is not None and node.args[1] == "ndim":
                    return len(src)
            if node.target in (operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
                               operator.truediv, operator.mod, operator.neg, operator.pow, int, float, max, min):
                return node.target(*[c(a) for a in node.args])
        raise NotConcrete(f"a shape argument is computed by {self.describe(node)}")

    # -- layers: the one eligibility check, for producers and consumers alike ---------------------
    def layer(self, node: torch.fx.Node, role: str) -> tuple[str, nn.Module] | Refusal | None:
        """(path, module) when ``node`` calls a Conv / ConvTranspose / Linear that may take a fold.

        Refused (the reason names the ``role``, "producer" or "consumer"): a
        layer with its own forward or a parametrized weight
        (:func:`~normfold.passes.fold.rules.producer_problem`), one called
        more than once, one whose parameters forward() reads outside its call,
        one whose parameters are tied to another module's. None: not a layer.
        """
        if node.op != "call_module":
            return None
        m = self.module(node)
        if not _is_layer(m):
            return None
        path = node.target
        problem = producer_problem(m)
        if problem is not None:
            if role == "consumer":
                problem = problem.replace("run fold_batchnorm after baking its weight",
                                          "its weight is computed in forward()")
            return Refusal(f"{role} {path}: {problem}", node)
        calls = self.graph.call_count(path)
        if calls > 1:
            return Refusal(f"{role} {path} is called {calls} times; changing it would change every call", node)
        ext = self.graph.external_param_reads(path)
        if ext:
            return Refusal(f"the parameters of {role} {path} are read elsewhere in forward() ({', '.join(ext)})",
                           node)
        for pname, p in m.named_parameters(recurse=False):
            owners = self.shared.get(id(p), [])
            if len(owners) > 1:
                return Refusal(f"{path}.{pname} is shared with {', '.join(o for o in owners if o != path)}", node)
        return path, m

    def producer(self, node: torch.fx.Node) -> Producer | Refusal | None:
        lay = self.layer(node, "producer")
        if lay is None or isinstance(lay, Refusal):
            return lay
        path, m = lay
        kind = "linear" if isinstance(m, nn.Linear) else (
            "conv_transpose" if isinstance(m, nn.modules.conv._ConvTransposeNd) else "conv")
        return Producer(kind, f"{path} ({type(m).__name__})", -(_spatial_dims(m) + 1), out_channels(m), path)

    def _consumer(self, node: torch.fx.Node, m: nn.Module) -> Rule | Consumer:
        label = f"{node.target} ({type(m).__name__})"
        lay = self.layer(node, "consumer")
        if isinstance(lay, Refusal):
            return self.block(label, lay.reason)
        path = node.target
        axis = -(_spatial_dims(m) + 1)
        if isinstance(m, nn.Linear):
            return Consumer("linear", label, axis, m.in_features, False, path)
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            return Consumer("conv_transpose", label, axis, m.in_channels, False, path)
        return Consumer("conv", label, axis, m.in_channels, conv_zero_pads(m), path)

    def concat(self, node: torch.fx.Node) -> tuple[list[torch.fx.Node], int] | None:
        """(inputs, dim) of a ``torch.cat`` of traced tensors, else None."""
        if node.op != "call_function" or node.target not in _CAT_FUNCTIONS:
            return None
        a = bind_args(node, ("tensors", "dim"), {"dim": 0})
        tensors, dim = a.get("tensors"), a.get("dim", a.get("axis", 0))
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) for t in tensors):
            return None
        if not isinstance(dim, int):
            return None
        return list(tensors), dim

    def is_functional_batchnorm(self, node: torch.fx.Node) -> bool:
        """True for a ``F.batch_norm`` / ``torch.batch_norm`` call in the graph."""
        return node.op == "call_function" and node.target in _FUNCTIONAL_BN

    # -- classification -----------------------------------------------------------------------------
    def classify(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        if node.op == "output":
            return Rule("output", "the model output", reason="its output is returned by the model")
        if node.op == "call_module":
            return self._classify_module(node, via)
        if node.op == "call_function":
            return self._classify_function(node, via)
        if node.op == "call_method":
            return self._classify_method(node, via)
        return self.block(self.describe(node))

    def _only_value_arg(self, node: torch.fx.Node, via: torch.fx.Node) -> bool:
        """``via`` feeds ``node`` only as its first argument."""
        return bool(node.args) and node.args[0] is via and flat_nodes((node.args, node.kwargs)).count(via) == 1

    def _classify_module(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        """Rule for a module call reading the affine (Identity, Dropout, pools, pads, Flatten...)."""
        m = self.module(node)
        label = f"{node.target} ({type(m).__name__})"
        if not self._only_value_arg(node, via):
            return self.block(label)
        if _is_layer(m):
            return self._consumer(node, m)
        if isinstance(m, nn.Identity) or type(m) is nn.Sequential and len(m) == 0:
            return self.move(node, via, label)
        if isinstance(m, nn.modules.dropout._DropoutNd):
            if m.training:
                return self.block(label, f"{label} is in training mode (it drops values at random)")
            return self.identity(label)
        if isinstance(m, (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)):
            return self.move(node, via, label)
        if isinstance(m, nn.Upsample):
            if m.mode in ("nearest", "nearest-exact"):
                return self.move(node, via, label)
            return self.pool(node, via, label, None)
        if isinstance(m, _MAX_POOLS):
            if m.return_indices:
                return self.block(label, f"{label} (return_indices=True) reads it and does not carry a "
                                         "per-channel affine")
            return self.pool(node, via, f"max-pool ({label})", int(type(m).__name__[-2]), nonneg=True)
        if isinstance(m, _AVG_POOLS):
            keeps, why = avg_pool_keeps_shift(m.padding, m.count_include_pad, getattr(m, "divisor_override", None))
            return self.pool(node, via, f"avg-pool ({label})", int(type(m).__name__[-2]), keeps_shift=keeps,
                             shift_why=why)
        if isinstance(m, _ADAPTIVE_AVG_POOLS):
            return self.pool(node, via, f"avg-pool ({label})", int(type(m).__name__[-2]))
        if isinstance(m, _COPY_PADS):
            return self.pool(node, via, label, len(m.padding) // 2)
        if isinstance(m, _CONSTANT_PADS):
            if m.value != 0:
                return self.block(label, f"{label} (pads with {m.value}) reads it and does not carry a "
                                         "per-channel affine")
            return self.pool(node, via, label, len(m.padding) // 2, keeps_shift=False, shift_why="pads with zeros")
        if is_batchnorm(m):
            return self.block(label, f"another BatchNorm ({label}) reads it")
        if type(m).__module__.startswith("torch.nn.modules.activation"):
            return self.block(label, f"an activation ({type(m).__name__}, {node.target}) reads it",
                              activation=type(m).__name__)
        return self.block(label)

    def _classify_function(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        """Rule for a torch function reading the affine (reshapes, pools, interpolate, pad...)."""
        t = node.target
        name = _fn_name(t)
        label = f"{name} ({node.name})"
        if not self._only_value_arg(node, via):
            if t is operator.getitem and node.args and node.args[0] is via:
                return self.block(f"indexing with a tensor ({node.name})")
            if name in _COMBINING:
                return self.block(label, f"{self.describe(node)} (it combines the BatchNorm output with other "
                                         "tensors) reads it and does not carry a per-channel affine")
            return self.block(self.describe(node))
        if t is getattr:
            if node.args[1] in ("T", "mT"):
                return self.move(node, via, label)
            return self.block(self.describe(node))
        if t in _MOVE_FUNCTIONS:
            return self.move(node, via, label)
        if t in _DROPOUT_FUNCTIONS:
            a = bind_args(node, _DROPOUT_ARGS, {"training": True})
            if a.get("training") is not False:
                return self.block(label, f"{label} runs with training=True (it drops values at random)")
            return self.identity(label)
        if t in _MAX_POOL_FUNCTIONS or t in _ADAPTIVE_MAX_FUNCTIONS:
            table = _MAX_POOL_FUNCTIONS if t in _MAX_POOL_FUNCTIONS else _ADAPTIVE_MAX_FUNCTIONS
            a = bind_args(node, _MAX_POOL_ARGS if t in _MAX_POOL_FUNCTIONS else _ADAPTIVE_ARGS)
            if a.get("return_indices"):
                return self.block(f"{label} (return_indices=True)")
            return self.pool(node, via, f"max-pool ({label})", table[t], nonneg=True)
        if t in _AVG_POOL_FUNCTIONS:
            a = bind_args(node, _AVG_POOL_ARGS, {"padding": 0, "count_include_pad": True})
            keeps, why = avg_pool_keeps_shift(a.get("padding"), a.get("count_include_pad"), a.get("divisor_override"))
            return self.pool(node, via, f"avg-pool ({label})", _AVG_POOL_FUNCTIONS[t], keeps_shift=keeps,
                             shift_why=why)
        if t in _ADAPTIVE_AVG_FUNCTIONS:
            return self.pool(node, via, f"avg-pool ({label})", _ADAPTIVE_AVG_FUNCTIONS[t])
        if t in (torch.mean, torch.amax, torch.amin):
            return self._reduce(node, via, name, label)
        if t in (F.interpolate, getattr(F, "upsample", None)):
            a = bind_args(node, _INTERP_ARGS, {"mode": "nearest"})
            if a.get("mode") in ("nearest", "nearest-exact"):
                return self.move(node, via, label)
            return self.pool(node, via, label, None)
        if t is F.pad:
            return self._pad(node, via, label)
        if is_activation_name(name):
            return self.block(label, f"an activation ({name}) reads it", activation=name.strip("_"))
        if t in _FUNCTIONAL_BN:
            return self.block(label, f"another batch_norm ({node.name}) reads it")
        return self.block(self.describe(node))

    def _classify_method(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        """Rule for a tensor method reading the affine (view, permute, mean, casts...)."""
        name = node.target
        label = f".{name}() ({node.name})"
        if not self._only_value_arg(node, via):
            if name in _COMBINING:
                return self.block(label, f"{self.describe(node)} (it combines the BatchNorm output with other "
                                         "tensors) reads it and does not carry a per-channel affine")
            return self.block(self.describe(node))
        if name in _MOVE_METHODS:
            return self.move(node, via, label)
        if name in ("to", "type", "float", "double", "half", "bfloat16"):
            in_dt, out_dt = self._dtype(node.args[0]), self._dtype(node)
            if in_dt is not None and in_dt == out_dt:
                return self.identity(label)
            return self.block(label, f"a dtype cast ({label}) reads it")
        if name in ("mean", "amax", "amin"):
            return self._reduce(node, via, name, label)
        if is_activation_name(name):
            return self.block(label, f"an activation ({name}) reads it", activation=name.strip("_"))
        return self.block(self.describe(node))

    def _reduce(self, node: torch.fx.Node, via: torch.fx.Node, name: str, label: str) -> Rule:
        """``mean`` / ``amax`` / ``amin`` over non-channel axes: a pool over those axes."""
        a = bind_args(node, _REDUCE_ARGS, {"dim": None, "keepdim": False})
        if a.get("dtype") is not None:
            return self.block(label, f"{label} casts the dtype")
        dim = a.get("dim")
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            return self.block(label, f"{label} reduces every axis, the channels too")
        dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
        what = {"amax": "max", "amin": "min"}.get(name, "mean")
        return self.pool(node, via, f"{what} ({label})", None, nonneg=name in ("amax", "amin"), axes=dims,
                         keepdim=bool(a.get("keepdim")))

    def _pad(self, node: torch.fx.Node, via: torch.fx.Node, label: str) -> Rule:
        """``F.pad``: copy modes carry the affine, zero padding only where ``t = 0``, other constants block it."""
        a = bind_args(node, _PAD_ARGS, {"mode": "constant", "value": None})
        pad = a.get("pad")
        try:
            if isinstance(pad, torch.fx.Node):
                pad = self.concrete(pad)
            pad = [self.concrete(p) if isinstance(p, torch.fx.Node) else p for p in (pad or [])]
        except NotConcrete as exc:
            return self.block(label, f"{label}: {exc}")
        k = len(pad) // 2
        mode = a.get("mode") or "constant"
        if mode == "constant":
            value = a.get("value") or 0
            if value != 0:
                return self.block(label, f"{label} (pads with {value}) reads it and does not carry a "
                                         "per-channel affine")
            if not any(pad):
                return self.identity(label)
            return self.pool(node, via, label, k, keeps_shift=False, shift_why="pads with zeros")
        return self.pool(node, via, label, k)
