"""Fold the BatchNorms that the backward fold leaves: through channel-wise ops, and forward into the next layer.

:class:`normfold.passes.fold_batchnorm.FoldBatchNorm` folds a BatchNorm into
the Conv/Linear that directly feeds it. This pass takes every eval-mode
BatchNorm still in the model and tries, in order:

1. **Backward through ops.** The BatchNorm input comes from a Conv /
   ConvTranspose / Linear through ops that carry a per-channel affine (view,
   reshape, flatten, permute, Dropout in eval, max-pool when gamma >= 0,
   average pools, ...; see :mod:`normfold.channel_flow`). Shape propagation
   tracks which output feature of the producer lands in which BatchNorm
   channel, so timm LeViT's ``LinearNorm`` (``bn(linear(x).flatten(0, 1)).reshape_as(x)``)
   folds into the Linear's output features, exactly as a direct fold would.
   A ``cat`` along the channel axis splits the BatchNorm between the
   producers of its inputs (timm's MixedConv2d: split -> convs -> cat -> BN):
   ``BN(cat(y1, y2)) = cat(BN1(y1), BN2(y2))`` with ``BNi`` the channels of ``yi``.

2. **Forward.** The BatchNorm output ``y = s*x + t`` reaches Conv / Linear
   consumers only, through ops that carry the affine. Each consumer computes
   ``W (s*x + t) + b = (W diag(s)) x + (b + W t)``: the scale goes on the
   consumer's input-channel axis (within each group for grouped convs), the
   shift becomes a bias contribution ``sum over input channels and kernel of
   W * t``. That identity holds where the consumer sees only values of the
   BatchNorm: a conv that pads with zeros would, after folding, pad ``x``
   with 0 where it used to pad ``y`` with 0, i.e. ``x`` with
   ``v = mean - beta*sqrt(var+eps)/gamma``; so such a consumer takes the fold
   only when ``t = 0`` on every channel (every ``v = 0``), and is skipped
   with the count otherwise. Reflect/replicate/circular padding copies
   values, so it carries the affine. A zero or negative gamma is fine for
   forward folding (``s = 0`` just zeroes the weight column; the shift still
   reaches the bias), except through a max-pool, which needs ``s >= 0``.
   A ConvTranspose consumer takes only ``t = 0`` (it spreads a constant
   unevenly over its output).

Backward is preferred (it is tried first). A BatchNorm that folds neither way
is skipped with both reasons, naming the op or consumer that blocks it.
A model torch.fx cannot trace is analysed on its torch.export graph by the
ATen-level pass (:mod:`normfold.passes.fold_exported`, same rules) and the
folded weights are written back into its own modules by parameter name.
Weights are computed in float64 and cast back; a fold whose result does not
fit the dtype is refused. Edits are made on the modules (the BatchNorm
becomes ``nn.Identity``), so the caller gets their own class back.
"""

from __future__ import annotations

import logging
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from normfold.channel_flow import (Consumer, NotConcrete, Producer, Rule,
                                   bind_args, channel_index, check_constraints, forward_fold_tensors,
                                   substitute, walk_backward, walk_forward, Constraint)
from normfold.errors import TraceError
from normfold.graph import ModelGraph, build_graph, is_leaf_type
from normfold.norms import BatchNormAffine, batchnorm_affine, batchnorm_remnant, is_batchnorm, set_submodule
from normfold.passes.base import Change, Pass, PassResult, Skip
from normfold.passes.fold_batchnorm import (FoldBatchNorm, _maybe_infer_inputs, fold_into_output_channels,
                                            producer_problem)

__all__ = ["FoldBatchNormForward", "FoldBatchNormAll", "ModuleDialect"]

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# op tables (torch level: what torch.fx records for nn.Module code)

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

_ACTIVATION_NAMES = {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu",
                     "elu", "selu", "celu", "mish", "softplus", "hardtanh", "prelu", "glu", "softmax", "log_softmax",
                     "relu_", "sigmoid_", "tanh_", "hardswish_", "silu_", "gelu_"}

_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_ADAPTIVE_ARGS = ("input", "output_size", "return_indices")
_INTERP_ARGS = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_PAD_ARGS = ("input", "pad", "mode", "value")
_DROPOUT_ARGS = ("input", "p", "training", "inplace")
_REDUCE_ARGS = ("input", "dim", "keepdim")


def _fn_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _any_nonzero(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return any(_any_nonzero(x) for x in v)
    if isinstance(v, str):
        return v != "valid"
    return bool(v)


def _conv_zero_pads(m: nn.Module) -> bool:
    """True when conv ``m`` pads its input with zeros (static padding or timm's dynamic 'SAME')."""
    if type(m).__name__ in {"Conv2dSame", "Conv2dSameExport"}:
        # pad_same pads with zeros whenever the kernel is larger than 1 (a 1x1 never pads)
        return any(k > 1 for k in m.kernel_size)
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return False
        pads = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation)]
    else:
        pads = list(m.padding)
    if not any(pads):
        return False
    return m.padding_mode == "zeros"


