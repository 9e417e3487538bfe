"""Fold BatchNorm in a torch.export ExportedProgram (.pt2), at the ATen level.

The same folds as the nn.Module passes, on ATen ops instead of modules, so a
``.pt2`` file can be folded without the model's code:

* **weight standardization** (timm StdConv2d / ScaledStdConv2d): a
  ``batch_norm`` whose input is computed from parameters only is a constant;
  it is evaluated once in float64 and stored in place of the conv's weight
  (:mod:`normfold.passes.weight_standardization` states the math);
* **backward**: an eval ``batch_norm`` (``aten.batch_norm`` with
  ``training=False``, ``_native_batch_norm_legit_no_training``,
  ``_native_batch_norm_legit`` / ``native_batch_norm`` with ``training=False``,
  ``_batch_norm_no_update``) folds into the ``convolution`` / ``conv{1,2,3}d`` /
  ``conv_transpose{1,2,3}d`` / ``linear`` / ``addmm`` / ``mm`` that produces its
  input, directly or through ops that carry a per-channel affine
  (:mod:`normfold.channel_flow`): ``W' = s W``, ``b' = s b + t`` per output channel;
* **forward**: otherwise into the layers that read its output:
  ``W' = W diag(s)``, ``b' = b + W t`` (summed over the kernel), only where no
  zero padding sees the shift (:mod:`normfold.passes.fold_batchnorm_forward`).

Backward is tried first. The ``batch_norm`` node is removed and its
parameters and buffers leave the program's signature and state_dict; a layer
without bias gets a new parameter ``<layer>.bias``. Weights are computed in
float64 and cast back to their dtype. Module paths in the records come from
the parameter names, so on the same model the records match the nn.Module
pass (:func:`normfold.fold_batchnorm`). Not folded here: torchvision's
FrozenBatchNorm2d (its forward is plain arithmetic, not a batch_norm op).
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from normfold.channel_flow import (Consumer, Constraint, Producer, Rule, bind_args, channel_index, check_constraints,
                                   forward_fold_tensors, backward_fold_tensors, substitute, walk_backward, walk_forward,
                                   NotConcrete)
from normfold.errors import NormfoldError
from normfold.norms import BatchNormAffine
from normfold.passes.base import Change, Pass, PassResult, Skip

__all__ = ["FoldExportedProgram", "ExportedPassResult", "fold_exported_program", "program_inputs"]

log = logging.getLogger(__name__)

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------------
# op tables, by overload packet name

_MOVE = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
         "unsqueeze", "expand", "clone", "contiguous", "alias", "detach", "slice", "select", "split",
         "split_with_sizes", "chunk", "unbind", "flip", "roll", "pixel_shuffle", "pixel_unshuffle",
         "channel_shuffle", "native_channel_shuffle", "movedim", "narrow", "repeat", "lift_fresh_copy",
         "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
         "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "tensor_split", "swapaxes", "numpy_T",
         "reshape_as", "view_as", "expand_as"}
_META = {"sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}
#: ops whose second argument only lends its shape (or dtype)
_SHAPE_FROM_ARG1 = {"reshape_as", "view_as", "expand_as", "type_as"}
_MAX_POOL = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3}
_MAX_POOL_TUPLE = {"max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3, "adaptive_max_pool1d": 1,
                   "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3}
_AVG_POOL = {"avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3}
_ADAPTIVE_AVG = {"adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3,
                 "_adaptive_avg_pool2d": 2, "_adaptive_avg_pool3d": 3}
_INTERP = {"upsample_bilinear2d", "upsample_linear1d", "upsample_trilinear3d", "upsample_bicubic2d",
           "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa"}
_COPY_PADS = {"reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
              "replication_pad2d", "replication_pad3d", "_pad_circular"}
_ACTIVATIONS = {"relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardswish", "hardswish_",
                "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "hardtanh", "hardtanh_",
                "prelu", "_prelu_kernel", "glu", "_softmax", "softmax", "_log_softmax", "log_softmax",
                "clamp", "clamp_min", "clamp_max", "threshold"}
_COMBINE = {"add", "add_", "sub", "mul", "mul_", "div", "cat", "stack", "matmul", "bmm", "baddbmm", "where"}
_EVAL_BN = {"_native_batch_norm_legit_no_training", "_batch_norm_no_update"}
_BN_WITH_FLAG = {"batch_norm": 5, "_native_batch_norm_legit": 5, "native_batch_norm": 5,
                 "cudnn_batch_norm": 5, "miopen_batch_norm": 5, "_batch_norm_with_update": None}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def _packet(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def _hint(v: Any) -> int:
    if isinstance(v, torch.SymInt):
        node = v.node
        if getattr(node, "hint", None) is not None:
            return int(node.hint)
        return int(node.shape_env.size_hint(node.expr))
    return int(v)


def _first_tensor(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return val
    if isinstance(val, (list, tuple)) and val and isinstance(val[0], torch.Tensor):
        return val[0]
    return None


def _path_of(target: str, suffixes: tuple[str, ...]) -> str:
    for suf in suffixes:
        if target.endswith("." + suf):
            return target[: -len(suf) - 1]
        if target == suf:
            return ""
    return target


def _stack_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    value = list(stack.values())[-1]
    path = str(value[0] if isinstance(value, (tuple, list)) else value)
    for prefix in ("L['self'].", "L__self__.", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "").strip(".")


# ------------------------------------------------------------------------------------------------
# the program being edited


class _Program:
    """An ExportedProgram under edit: its graph, signature, and tensors by placeholder."""

    def __init__(self, ep: ExportedProgram, rename: dict[str, str] | None = None) -> None:
        self.ep = ep
        self.gm = ep.graph_module
        self.graph = self.gm.graph
        #: copy.deepcopy of a program renames nodes that shadow builtins (``input`` -> ``input_1``) but not its
        #: signature: ``rename`` maps the signature's names to the copy's
        self.rename = dict(rename or {})
        self.specs: list[InputSpec] = [self._renamed(s) for s in ep.graph_signature.input_specs]
        self.state_dict = dict(ep.state_dict)
        self.constants = dict(ep.constants)
        self.spec_of: dict[str, InputSpec] = {s.arg.name: s for s in self.specs if isinstance(s.arg, TensorArgument)}
        self.nodes = {n.name: n for n in self.graph.nodes}

    def _renamed(self, spec: Any) -> Any:
        arg = spec.arg
        name = getattr(arg, "name", None)
        if name is not None and self.rename.get(name, name) != name:
            spec = copy.copy(spec)
            spec.arg = type(arg)(name=self.rename[name])
        return spec

    def spec(self, node: Any) -> InputSpec | None:
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
            return None
        s = self.spec_of.get(node.name)
        if s is None or s.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            return None
        return s

    def tensor(self, node: torch.fx.Node) -> torch.Tensor:
        s = self.spec(node)
        assert s is not None and s.target is not None
        if s.kind == InputKind.PARAMETER or (s.kind == InputKind.BUFFER and s.persistent is not False):
            return self.state_dict[s.target]
        return self.constants[s.target]

    def set_tensor(self, node: torch.fx.Node, value: torch.Tensor) -> None:
        s = self.spec(node)
        assert s is not None and s.target is not None
        old = self.tensor(node)
        if s.kind == InputKind.PARAMETER:
            new: torch.Tensor = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
        else:
            new = value.detach().clone()
        if s.kind == InputKind.PARAMETER or (s.kind == InputKind.BUFFER and s.persistent is not False):
            self.state_dict[s.target] = new
        else:
            self.constants[s.target] = new

    def _fake(self, value: torch.Tensor) -> Any:
        from torch._guards import detect_fake_mode

        mode = detect_fake_mode([n.meta.get("val") for n in self.graph.nodes if n.meta.get("val") is not None])
        if mode is None:
            return value
        return mode.from_tensor(value, static_shapes=True)

    def add_parameter(self, target: str, value: torch.Tensor, requires_grad: bool) -> torch.fx.Node:
        """A new PARAMETER input holding ``value`` (placed after the last parameter, as the signature orders them)."""
        taken = set(self.state_dict) | set(self.constants)
        base, i = target, 1
        while target in taken:
            target, i = f"{base}_folded{'' if i == 1 else i}", i + 1
        name = "p_" + target.replace(".", "_")
        existing = {n.name for n in self.graph.nodes}
        j = 1
        while name in existing:
            name = f"{name}_{j}"
            j += 1
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        idx = max((k for k, s in enumerate(self.specs) if s.kind == InputKind.PARAMETER), default=-1)
        anchor = placeholders[idx] if idx >= 0 else None
        if anchor is not None:
            with self.graph.inserting_after(anchor):
                node = self.graph.placeholder(name)
        else:
            with self.graph.inserting_before(placeholders[0] if placeholders else None):
                node = self.graph.placeholder(name)
        node.meta["val"] = self._fake(value)
        spec = InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=node.name), target=target, persistent=None)
        self.specs.insert(idx + 1, spec)
        self.spec_of[node.name] = spec
        self.state_dict[target] = nn.Parameter(value.detach().clone(), requires_grad=requires_grad)
        return node

    def remove_if_unused(self, node: Any) -> None:
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder" or node.users:
            return
        s = self.spec(node)
        if s is None:
            return
        self.graph.erase_node(node)
        self.specs = [x for x in self.specs if not (isinstance(x.arg, TensorArgument) and x.arg.name == node.name)]
        self.spec_of.pop(node.name, None)
        still = any(x.target == s.target for x in self.specs)
        if not still:
            self.state_dict.pop(s.target, None)
            self.constants.pop(s.target, None)

    def finish(self) -> ExportedProgram:
        self.graph.lint()
        self.gm.recompile()
        # outputs may now be other nodes (a BatchNorm that was the last op is gone): name them as the graph does
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        values = out_node.args[0] if isinstance(out_node.args[0], (list, tuple)) else [out_node.args[0]]
        out_specs = []
        for spec, value in zip([self._renamed(s) for s in self.ep.graph_signature.output_specs], values):
            if isinstance(spec.arg, TensorArgument) and isinstance(value, torch.fx.Node) and spec.arg.name != value.name:
                spec = copy.copy(spec)
                spec.arg = TensorArgument(name=value.name)
            out_specs.append(spec)
        sig = type(self.ep.graph_signature)(input_specs=self.specs, output_specs=out_specs)
        return ExportedProgram(
            root=self.gm, graph=self.gm.graph, graph_signature=sig, state_dict=self.state_dict,
            range_constraints=copy.deepcopy(self.ep.range_constraints),
            module_call_graph=copy.deepcopy(self.ep.module_call_graph), example_inputs=self.ep.example_inputs,
            constants=self.constants, verifiers=self.ep.verifiers)


# ------------------------------------------------------------------------------------------------
# layers: conv / linear / addmm / mm


@dataclass
class _Layer:
    kind: str  # conv | conv_transpose | linear
    node: torch.fx.Node
    input_index: int
    weight: torch.fx.Node  # the parameter placeholder
    transposed: bool  # the stored tensor is the canonical weight transposed (mm with a plain (in, out) matrix)
    t_node: torch.fx.Node | None
    bias: torch.fx.Node | None
    groups: int
    zero_pad: bool
    path: str
    label: str


class AtenDialect:
    """Reads an ExportedProgram's ATen graph for :mod:`normfold.channel_flow`."""

    def __init__(self, prog: _Program) -> None:
        self.prog = prog

    def shape(self, node: torch.fx.Node) -> tuple[int, ...] | None:
        t = _first_tensor(node.meta.get("val"))
        if t is None:
            return None
        try:
            return tuple(_hint(s) for s in t.shape)
        except Exception:
            return None

    def describe(self, node: torch.fx.Node) -> str:
        if node.op == "placeholder":
            s = self.prog.spec(node)
            return f"the parameter {s.target}" if s is not None else "the model input"
        if node.op == "output":
            return "the model output"
        where = _stack_path(node)
        return f"{_packet(node)} ({node.name}{' in ' + where if where else ''})"

    def concrete(self, node: torch.fx.Node) -> Any:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return torch.empty(self.shape(node), dtype=torch.float64)
        if isinstance(val, (int, torch.SymInt)):
            return _hint(val)
        raise NotConcrete(f"a shape argument is computed by {self.describe(node)}")

    def value_users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [u for u in node.users if not (u.op == "call_function" and (
            _packet(u) in _META or (_packet(u) in _SHAPE_FROM_ARG1 and u.args and u.args[0] is not node)))]

    def value_input(self, node: torch.fx.Node) -> torch.fx.Node | None:
        if node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
            return node.args[0]
        return None

    # -- layers ---------------------------------------------------------------------------------------
    def _weight(self, arg: Any) -> tuple[torch.fx.Node, bool, torch.fx.Node | None] | None:
        """(parameter placeholder, stored transposed?, the transpose node) of a weight argument."""
        if self.prog.spec(arg) is not None:
            return arg, False, None
        if isinstance(arg, torch.fx.Node) and arg.op == "call_function" and self.prog.spec(arg.args[0]) is not None:
            p = _packet(arg)
            two_d = self.shape(arg.args[0]) is not None and len(self.shape(arg.args[0])) == 2
            if two_d and (p in ("t", "numpy_T") or (p == "permute" and list(arg.args[1]) == [1, 0])
                          or (p == "transpose" and sorted(int(a) % 2 for a in arg.args[1:3]) == [0, 1])):
                return arg.args[0], True, arg
        return None

    def layer(self, node: torch.fx.Node) -> _Layer | str | None:
        """``node`` as a Conv/Linear layer with parameter weights; a reason if it is one that cannot be edited."""
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return None
        p = _packet(node)
        if p in ("conv1d", "conv2d", "conv3d"):
            a = bind_args(node, _CONV_ARGS, {"bias": None, "padding": 0, "groups": 1})
            kind, groups, pad, xi = "conv", a["groups"], a["padding"], 0
        elif p == "convolution":
            a = bind_args(node, _CONVOLUTION_ARGS)
            kind = "conv_transpose" if a["transposed"] else "conv"
            groups, pad, xi = a["groups"], a["padding"], 0
        elif p in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
            a = bind_args(node, _CONVT_ARGS, {"bias": None, "groups": 1, "padding": 0})
            kind, groups, pad, xi = "conv_transpose", a["groups"], a["padding"], 0
        elif p == "linear":
            a = bind_args(node, ("input", "weight", "bias"), {"bias": None})
            kind, groups, pad, xi = "linear", 1, 0, 0
        elif p == "addmm":
            a = bind_args(node, ("bias", "input", "weight", "beta", "alpha"), {"beta": 1, "alpha": 1})
            if a["beta"] != 1 or a["alpha"] != 1:
                return f"{self.describe(node)} scales with beta/alpha"
            kind, groups, pad, xi = "linear", 1, 0, 1
        elif p == "mm":
            a = bind_args(node, ("input", "weight"))
            a["bias"] = None
            kind, groups, pad, xi = "linear", 1, 0, 0
        else:
            return None
        w = self._weight(a["weight"])
        if w is None:
            return f"the weight of {self.describe(node)} is computed in the program, not a parameter"
        wnode, has_t, t_node = w
        if p in ("addmm", "mm"):
            # (add)mm(x, M) computes x @ M with M = W.T for a Linear weight W (out, in): a parameter read
            # through t()/permute is W itself; a parameter read directly is stored transposed.
            transposed = not has_t
        elif has_t:
            return f"the weight of {self.describe(node)} is computed in the program, not a parameter"
        else:
            transposed = False
        target = self.prog.spec(wnode).target
        path = _path_of(target, ("weight",))
        label = f"{path} ({p})"
        readers = [u for u in wnode.users]
        if t_node is not None:
            if len(readers) != 1 or len(t_node.users) != 1:
                return f"the weight {target} is read by several ops (a layer called twice or a shared weight)"
        elif len(readers) != 1:
            return f"the weight {target} is read by {len(readers)} ops (a layer called twice or a shared weight)"
        bias = a.get("bias")
        if bias is not None:
            if self.prog.spec(bias) is None:
                return f"the bias of {label} is computed in the program, not a parameter"
            if len(bias.users) != 1:
                return f"the bias {self.prog.spec(bias).target} is read by several ops"
            bshape = self.shape(bias)
            if p == "addmm" and (bshape is None or len(bshape) != 1):
                return f"the bias of {label} is not a vector"
        zero_pad = False
        if kind == "conv":
            if isinstance(pad, str):
                wshape = self.shape(wnode)
                zero_pad = pad != "valid" and any(k > 1 for k in wshape[2:])
            else:
                zero_pad = any(_hint(x) != 0 for x in (pad if isinstance(pad, (list, tuple)) else [pad]))
        w_shape = self.shape(wnode)
        if kind != "linear" and (w_shape is None or len(w_shape) < 3):
            return f"{label}: unexpected weight shape {w_shape}"
        return _Layer(kind, node, xi, wnode, transposed, t_node, bias, int(groups), zero_pad, path, label)

    def canonical_weight(self, layer: _Layer) -> torch.Tensor:
        w = self.prog.tensor(layer.weight)
        return w.t() if layer.transposed else w

    def concat(self, node: torch.fx.Node) -> tuple[list[torch.fx.Node], int] | None:
        """(inputs, dim) of an ``aten.cat``, else None."""
        if node.op != "call_function" or _packet(node) not in ("cat", "concat", "concatenate"):
            return None
        a = bind_args(node, ("tensors", "dim"), {"dim": 0})
        tensors, dim = a.get("tensors"), a.get("dim")
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) for t in tensors):
            return None
        return list(tensors), int(dim)

    # -- channel_flow interface -------------------------------------------------------------------------
    def producer(self, node: torch.fx.Node) -> Producer | str | None:
        lay = self.layer(node)
        if lay is None or isinstance(lay, str):
            return lay if isinstance(lay, str) else None
        shape = self.shape(node)
        w = self.canonical_weight(lay)
        if lay.kind == "linear":
            return Producer("linear", lay.label, -1, w.shape[0], lay)
        k = w.dim() - 2
        axis = (len(shape) - k - 1) if shape is not None else 1
        out_c = w.shape[1] * lay.groups if lay.kind == "conv_transpose" else w.shape[0]
        return Producer(lay.kind, lay.label, axis, out_c, lay)

    def _consumer(self, node: torch.fx.Node, via: torch.fx.Node) -> Consumer | Rule | None:
        lay = self.layer(node)
        if lay is None:
            return None
        if isinstance(lay, str):
            return Rule("block", self.describe(node), reason=f"consumer {lay}")
        args = list(node.args)
        if len(args) <= lay.input_index or args[lay.input_index] is not via or \
                sum(1 for a in _flat_nodes((node.args, node.kwargs)) if a is via) != 1:
            return Rule("block", lay.label, reason=f"{lay.label} reads the BatchNorm output as a weight")
        w = self.canonical_weight(lay)
        in_shape = self.shape(via)
        if lay.kind == "linear":
            return Consumer("linear", lay.label, -1, w.shape[1], False, lay)
        k = w.dim() - 2
        axis = (len(in_shape) - k - 1) if in_shape is not None else 1
        in_c = w.shape[0] if lay.kind == "conv_transpose" else w.shape[1] * lay.groups
        return Consumer(lay.kind, lay.label, axis, in_c, lay.zero_pad, lay)

    def _move(self, node: torch.fx.Node, via: torch.fx.Node, label: str) -> Rule:
        for other in ([] if _packet(node) in _SHAPE_FROM_ARG1 else _flat_nodes((node.args, node.kwargs))):
            if other is not via and isinstance(other.meta.get("val"), torch.Tensor):
                return Rule("block", label, reason=f"{label} reads the BatchNorm output together with the tensor {other.name}")

        def apply(index: Any) -> Any:
            args = substitute(node.args, via, index, self.concrete)
            kwargs = substitute(node.kwargs, via, index, self.concrete)
            return node.target(*args, **kwargs)
        return Rule("move", label, apply=apply)

    def _pool(self, node: torch.fx.Node, via: torch.fx.Node, label: str, k: int | None, *, nonneg: bool = False,
              keeps_shift: bool = True, shift_why: str = "", axes: tuple[int, ...] | None = None,
              keepdim: bool = True, wrap: int = 0) -> Rule:
        in_shape = self.shape(via)
        if axes is None:
            if in_shape is None:
                return Rule("block", label, reason=f"the shape reaching {label} is unknown")
            nd = len(in_shape)
            kk = k if k is not None else nd - 2
            axes = tuple(range(nd - kk, nd))
        return Rule("pool", label, axes=axes, out_shape=self.shape(node), keepdim=keepdim, nonneg_scale=nonneg,
                    keeps_shift=keeps_shift, shift_why=shift_why, wrap_tuple=wrap)

    def classify(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        if node.op == "output":
            return Rule("output", "the model output", reason="its output is returned by the program")
        if node.op != "call_function":
            return Rule("block", self.describe(node), reason=f"{self.describe(node)} reads it")
        label = self.describe(node)
        if node.target is operator.getitem:
            src = node.args[0]
            idx = node.args[1]
            if src.op == "call_function" and _packet(src) in _MAX_POOL_TUPLE and idx != 0:
                return Rule("block", label, reason=f"the indices of {self.describe(src)} are used")
            return Rule("move", label, apply=lambda i: i[idx])
        cons = self._consumer(node, via)
        if cons is not None:
            return cons
        p = _packet(node)
        if not node.args or node.args[0] is not via or \
                sum(1 for a in _flat_nodes((node.args, node.kwargs)) if a is via) != 1:
            if p in _COMBINE:
                return Rule("block", label, reason=f"{label} combines the BatchNorm output with other tensors")
            return Rule("block", label, reason=f"{label} reads it and does not carry a per-channel affine")
        if p in _MOVE:
            return self._move(node, via, label)
        if p == "dropout":
            a = bind_args(node, ("input", "p", "train"))
            if a.get("train"):
                return Rule("block", label, reason=f"{label} runs with train=True")
            return Rule("move", label, apply=lambda i: i)
        if p in ("_to_copy", "to"):
            tin, tout = _first_tensor(via.meta.get("val")), _first_tensor(node.meta.get("val"))
            if tin is not None and tout is not None and tin.dtype == tout.dtype:
                return Rule("move", label, apply=lambda i: i)
            return Rule("block", label, reason=f"a dtype cast ({label}) reads it")
        if p in _MAX_POOL:
            return self._pool(node, via, f"max-pool {label}", _MAX_POOL[p], nonneg=True)
        if p in _MAX_POOL_TUPLE:
            return self._pool(node, via, f"max-pool {label}", _MAX_POOL_TUPLE[p], nonneg=True, wrap=2)
        if p in _AVG_POOL:
            a = bind_args(node, ("self", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override"), {"padding": 0, "count_include_pad": True})
            from normfold.passes.fold_batchnorm_forward import _avg_pool_keeps_shift

            keeps, why = _avg_pool_keeps_shift(a.get("padding"), a.get("count_include_pad"), a.get("divisor_override"))
            return self._pool(node, via, f"avg-pool {label}", _AVG_POOL[p], keeps_shift=keeps, shift_why=why)
        if p in _ADAPTIVE_AVG:
            return self._pool(node, via, f"avg-pool {label}", _ADAPTIVE_AVG[p])
        if p in ("mean", "amax", "amin"):
            a = bind_args(node, ("self", "dim", "keepdim"), {"dim": None, "keepdim": False})
            if a.get("dtype") is not None:
                return Rule("block", label, reason=f"{label} casts the dtype")
            dim = a.get("dim")
            if not dim and dim != 0:
                return Rule("block", label, reason=f"{label} reduces every axis, the channels too")
            dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
            return self._pool(node, via, f"{p} {label}", None, nonneg=p != "mean", axes=dims,
                              keepdim=bool(a.get("keepdim")))
        if p in _INTERP:
            return self._pool(node, via, label, None)
        if p in _COPY_PADS:
            return self._pool(node, via, label, len(node.args[1]) // 2)
        if p in ("constant_pad_nd", "pad"):
            a = bind_args(node, ("self", "pad", "mode", "value") if p == "pad" else ("self", "pad", "value"),
                          {"mode": "constant", "value": 0})
            pad = [_hint(x) if not isinstance(x, torch.fx.Node) else self.concrete(x) for x in a["pad"]]
            if (a.get("mode") or "constant") != "constant":
                return self._pool(node, via, label, len(pad) // 2)
            if a.get("value") not in (None, 0, 0.0):
                return Rule("block", label, reason=f"{label} pads with {a.get('value')}")
            if not any(pad):
                return Rule("move", label, apply=lambda i: i)
            return self._pool(node, via, label, len(pad) // 2, keeps_shift=False, shift_why="pads with zeros")
        if p in _ACTIVATIONS:
            return Rule("block", label, reason=f"an activation ({label}) reads it")
        if p in _EVAL_BN or p in _BN_WITH_FLAG:
            return Rule("block", label, reason=f"another batch_norm ({label}) reads it")
        return Rule("block", label, reason=f"{label} reads it and does not carry a per-channel affine")


def _flat_nodes(value: Any) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(value, lambda n: out.append(n))
    return out


# ------------------------------------------------------------------------------------------------
# BatchNorm nodes


@dataclass
class _BN:
    node: torch.fx.Node
    value: torch.fx.Node  # the node holding the normalized tensor (getitem 0 for tuple variants)
    input: torch.fx.Node
    params: list[Any]  # weight, bias, running_mean, running_var (placeholders or None)
    eps: float
    path: str
    extra_users: list[torch.fx.Node] = field(default_factory=list)


def _bn_args(node: torch.fx.Node) -> dict[str, Any] | None:
    p = _packet(node)
    names = {
        "batch_norm": ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
        "_native_batch_norm_legit": ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
        "native_batch_norm": ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
        "_native_batch_norm_legit_no_training": ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
        "_batch_norm_no_update": ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
        "cudnn_batch_norm": ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
        "miopen_batch_norm": ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
        "_batch_norm_with_update": ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
    }.get(p)
    if names is None:
        return None
    if p == "_native_batch_norm_legit" and node.target == aten._native_batch_norm_legit.no_stats:
        names = ("input", "weight", "bias", "training", "momentum", "eps")
    a = bind_args(node, names, {"training": p in ("_batch_norm_with_update",)})
    if p in _EVAL_BN:
        a["training"] = False
    return a


def _is_bn(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and _bn_args(node) is not None


# ------------------------------------------------------------------------------------------------
# the pass


@dataclass
class ExportedPassResult(PassResult):
    """A PassResult whose rewrite is an ExportedProgram: ``program`` (``module`` is ``program.module()``)."""

    program: Any = None


class FoldExportedProgram(Pass):
    """Fold every foldable BatchNorm of an ExportedProgram; see the module docstring."""

    name = "fold_batchnorm"

    def __init__(self, *, forward: bool = True, weight_standardization: bool = True,
                 only: set[str] | None = None) -> None:
        self.forward = forward
        self.weight_standardization = weight_standardization
        #: fold only the BatchNorms at these module paths (the nn.Module pass uses this for models torch.fx
        #: cannot trace); the others are left as they are, without a record
        self.only = only

    def __call__(self, program: Any, *, inplace: bool = False) -> ExportedPassResult:  # type: ignore[override]
        if not isinstance(program, ExportedProgram):
            raise NormfoldError(f"{self.name}: expected a torch.export.ExportedProgram, got {type(program).__name__}")
        if inplace:
            return self.call(program)
        ep = copy.deepcopy(program)
        rename = {a.name: b.name for a, b in zip(program.graph.nodes, ep.graph.nodes) if a.name != b.name}
        return self._run(_Program(ep, rename))

    def call(self, module: Any) -> ExportedPassResult:
        return self._run(_Program(module))

    def _run(self, prog: _Program) -> ExportedPassResult:
        d = AtenDialect(prog)
        result = ExportedPassResult(module=None)  # type: ignore[arg-type]
        if self.weight_standardization:
            self._bake_constant_batchnorms(prog, result)
        for node in list(prog.graph.nodes):
            if getattr(node, "_erased", False):
                continue
            if _is_bn(node):
                self._one(prog, d, node, result)
        new_ep = prog.finish()
        result.program = new_ep
        result.module = new_ep.module()
        result.metrics["graph_source"] = "export"
        return result

    # -- one BatchNorm -------------------------------------------------------------------------------
    def _parse(self, prog: _Program, node: torch.fx.Node) -> _BN | str:
        a = _bn_args(node)
        if a.get("training"):
            return "in training mode (the program was exported with model.train(); export it in eval)"
        params = [a.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
        if params[2] is None or params[3] is None:
            return "without running statistics: it normalizes with batch statistics even in eval"
        for p, what in zip(params, ("weight", "bias", "running_mean", "running_var")):
            if p is None:
                continue
            if prog.spec(p) is None:
                return f"its {what} is computed in the program, not a parameter or buffer"
            if len(p.users) != 1:
                return (f"its {what} ({prog.spec(p).target}) is read by {len(p.users)} ops: the BatchNorm is called "
                        f"{len(p.users)} times, folding would change every call")
        target = prog.spec(params[2]).target
        path = _path_of(target, ("running_mean",))
        if not target.endswith("running_mean"):
            path = _stack_path(node) or node.name
        if isinstance(node.meta.get("val"), torch.Tensor):
            value, extra = node, []
        else:
            gets = [u for u in node.users if u.target is operator.getitem]
            others = [u for u in node.users if u.target is not operator.getitem]
            value_nodes = [u for u in gets if u.args[1] == 0]
            extra = [u for u in gets if u.args[1] != 0 and u.users]
            if others or extra or len(value_nodes) != 1:
                return "its saved mean/invstd outputs are used"
            value = value_nodes[0]
        inp = a["input"]
        if not isinstance(inp, torch.fx.Node):
            return "its input could not be traced"
        return _BN(node, value, inp, params, float(a.get("eps", 1e-5)), path)

    def _affine(self, prog: _Program, bn: _BN) -> BatchNormAffine:
        mean = prog.tensor(bn.params[2]).detach().double()
        var = prog.tensor(bn.params[3]).detach().double()
        w = prog.tensor(bn.params[0]).detach().double() if bn.params[0] is not None else torch.ones_like(mean)
        b = prog.tensor(bn.params[1]).detach().double() if bn.params[1] is not None else torch.zeros_like(mean)
        scale = w / torch.sqrt(var + bn.eps)
        return BatchNormAffine(scale=scale, shift=b - mean * scale, mean=mean, var=var, weight=w, bias=b, eps=bn.eps)

    def _one(self, prog: _Program, d: AtenDialect, node: torch.fx.Node, result: ExportedPassResult) -> None:
        parsed = self._parse(prog, node)
        where = _stack_path(node) or node.name
        if isinstance(parsed, str) and self.only is not None and where not in self.only:
            return
        if isinstance(parsed, str):
            result.skipped.append(Skip(self.name, (where,), parsed))
            return
        bn = parsed
        if self.only is not None and bn.path not in self.only:
            return
        affine = self._affine(prog, bn)
        back = walk_backward(d, bn.node, bn.input, affine.num_features)
        if not isinstance(back, str):
            why = check_constraints(back.constraints, affine, prog.tensor(bn.params[2]).dtype)
            if why is None:
                refused = self._fold_backward(prog, d, back, affine)
                if refused is None:
                    self._remove(prog, bn)
                    lays: list[_Layer] = [part.producer.ref for part in back.parts]
                    through = f" through {', '.join(back.ops)}" if back.ops else ""
                    result.changes.append(Change(self.name, "fold", (bn.path, *(x.path for x in lays)),
                                                 f"folded {bn.path} (batch_norm) into "
                                                 f"{', '.join(x.label for x in lays)}{through}",
                                                 {"channels": affine.num_features, "through": list(back.ops)}))
                    return
                why = refused
            back = why
        if not self.forward:
            result.skipped.append(Skip(self.name, (bn.path,), back))
            return
        fwd = self._try_forward(prog, d, bn, affine)
        if isinstance(fwd, str):
            result.skipped.append(Skip(self.name, (bn.path,), f"{back}; forward: {fwd}"))
            return
        self._remove(prog, bn)
        hits, ops = fwd
        names = ", ".join(h.consumer.label for h in hits)
        through = f" through {', '.join(ops)}" if ops else ""
        result.changes.append(Change(self.name, "fold_forward", (bn.path, *(h.consumer.ref.path for h in hits)),
                                     f"folded {bn.path} (batch_norm) forward into {names}{through}",
                                     {"channels": affine.num_features, "through": list(ops)}))

    def _fold_backward(self, prog: _Program, d: AtenDialect, plan: Any, affine: BatchNormAffine) -> str | None:
        jobs = []
        for part in plan.parts:
            lay: _Layer = part.producer.ref
            n_out = part.producer.out_channels
            scale = torch.ones(n_out, dtype=torch.float64)
            shift = torch.zeros(n_out, dtype=torch.float64)
            scale[part.features] = affine.scale.cpu()[part.channels]
            shift[part.features] = affine.shift.cpu()[part.channels]
            jobs.append((lay, lambda w, b, lay=lay, scale=scale, shift=shift:
                         backward_fold_tensors(lay.kind, w, b, lay.groups, scale, shift)))
        return self._fold_all(prog, d, jobs)

    def _try_forward(self, prog: _Program, d: AtenDialect, bn: _BN, affine: BatchNormAffine) -> tuple | str:
        shape = d.shape(bn.value)
        if shape is None or len(shape) < 2:
            return "the BatchNorm output is not a batched tensor of known shape"
        plan = walk_forward(d, bn.value, channel_index(shape, 1))
        if isinstance(plan, str):
            return plan
        constraints = list(plan.constraints)
        for h in plan.hits:
            if h.consumer.kind == "conv_transpose":
                constraints.append(Constraint("zero_shift", torch.unique(h.channel_of_input), h.consumer.label,
                                              "spreads a constant unevenly over its output (transposed conv)",
                                              consumer=True))
        why = check_constraints(constraints, affine, prog.tensor(bn.params[2]).dtype)
        if why is not None:
            return why
        jobs = []
        for h in plan.hits:
            lay: _Layer = h.consumer.ref
            s_in = affine.scale.cpu()[h.channel_of_input]
            t_in = affine.shift.cpu()[h.channel_of_input]
            jobs.append((lay, lambda w, b, lay=lay, s_in=s_in, t_in=t_in:
                         forward_fold_tensors(lay.kind, w, b, lay.groups, s_in, t_in)))
        why = self._fold_all(prog, d, jobs)
        return why if why is not None else (plan.hits, plan.ops)

    def _fold_all(self, prog: _Program, d: AtenDialect, jobs: list) -> str | None:
        """Compute every layer's folded (weight, bias), refuse all if any does not fit its dtype, else write all."""
        edits = []
        for lay, fold in jobs:
            w = d.canonical_weight(lay)
            b = prog.tensor(lay.bias) if lay.bias is not None else None
            new_w, new_b = fold(w.detach(), b.detach() if b is not None else None)
            bad = self._check_cast(w, new_w, new_b)
            if bad is not None:
                return f"{bad} ({lay.label})"
            edits.append((lay, w, new_w, new_b))
        for lay, w, new_w, new_b in edits:
            self._write(prog, lay, w, new_w, new_b)
        return None

    @staticmethod
    def _check_cast(w: torch.Tensor, new_w: torch.Tensor, new_b: torch.Tensor | None) -> str | None:
        cw = new_w.to(w.dtype)
        cb = new_b.to(w.dtype) if new_b is not None else None
        if torch.isfinite(cw).all() and (cb is None or torch.isfinite(cb).all()):
            return None
        if torch.isfinite(new_w).all() and (new_b is None or torch.isfinite(new_b).all()):
            return f"the folded weights overflow {str(w.dtype).replace('torch.', '')}"
        return "the folded weights are not finite (running_var + eps <= 0 or inf/NaN statistics)"

    def _write(self, prog: _Program, lay: _Layer, w: torch.Tensor, new_w: torch.Tensor,
               new_b: torch.Tensor | None) -> str | None:
        bad = self._check_cast(w, new_w, new_b)
        if bad is not None:
            return bad
        cw = new_w.to(w.dtype)
        prog.set_tensor(lay.weight, cw.t().contiguous() if lay.transposed else cw)
        if new_b is None:
            return None
        cb = new_b.to(w.dtype)
        if lay.bias is not None:
            prog.set_tensor(lay.bias, cb)
            return None
        req = prog.tensor(lay.weight).requires_grad
        bnode = prog.add_parameter(f"{lay.path}.bias" if lay.path else "bias", cb, req)
        node = lay.node
        p = _packet(node)
        if p == "mm":
            with prog.graph.inserting_after(node):
                new = prog.graph.call_function(aten.addmm.default, (bnode, node.args[0], node.args[1]))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            prog.graph.erase_node(node)
            lay.node = new
        elif p == "convolution" or p in ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                                         "conv_transpose3d", "linear"):
            args = list(node.args)
            if "bias" in node.kwargs:
                kwargs = dict(node.kwargs)
                kwargs["bias"] = bnode
                node.kwargs = kwargs
            else:
                while len(args) < 3:
                    args.append(None)
                args[2] = bnode
                node.args = tuple(args)
        lay.bias = bnode
        return None

    def _remove(self, prog: _Program, bn: _BN) -> None:
        # the input node may have been replaced since parsing (mm -> addmm when a bias was added)
        bn.value.replace_all_uses_with(bn.node.args[0])
        for u in list(bn.node.users):
            if not u.users:
                prog.graph.erase_node(u)
        if not bn.node.users:
            prog.graph.erase_node(bn.node)
        for p in bn.params:
            prog.remove_if_unused(p)
        # the BatchNorm's step counter is read by nothing once the BatchNorm is gone
        for n in list(prog.graph.nodes):
            s = prog.spec(n)
            if s is not None and s.target == f"{bn.path}.num_batches_tracked" and not n.users:
                prog.remove_if_unused(n)

    # -- weight standardization -----------------------------------------------------------------------
    def _bake_constant_batchnorms(self, prog: _Program, result: ExportedPassResult) -> None:
        """Evaluate batch_norms computed from parameters only (weight standardization) and store their result."""
        const: dict[torch.fx.Node, bool] = {}

        def is_const(n: torch.fx.Node) -> bool:
            if n in const:
                return const[n]
            if n.op == "placeholder":
                v = prog.spec(n) is not None
            elif n.op == "call_function" and (isinstance(n.target, torch._ops.OpOverload)
                                              or n.target is operator.getitem):
                ins = _flat_nodes((n.args, n.kwargs))
                v = bool(ins) and all(is_const(i) for i in ins)
                if v and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
                    v = False
            else:
                v = False
            const[n] = v
            return v

        for node in list(prog.graph.nodes):
            if not _is_bn(node) or not is_const(node):
                continue
            # frontier: follow the constant chain to the value a non-constant op reads
            frontier = node
            while True:
                users = list(frontier.users)
                if len(users) == 1 and is_const(users[0]):
                    frontier = users[0]
                    continue
                break
            if any(is_const(u) for u in frontier.users):
                continue
            ancestors = self._ancestors(frontier)
            weights = [a for a in ancestors if a.op == "placeholder"]
            fshape = AtenDialect(prog).shape(frontier)
            target_w = [w for w in weights if AtenDialect(prog).shape(w) == fshape
                        and all(u in ancestors for u in w.users)]
            consumer_layers = [u for u in frontier.users]
            if len(target_w) != 1 or not consumer_layers:
                continue
            wnode = target_w[0]
            value = self._evaluate(prog, frontier, ancestors)
            old = prog.tensor(wnode)
            cast = value.to(old.dtype)
            if not torch.isfinite(cast).all():
                continue
            prog.set_tensor(wnode, cast)
            frontier.replace_all_uses_with(wnode)
            for n in reversed([a for a in prog.graph.nodes if a in ancestors and a.op != "placeholder"]):
                if not n.users:
                    prog.graph.erase_node(n)
            for w in weights:
                prog.remove_if_unused(w)
            path = _path_of(prog.spec(wnode).target, ("weight",))
            result.changes.append(Change("fold_weight_standardization", "bake", (path,),
                                         f"baked the weight standardization of {path} (a batch_norm over its "
                                         f"weight) into its weight", {"out_channels": int(fshape[0]) if fshape else 0}))

    @staticmethod
    def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
        seen: set[torch.fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(_flat_nodes((n.args, n.kwargs)))
        return seen

    @staticmethod
    def _evaluate(prog: _Program, frontier: torch.fx.Node, ancestors: set[torch.fx.Node]) -> torch.Tensor:
        env: dict[torch.fx.Node, Any] = {}
        for n in prog.graph.nodes:
            if n not in ancestors:
                continue
            if n.op == "placeholder":
                env[n] = prog.tensor(n).detach().to(torch.float64)
                continue
            args = torch.fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
            if n is frontier:
                break
        return env[frontier]


def fold_exported_program(program: ExportedProgram, *, inplace: bool = False, forward: bool = True,
                          weight_standardization: bool = True) -> ExportedPassResult:
    """Fold the BatchNorms of an ExportedProgram (see the module docstring); returns the new program in ``.program``.

    :func:`normfold.fold_batchnorm` calls this when given an ExportedProgram.
    """
    return FoldExportedProgram(forward=forward, weight_standardization=weight_standardization)(program, inplace=inplace)


def program_inputs(program: ExportedProgram, *, seed: int = 0) -> tuple[torch.Tensor, ...] | None:
    """Seeded random positional inputs shaped like the program's example inputs (or its input placeholders)."""
    from normfold.inputs import random_inputs

    shapes, dtypes = [], []
    ex = getattr(program, "example_inputs", None)
    if ex is not None and ex[0] and all(isinstance(a, torch.Tensor) for a in ex[0]) and not ex[1]:
        for a in ex[0]:
            shapes.append(tuple(a.shape))
            dtypes.append(a.dtype)
    else:
        user = set(program.graph_signature.user_inputs)
        for n in program.graph.nodes:
            if n.op == "placeholder" and n.name in user:
                v = n.meta.get("val")
                if not isinstance(v, torch.Tensor):
                    return None
                shapes.append(tuple(_hint(s) for s in v.shape))
                dtypes.append(v.dtype)
    if not shapes:
        return None
    out = []
    for i, (s, dt) in enumerate(zip(shapes, dtypes)):
        if dt.is_floating_point:
            out.append(random_inputs([s], seed=seed + i, dtype=dt)[0])
        else:
            out.append(torch.zeros(s, dtype=dt))
    return tuple(out)