def _shared_parameters(module: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for mpath, m in module.named_modules(remove_duplicate=False):
        for _, p in m.named_parameters(recurse=False, remove_duplicate=False):
            lst = owners.setdefault(id(p), [])
            if mpath not in lst:
                lst.append(mpath)
    return owners


class ModuleDialect:
    """Reads the torch.fx graph of an nn.Module for :mod:`normfold.channel_flow`."""

    def __init__(self, root: nn.Module, graph: ModelGraph) -> None:
        self.root = root
        self.graph = graph
        self.shared = _shared_parameters(root)
        self._concrete: dict[torch.fx.Node, Any] = {}

    # -- basics -------------------------------------------------------------------------------------
    def module(self, node: torch.fx.Node) -> nn.Module:
        return self.root.get_submodule(node.target)

    def shape(self, node: torch.fx.Node) -> tuple[int, ...] | None:
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(int(s) for s in tm.shape)
        return None

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
        return f"the attribute {node.target}"

    def _is_meta_use(self, user: torch.fx.Node, node: torch.fx.Node) -> bool:
        if user.op == "call_method":
            if user.target in _META_METHODS and user.args and user.args[0] is node:
                return True
            if user.target in _SHAPE_FROM_ARG1 and user.args and user.args[0] is not node:
                return True
        if user.op == "call_function" and user.target is getattr and len(user.args) > 1 and user.args[1] in _META_ATTRS:
            return True
        return False

    def value_users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [u for u in node.users if not self._is_meta_use(u, node)]

    def value_input(self, node: torch.fx.Node) -> torch.fx.Node | None:
        if node.op in ("call_module", "call_function", "call_method") and node.args and isinstance(node.args[0], torch.fx.Node):
            return node.args[0]
        return None

    def concrete(self, node: torch.fx.Node) -> Any:
        """The value of a non-tensor node (a size, a shape), computed from the traced shapes."""
        if node in self._concrete:
            return self._concrete[node]
        val = self._eval_concrete(node)
        self._concrete[node] = val
        return val

    def _eval_concrete(self, node: torch.fx.Node) -> Any:
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
                args = [c(a) for a in node.args]
                return node.target(*args)
        raise NotConcrete(f"a shape argument is computed by {self.describe(node)}")

    # -- classification -----------------------------------------------------------------------------
    def _move(self, node: torch.fx.Node, via: torch.fx.Node, label: str) -> Rule:
        if not (node.op == "call_method" and node.target in _SHAPE_FROM_ARG1):
            for other in _flat_nodes((node.args, node.kwargs)):
                if other is not via and self.shape(other) is not None:
                    # a tensor argument that holds values (an index tensor): not plain data movement
                    return self._block(node, f"{label} (with the tensor argument {other.name})")

        def apply(index: Any) -> Any:
            args = substitute(node.args, via, index, self.concrete)
            kwargs = substitute(node.kwargs, via, index, self.concrete)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return self.module(node)(*args, **kwargs)
            return node.target(*args, **kwargs)
        return Rule("move", label, apply=apply)

    def _pool(self, node: torch.fx.Node, via: torch.fx.Node, label: str, k: int | None, *,
              nonneg: bool = False, keeps_shift: bool = True, shift_why: str = "",
              axes: tuple[int, ...] | None = None, keepdim: bool = True) -> Rule:
        in_shape = self.shape(via)
        if axes is None:
            if in_shape is None:
                return Rule("block", label, reason=f"the shape reaching {label} is unknown (pass example_inputs)")
            nd = len(in_shape)
            kk = k if k is not None else nd - 2
            axes = tuple(range(nd - kk, nd))
        return Rule("pool", label, axes=axes, out_shape=self.shape(node), keepdim=keepdim, nonneg_scale=nonneg,
                    keeps_shift=keeps_shift, shift_why=shift_why)

    def _block(self, node: torch.fx.Node, what: str | None = None) -> Rule:
        label = what or self.describe(node)
        return Rule("block", label, reason=f"{label} reads it and does not carry a per-channel affine")

    def classify(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        if node.op == "output":
            return Rule("output", "the model output", reason="its output is returned by the model")
        if node.op == "call_module":
            return self._classify_module(node, via)
        if node.op == "call_function":
            return self._classify_function(node, via)
        if node.op == "call_method":
            return self._classify_method(node, via)
        return self._block(node)

    def _only_value_arg(self, node: torch.fx.Node, via: torch.fx.Node) -> bool:
        """``via`` feeds ``node`` only as its first argument."""
        return bool(node.args) and node.args[0] is via and _flat_nodes((node.args, node.kwargs)).count(via) == 1

    def _classify_module(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        m = self.module(node)
        label = f"{node.target} ({type(m).__name__})"
        if not self._only_value_arg(node, via):
            return self._block(node)
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and is_leaf_type(m):
            return self._consumer(node, m)
        if isinstance(m, nn.Identity) or type(m) is nn.Sequential and len(m) == 0:
            return self._move(node, via, label)
        if isinstance(m, nn.modules.dropout._DropoutNd):
            if m.training:
                return Rule("block", label, reason=f"{label} is in training mode (it drops values at random)")
            return Rule("move", label, apply=lambda i: i)
        if isinstance(m, (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)):
            return self._move(node, via, label)
        if isinstance(m, nn.Upsample):
            if m.mode in ("nearest", "nearest-exact"):
                return self._move(node, via, label)
            return self._pool(node, via, label, None)
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            if m.return_indices:
                return self._block(node, f"{label} (return_indices=True)")
            return self._pool(node, via, f"max-pool ({label})", int(type(m).__name__[-2]), nonneg=True)
        if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            if m.return_indices:
                return self._block(node, f"{label} (return_indices=True)")
            return self._pool(node, via, f"max-pool ({label})", int(type(m).__name__[-2]), nonneg=True)
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            keeps, why = _avg_pool_keeps_shift(m.padding, m.count_include_pad, getattr(m, "divisor_override", None))
            return self._pool(node, via, f"avg-pool ({label})", int(type(m).__name__[-2]), keeps_shift=keeps, shift_why=why)
        if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return self._pool(node, via, f"avg-pool ({label})", int(type(m).__name__[-2]))
        if isinstance(m, (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                          nn.ReplicationPad2d, nn.ReplicationPad3d) + _circular_pads()):
            return self._pool(node, via, label, len(m.padding) // 2)
        if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad2d) + _zero_pads()):
            if m.value != 0:
                return self._block(node, f"{label} (pads with {m.value})")
            return self._pool(node, via, label, len(m.padding) // 2, keeps_shift=False, shift_why="pads with zeros")
        if is_batchnorm(m):
            return Rule("block", label, reason=f"another BatchNorm ({label}) reads it")
        if type(m).__module__.startswith("torch.nn.modules.activation"):
            return Rule("block", label, reason=f"an activation ({type(m).__name__}, {node.target}) reads it")
        return self._block(node, label)

    def _consumer(self, node: torch.fx.Node, m: nn.Module) -> Rule | Consumer:
        path = node.target
        label = f"{path} ({type(m).__name__})"
        problem = producer_problem(m)
        if problem is not None:
            return Rule("block", label, reason=f"consumer {label}: {problem.replace('run fold_batchnorm after baking its weight', 'its weight is computed in forward()')}")
        if self.graph.call_count(path) > 1:
            return Rule("block", label, reason=f"consumer {label} is called {self.graph.call_count(path)} times; "
                                               "changing it would change every call")
        ext = self.graph.external_param_reads(path)
        if ext:
            return Rule("block", label, reason=f"the parameters of consumer {label} are read elsewhere ({', '.join(ext)})")
        for pname, p in m.named_parameters(recurse=False):
            owners = self.shared.get(id(p), [])
            if len(owners) > 1:
                return Rule("block", label, reason=f"{path}.{pname} is shared with "
                                                   f"{', '.join(o for o in owners if o != path)}")
        if isinstance(m, nn.Linear):
            return Consumer("linear", label, -1, m.in_features, False, path)
        k = len(m.kernel_size)
        in_shape = self.shape(node.args[0])
        axis = (len(in_shape) - k - 1) if in_shape is not None else 1
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            return Consumer("conv_transpose", label, axis, m.in_channels, False, path)
        return Consumer("conv", label, axis, m.in_channels, _conv_zero_pads(m), path)

    def _classify_function(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        t = node.target
        name = _fn_name(t)
        label = f"{name} ({node.name})"
        if not self._only_value_arg(node, via):
            if t is operator.getitem and node.args and node.args[0] is via:
                return self._block(node, f"indexing with a tensor ({node.name})")
            return self._block(node, self.describe(node) + " (it combines the BatchNorm output with other tensors)"
                               if name in ("add", "mul", "sub", "cat", "stack", "matmul", "iadd") else None)
        if t is getattr:
            if node.args[1] in ("T", "mT"):
                return self._move(node, via, label)
            return self._block(node)
        if t in _MOVE_FUNCTIONS:
            return self._move(node, via, label)
        if t in _DROPOUT_FUNCTIONS:
            a = bind_args(node, _DROPOUT_ARGS, {"training": True})
            if a.get("training") is not False:
                return Rule("block", label, reason=f"{label} runs with training=True (it drops values at random)")
            return Rule("move", label, apply=lambda i: i)
        if t in _MAX_POOL_FUNCTIONS or t in _ADAPTIVE_MAX_FUNCTIONS:
            table = _MAX_POOL_FUNCTIONS if t in _MAX_POOL_FUNCTIONS else _ADAPTIVE_MAX_FUNCTIONS
            a = bind_args(node, _MAX_POOL_ARGS if t in _MAX_POOL_FUNCTIONS else _ADAPTIVE_ARGS)
            if a.get("return_indices"):
                return self._block(node, f"{label} (return_indices=True)")
            return self._pool(node, via, f"max-pool ({label})", table[t], nonneg=True)
        if t in _AVG_POOL_FUNCTIONS:
            a = bind_args(node, _AVG_POOL_ARGS, {"padding": 0, "count_include_pad": True})
            keeps, why = _avg_pool_keeps_shift(a.get("padding"), a.get("count_include_pad"), a.get("divisor_override"))
            return self._pool(node, via, f"avg-pool ({label})", _AVG_POOL_FUNCTIONS[t], keeps_shift=keeps, shift_why=why)
        if t in _ADAPTIVE_AVG_FUNCTIONS:
            return self._pool(node, via, f"avg-pool ({label})", _ADAPTIVE_AVG_FUNCTIONS[t])
        if t in (torch.mean, torch.amax, torch.amin):
            return self._reduce(node, via, name, label)
        if t in (F.interpolate, getattr(F, "upsample", None)):
            a = bind_args(node, _INTERP_ARGS, {"mode": "nearest"})
            if a.get("mode") in ("nearest", "nearest-exact"):
                return self._move(node, via, label)
            return self._pool(node, via, label, None)
        if t is F.pad:
            return self._pad(node, via, label)
        if name.strip("_") in _ACTIVATION_NAMES or name in _ACTIVATION_NAMES:
            return Rule("block", label, reason=f"an activation ({name}) reads it")
        if t in (F.batch_norm, torch.batch_norm):
            return Rule("block", label, reason=f"another batch_norm ({node.name}) reads it")
        return self._block(node)

    def _classify_method(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        name = node.target
        label = f".{name}() ({node.name})"
        if not self._only_value_arg(node, via):
            return self._block(node, self.describe(node) + " (it combines the BatchNorm output with other tensors)"
                               if name in ("add", "mul", "sub", "add_", "mul_", "matmul") else None)
        if name in _MOVE_METHODS:
            return self._move(node, via, label)
        if name in ("to", "type", "float", "double", "half", "bfloat16"):
            in_dt = node.args[0].meta.get("tensor_meta").dtype if node.args[0].meta.get("tensor_meta") is not None else None
            out_dt = node.meta.get("tensor_meta").dtype if node.meta.get("tensor_meta") is not None else None
            if in_dt is not None and in_dt == out_dt:
                return Rule("move", label, apply=lambda i: i)
            return Rule("block", label, reason=f"a dtype cast ({label}) reads it")
        if name in ("mean", "amax", "amin"):
            return self._reduce(node, via, name, label)
        if name.strip("_") in _ACTIVATION_NAMES or name in _ACTIVATION_NAMES:
            return Rule("block", label, reason=f"an activation ({name}) reads it")
        return self._block(node)

    def _reduce(self, node: torch.fx.Node, via: torch.fx.Node, name: str, label: str) -> Rule:
        a = bind_args(node, _REDUCE_ARGS, {"dim": None, "keepdim": False})
        if a.get("dtype") is not None:
            return Rule("block", label, reason=f"{label} casts the dtype")
        in_shape = self.shape(via)
        dim = a.get("dim")
        if in_shape is None:
            return Rule("block", label, reason=f"the shape reaching {label} is unknown (pass example_inputs)")
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            return Rule("block", label, reason=f"{label} reduces every axis, the channels too")
        dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
        return self._pool(node, via, f"{'max' if name == 'amax' else 'min' if name == 'amin' else 'mean'} "
                          f"({label})", None, nonneg=name in ("amax", "amin"), axes=dims, keepdim=bool(a.get("keepdim")))

    def _pad(self, node: torch.fx.Node, via: torch.fx.Node, label: str) -> Rule:
        a = bind_args(node, _PAD_ARGS, {"mode": "constant", "value": None})
        pad = a.get("pad")
        if isinstance(pad, torch.fx.Node):
            try:
                pad = self.concrete(pad)
            except NotConcrete as exc:
                return Rule("block", label, reason=f"{label}: {exc}")
        if not isinstance(pad, (list, tuple)) or any(isinstance(p, torch.fx.Node) for p in pad):
            pad = [self.concrete(p) if isinstance(p, torch.fx.Node) else p for p in (pad or [])]
        k = len(pad) // 2
        mode = a.get("mode") or "constant"
        if mode == "constant":
            value = a.get("value") or 0
            if value != 0:
                return self._block(node, f"{label} (pads with {value})")
            if not any(pad):
                return Rule("move", label, apply=lambda i: i)
            return self._pool(node, via, label, k, keeps_shift=False, shift_why="pads with zeros")
        return self._pool(node, via, label, k)

    def concat(self, node: torch.fx.Node) -> tuple[list[torch.fx.Node], int] | None:
        """(inputs, dim) of a ``torch.cat`` of traced tensors, else None."""
        if node.op != "call_function" or node.target not in (torch.cat, getattr(torch, "concat", torch.cat),
                                                              getattr(torch, "concatenate", torch.cat)):
            return None
        a = bind_args(node, ("tensors", "dim"), {"dim": 0})
        tensors, dim = a.get("tensors"), a.get("dim", a.get("axis", 0))
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) for t in tensors):
            return None
        if not isinstance(dim, int):
            return None
        return list(tensors), dim

    # -- producers ----------------------------------------------------------------------------------
    def producer(self, node: torch.fx.Node) -> Producer | str | None:
        if node.op != "call_module":
            return None
        m = self.module(node)
        if not (isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and is_leaf_type(m)):
            return None
        path = node.target
        label = f"{path} ({type(m).__name__})"
        problem = producer_problem(m)
        if problem is not None:
            return f"producer {path}: {problem}"
        if self.graph.call_count(path) > 1:
            return f"producer {path} is called {self.graph.call_count(path)} times; changing it would change every call"
        ext = self.graph.external_param_reads(path)
        if ext:
            return f"the parameters of {path} are read elsewhere in forward() ({', '.join(ext)})"
        for pname, p in m.named_parameters(recurse=False):
            owners = self.shared.get(id(p), [])
            if len(owners) > 1:
                return f"{path}.{pname} is shared with {', '.join(o for o in owners if o != path)}"
        out_shape = self.shape(node)
        if isinstance(m, nn.Linear):
            return Producer("linear", label, -1, m.out_features, path)
        k = len(m.kernel_size)
        axis = (len(out_shape) - k - 1) if out_shape is not None else 1
        kind = "conv_transpose" if isinstance(m, nn.modules.conv._ConvTransposeNd) else "conv"
        return Producer(kind, label, axis, m.out_channels, path)


def _bn_dtype(bn: nn.Module) -> torch.dtype | None:
    for name in ("weight", "bias", "running_mean"):
        t = getattr(bn, name, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return None


def _restore(saved: list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]]) -> None:
    with torch.no_grad():
        for m, w, b in saved:
            m.weight.copy_(w)
            if b is None:
                m.bias = None
            else:
                m.bias.copy_(b)


def _flat_nodes(value: Any) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(value, lambda n: out.append(n))
    return out


def _circular_pads() -> tuple[type, ...]:
    return tuple(getattr(nn, n) for n in ("CircularPad1d", "CircularPad2d", "CircularPad3d") if hasattr(nn, n))


def _zero_pads() -> tuple[type, ...]:
    return tuple(getattr(nn, n) for n in ("ZeroPad1d", "ZeroPad3d") if hasattr(nn, n))


def _avg_pool_keeps_shift(padding: Any, count_include_pad: Any, divisor_override: Any) -> tuple[bool, str]:
    if divisor_override:
        return False, f"divides by divisor_override={divisor_override} instead of the window size"
    if count_include_pad is not False and _any_nonzero(padding):
        return False, "counts its zero padding (count_include_pad=True)"
    return True, ""


# ------------------------------------------------------------------------------------------------
# the pass


@dataclass
class _Attempt:
    folded: bool
    reason: str | None = None


class FoldBatchNormForward(Pass):
    """Fold BatchNorms left after the backward fold: through channel-wise ops, or forward; see the module docstring.

    ``prior_reasons`` maps a BatchNorm path to the reason the direct backward
    fold gave (the composite :class:`FoldBatchNormAll` passes them), so the
    final skip names both directions.
    """

    name = "fold_batchnorm"

    def __init__(self, *, example_inputs: Any = None, backward: bool = True, forward: bool = True,
                 prior_reasons: dict[str, str] | None = None, fx_error: str | None = None) -> None:
        self.example_inputs = example_inputs
        self.backward = backward
        self.forward = forward
        self.prior_reasons = dict(prior_reasons or {})
        #: set when the caller already knows torch.fx cannot trace the model (saves a second torch.export)
        self.fx_error = fx_error
        #: BatchNorm paths this pass folded or re-skipped (their prior skip records are superseded)
        self.handled: set[str] = set()

    def call(self, module: nn.Module) -> PassResult:
        result = PassResult(module=module)
        self.handled = set()
        inputs = self.example_inputs
        graph = None
        fx_error = self.fx_error
        if fx_error is None:
            try:
                graph = build_graph(module, inputs, shapes=False, allow_export=False)
            except TraceError as exc:
                fx_error = str(exc)
        if graph is None:
            self._via_export(module, inputs, fx_error, result)
            result.metrics["graph_source"] = "export"
            return result
        candidates = []
        seen: set[str] = set()
        for node in graph.graph_module.graph.nodes:
            if node.op != "call_module" or node.target in seen:
                continue
            try:
                m = module.get_submodule(node.target)
            except AttributeError:
                continue
            if is_batchnorm(m):
                seen.add(node.target)
                candidates.append((node, m))
        if not candidates:
            result.metrics["graph_source"] = graph.source
            return result
        # Shapes cost a forward pass: only now that a BatchNorm is left do we need them.
        if not graph.example_inputs and inputs is None:
            graph.example_inputs = _maybe_infer_inputs(module)
        graph.ensure_shapes()
        d = ModuleDialect(module, graph)
        for node, m in candidates:
            self._one(d, node, m, result)
        result.metrics["graph_source"] = graph.source
        return result

    # -- models torch.fx cannot trace ------------------------------------------------------------------
    def _via_export(self, module: nn.Module, inputs: Any, fx_error: str | None, result: PassResult) -> None:
        """Analyse the model's torch.export graph at the ATen level, then edit its modules by parameter name.

        The ExportedProgram pass computes the folded weights under the same
        rules; they are copied into the module's own Conv/Linear layers (the
        parameter names of an export are the module paths), and each folded
        BatchNorm module is replaced by its remnant. Only BatchNorms the direct
        fold left (``prior_reasons``) are considered, and only layers whose
        forward is the standard one receive weights.
        """
        mods = dict(module.named_modules())
        wanted = {p for p in self.prior_reasons
                  if p in mods and is_batchnorm(mods[p]) and not isinstance(batchnorm_affine(mods[p]), str)
                  and not mods[p]._forward_hooks and not mods[p]._forward_pre_hooks}

        def give_up(why: str) -> None:
            for p in sorted(wanted):
                result.skipped.append(Skip(self.name, (p,), f"{self.prior_reasons[p]}; {why}"))
                self.handled.add(p)

        if not wanted:
            return
        if inputs is None:
            inputs = _maybe_infer_inputs(module)
        if inputs is None:
            return give_up(f"folding through reshapes and forward folding need a trace ({fx_error}); "
                           "pass example_inputs so that torch.export can trace it")
        from normfold.graph import eval_mode
        from normfold.passes.fold_exported import FoldExportedProgram

        try:
            with eval_mode(module), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(module, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,),
                                         strict=False)
        except Exception as exc:  # the direct fold traced it; a second export failing is not the user's problem
            return give_up(f"torch.export failed for forward folding ({type(exc).__name__})")
        dry = FoldExportedProgram(forward=self.forward, weight_standardization=False, only=wanted)(ep)
        ok: set[str] = set()
        for c in dry.changes:
            layers = [mods.get(p) for p in c.paths[1:]]
            if c.paths[0] in wanted and all(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
                                            and producer_problem(m) is None for m in layers):
                ok.add(c.paths[0])
        # fold again with only the BatchNorms whose layers can take the weights, so that no layer carries a
        # fold that is not applied to the module
        done = FoldExportedProgram(forward=self.forward, weight_standardization=False, only=ok)(ep, inplace=True) \
            if ok else dry
        state = done.program.state_dict if ok else {}
        for c in (done.changes if ok else []):
            bn_path = c.paths[0]
            bn = mods[bn_path]
            for lp in c.paths[1:]:
                layer = mods[lp]
                with torch.no_grad():
                    layer.weight.copy_(state[f"{lp}.weight"])
                    if layer.bias is not None:
                        layer.bias.copy_(state[f"{lp}.bias"])
                    elif f"{lp}.bias" in state:
                        layer.bias = nn.Parameter(state[f"{lp}.bias"].detach().clone(),
                                                  requires_grad=layer.weight.requires_grad)
            set_submodule(module, bn_path, batchnorm_remnant(bn))
            names = ", ".join(f"{p} ({type(mods[p]).__name__})" for p in c.paths[1:])
            through = c.details.get("through") or []
            direction = "forward into" if c.action == "fold_forward" else "into"
            result.changes.append(Change(self.name, c.action, c.paths,
                                         f"folded {bn_path} ({type(bn).__name__}) {direction} {names}"
                                         + (f" through {', '.join(through)}" if through else "")
                                         + " (traced with torch.export)", dict(c.details)))
            self.handled.add(bn_path)
        reasons = {s.paths[0]: s.reason for s in dry.skipped if s.paths}
        for p in sorted(wanted - self.handled):
            why = reasons.get(p, "its layers cannot take the folded weights (a Conv/Linear with its own forward)")
            if p in ok or any(c.paths[0] == p for c in dry.changes):
                why = "a layer it would fold into has its own forward()"
            result.skipped.append(Skip(self.name, (p,), f"{self.prior_reasons[p]}; forward (torch.export): {why}"))
            self.handled.add(p)

    def _one(self, d: ModuleDialect, node: torch.fx.Node, bn: nn.Module, result: PassResult) -> None:
        path = node.target
        affine = batchnorm_affine(bn)
        if isinstance(affine, str):
            return  # the backward fold already reported it; nothing can fold without an affine
        if d.graph.call_count(path) > 1 or bn._forward_hooks or bn._forward_pre_hooks:
            return
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            return
        back_reason = self.prior_reasons.get(path)
        if self.backward:
            r = self._try_backward(d, node, bn, affine, result)
            if r.folded:
                self.handled.add(path)
                return
            if r.reason is not None:
                back_reason = r.reason
        if not self.forward:
            if back_reason is not None and path not in self.prior_reasons:
                result.skipped.append(Skip(self.name, (path,), back_reason))
                self.handled.add(path)
            return
        f = self._try_forward(d, node, bn, affine, result)
        self.handled.add(path)
        if f.folded:
            return
        back = back_reason or "no Conv, ConvTranspose or Linear before it"
        result.skipped.append(Skip(self.name, (path,), f"{back}; forward: {f.reason}"))

    # -- backward through ops -----------------------------------------------------------------------
    def _try_backward(self, d: ModuleDialect, node: torch.fx.Node, bn: nn.Module, affine: BatchNormAffine,
                      result: PassResult) -> _Attempt:
        src = node.args[0]
        if d.producer(src) is not None:
            if node.target in self.prior_reasons:
                # a direct producer: the direct backward fold has decided, and said why not
                return _Attempt(False, None)
        elif d.concat(src) is None:
            inner = d.value_input(src)
            first = d.classify(src, inner) if inner is not None else None
            if not isinstance(first, Rule) or first.kind not in ("move", "pool"):
                if node.target in self.prior_reasons:
                    return _Attempt(False, None)  # keep the direct fold's reason (it names the op)
                if isinstance(first, Rule) and first.reason:
                    return _Attempt(False, first.reason.replace("reads it", "feeds it"))
                return _Attempt(False, f"its input is {d.describe(src)}, not a Conv, ConvTranspose or Linear")
        plan = walk_backward(d, node, src, affine.num_features)
        if isinstance(plan, str):
            return _Attempt(False, plan)
        why = check_constraints(plan.constraints, affine, _bn_dtype(bn))
        if why is not None:
            return _Attempt(False, why)
        # fold into every producer, or into none: remember what to put back if one refuses
        saved = []
        for part in plan.parts:
            m = d.root.get_submodule(part.producer.ref)
            saved.append((m, m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone()))
        for part in plan.parts:
            producer = d.root.get_submodule(part.producer.ref)
            n_out = part.producer.out_channels
            scale = torch.ones(n_out, dtype=torch.float64)
            shift = torch.zeros(n_out, dtype=torch.float64)
            scale[part.features] = affine.scale.cpu()[part.channels]
            shift[part.features] = affine.shift.cpu()[part.channels]
            refused = fold_into_output_channels(producer, scale, shift)
            if refused is not None:
                _restore(saved)
                return _Attempt(False, f"{refused} ({part.producer.ref})")
        self._remove_bn(d, node.target, bn)
        through = f" through {', '.join(plan.ops)}" if plan.ops else ""
        paths = [part.producer.ref for part in plan.parts]
        names = ", ".join(f"{p} ({type(d.root.get_submodule(p)).__name__})" for p in paths)
        result.changes.append(Change(self.name, "fold", (node.target, *paths),
                                     f"folded {node.target} ({type(bn).__name__}) into {names}{through}",
                                     {"channels": affine.num_features, "through": list(plan.ops)}))
        return _Attempt(True)

    # -- forward ------------------------------------------------------------------------------------
    def _try_forward(self, d: ModuleDialect, node: torch.fx.Node, bn: nn.Module, affine: BatchNormAffine,
                     result: PassResult) -> _Attempt:
        rem = batchnorm_remnant(bn)
        if not isinstance(rem, (nn.Identity, nn.modules.dropout._DropoutNd)) or (
                isinstance(rem, nn.modules.dropout._DropoutNd) and rem.training):
            return _Attempt(False, f"{type(rem).__name__} runs inside {type(bn).__name__} after the normalization")
        shape = d.shape(node)
        if shape is None:
            return _Attempt(False, "the BatchNorm output shape is unknown (pass example_inputs)")
        if len(shape) < 2:
            return _Attempt(False, "the BatchNorm output is not batched")
        plan = walk_forward(d, node, channel_index(shape, 1))
        if isinstance(plan, str):
            return _Attempt(False, plan)
        constraints = list(plan.constraints)
        for h in plan.hits:
            if h.consumer.kind == "conv_transpose":
                constraints.append(Constraint("zero_shift", torch.unique(h.channel_of_input), h.consumer.label,
                                              "spreads a constant unevenly over its output (transposed conv)",
                                              consumer=True))
        why = check_constraints(constraints, affine, _bn_dtype(bn))
        if why is not None:
            return _Attempt(False, why)
        # compute every consumer's new weights first: refuse all or fold all
        edits = []
        for h in plan.hits:
            m = d.root.get_submodule(h.consumer.ref)
            s_in = affine.scale.cpu()[h.channel_of_input]
            t_in = affine.shift.cpu()[h.channel_of_input]
            w = m.weight.detach()
            b = m.bias.detach() if m.bias is not None else None
            new_w, new_b = forward_fold_tensors(h.consumer.kind, w, b, getattr(m, "groups", 1), s_in, t_in)
            cw = new_w.to(w.dtype)
            cb = new_b.to(w.dtype) if new_b is not None else None
            if not torch.isfinite(cw).all() or (cb is not None and not torch.isfinite(cb).all()):
                if torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all()):
                    return _Attempt(False, f"the folded weights of {h.consumer.label} overflow "
                                           f"{str(w.dtype).replace('torch.', '')}")
                return _Attempt(False, "the folded weights are not finite (running_var + eps <= 0 or inf/NaN statistics)")
            edits.append((m, cw, cb))
        for m, cw, cb in edits:
            with torch.no_grad():
                m.weight.copy_(cw)
                if cb is not None:
                    if m.bias is not None:
                        m.bias.copy_(cb)
                    else:
                        m.bias = nn.Parameter(cb, requires_grad=m.weight.requires_grad)
        self._remove_bn(d, node.target, bn)
        consumers = [h.consumer.ref for h in plan.hits]
        names = ", ".join(f"{h.consumer.ref} ({type(d.root.get_submodule(h.consumer.ref)).__name__})" for h in plan.hits)
        through = f" through {', '.join(plan.ops)}" if plan.ops else ""
        result.changes.append(Change(self.name, "fold_forward", (node.target, *consumers),
                                     f"folded {node.target} ({type(bn).__name__}) forward into {names}{through}",
                                     {"channels": affine.num_features, "through": list(plan.ops)}))
        return _Attempt(True)

    def _remove_bn(self, d: ModuleDialect, path: str, bn: nn.Module) -> None:
        remnant = batchnorm_remnant(bn)
        set_submodule(d.root, path, remnant)
        if d.graph.graph_module is not None and d.graph.graph_module is not d.root:
            try:
                set_submodule(d.graph.graph_module, path, remnant)
            except AttributeError:
                # fx only copies the submodules its graph calls into the GraphModule: a BatchNorm it never
                # called has no slot there, and the root (what the user gets) is already edited.
                pass


class FoldBatchNormAll(Pass):
    """What :func:`normfold.fold_batchnorm` runs: bake weight standardization, fold backward, then the rest.

    1. timm StdConv2d / ScaledStdConv2d become plain convs with the
       standardized weight (:mod:`normfold.passes.weight_standardization`),
       so the BatchNorm after them can fold too (``weight_standardization``);
    2. :class:`~normfold.passes.fold_batchnorm.FoldBatchNorm` folds each
       BatchNorm into the layer that directly feeds it;
    3. :class:`FoldBatchNormForward` folds what is left through channel-wise
       ops and forward into the next layer (``forward``).

    One PassResult: a BatchNorm folded in step 3 is not also listed as
    skipped by step 2; one that never folds is skipped once, with the reason
    for each direction.
    """

    name = "fold_batchnorm"

    def __init__(self, *, example_inputs: Any = None, forward: bool = True, weight_standardization: bool = True) -> None:
        self.example_inputs = example_inputs
        self.forward = forward
        self.weight_standardization = weight_standardization

    def call(self, module: nn.Module) -> PassResult:
        result = PassResult(module=module)
        if self.weight_standardization:
            from normfold.passes.weight_standardization import BakeWeightStandardization

            r0 = BakeWeightStandardization().call(module)
            module = r0.module
            result.changes.extend(r0.changes)
            result.skipped.extend(r0.skipped)
        r1 = FoldBatchNorm(example_inputs=self.example_inputs, infer_inputs=True).call(module)
        module = r1.module
        result.changes.extend(r1.changes)
        result.metrics.update(r1.metrics)
        if not self.forward or not r1.skipped:
            # nothing left for step 3 (every BatchNorm folded directly): skip its second trace
            result.skipped.extend(r1.skipped)
            result.module = module
            return result
        prior = {s.paths[0]: s.reason for s in r1.skipped if s.paths}
        fx_error = None
        if r1.metrics.get("graph_source") == "export":
            fx_error = "torch.fx could not trace the model; the direct fold used torch.export"
        step = FoldBatchNormForward(example_inputs=self.example_inputs, prior_reasons=prior, fx_error=fx_error)
        r2 = step.call(module)
        result.changes.extend(r2.changes)
        result.skipped.extend(s for s in r1.skipped if not (s.paths and s.paths[0] in step.handled))
        result.skipped.extend(r2.skipped)
        result.module = r2.module
        return result
