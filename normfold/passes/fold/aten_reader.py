"""The ATen reader: what the nodes of a torch.export ExportedProgram are, for the fold analysis.

Layers are ``convolution`` / ``conv{1,2,3}d`` / ``conv_transpose{1,2,3}d`` /
``linear`` / ``addmm`` / ``mm`` ops whose weight is a parameter placeholder;
a BatchNorm is any eval ``batch_norm`` overload (:func:`batchnorm_args`).
Shapes come from the ``val`` metadata every exported node carries, and module
paths from the parameter names (``layer1.0.conv1.weight`` -> ``layer1.0.conv1``),
so the records match the nn.Module pass on the same model.

:class:`EditableProgram` holds the program under edit (graph, signature,
state_dict, constants) and writes tensors back by placeholder.
"""

from __future__ import annotations

import copy
import functools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

from normfold.graph import innermost_module_path
from normfold.passes.fold.flow import Consumer, NotConcrete, Producer, Rule
from normfold.passes.fold.reader import GraphReader, bind_args, flat_nodes
from normfold.passes.fold.refusal import Refusal
from normfold.passes.fold.rules import avg_pool_keeps_shift, is_activation_name

__all__ = ["EditableProgram", "ProgramReader", "ProgramLayer", "BatchNormNode", "batchnorm_args", "is_batchnorm_op",
           "op_name", "size_hint", "parameter_path"]

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
_COMBINE = {"add", "add_", "sub", "mul", "mul_", "div", "cat", "stack", "matmul", "bmm", "baddbmm", "where"}
_EVAL_BN = {"_native_batch_norm_legit_no_training", "_batch_norm_no_update"}
_BN_WITH_FLAG = {"batch_norm": 5, "_native_batch_norm_legit": 5, "native_batch_norm": 5,
                 "cudnn_batch_norm": 5, "miopen_batch_norm": 5, "_batch_norm_with_update": None}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


def op_name(node: torch.fx.Node) -> str:
    """The ATen op's overload packet name (``convolution``, ``batch_norm``...), or the callable's name."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def size_hint(v: Any) -> int:
    """A concrete int for a (possibly symbolic) size: the value it was traced with."""
    if isinstance(v, torch.SymInt):
        node = v.node
        if getattr(node, "hint", None) is not None:
            return int(node.hint)
        return int(node.shape_env.size_hint(node.expr))
    return int(v)


def _first_tensor(val: Any) -> Any:
    """The tensor of a node value (the first one of a tuple value), or None."""
    if isinstance(val, torch.Tensor):
        return val
    if isinstance(val, (list, tuple)) and val and isinstance(val[0], torch.Tensor):
        return val[0]
    return None


def parameter_path(target: str, suffixes: tuple[str, ...]) -> str:
    """The module path of a parameter / buffer name (``"a.b.weight"`` -> ``"a.b"``) for the given suffixes."""
    for suf in suffixes:
        if target.endswith("." + suf):
            return target[: -len(suf) - 1]
        if target == suf:
            return ""
    return target


# ------------------------------------------------------------------------------------------------
# the program being edited


class EditableProgram:
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
        """The signature entry of a parameter / buffer / constant placeholder, or None for anything else."""
        if not isinstance(node, torch.fx.Node) or node.op != "placeholder":
            return None
        s = self.spec_of.get(node.name)
        if s is None or s.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            return None
        return s

    def tensor(self, node: torch.fx.Node) -> torch.Tensor:
        """The tensor a parameter / buffer / constant placeholder stands for."""
        s = self.spec(node)
        assert s is not None and s.target is not None
        if s.kind == InputKind.PARAMETER or (s.kind == InputKind.BUFFER and s.persistent is not False):
            return self.state_dict[s.target]
        return self.constants[s.target]

    def set_tensor(self, node: torch.fx.Node, value: torch.Tensor) -> None:
        """Replace the tensor of placeholder ``node`` (a parameter stays a Parameter with its requires_grad)."""
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

    @functools.cached_property
    def _fake_mode(self) -> Any:
        """The graph's fake mode, searched once (every node's value comes from it; a search per new
        parameter made folding a program with hundreds of BatchNorms quadratic)."""
        from torch._guards import detect_fake_mode

        return detect_fake_mode([n.meta.get("val") for n in self.graph.nodes if n.meta.get("val") is not None])

    def _fake(self, value: torch.Tensor) -> Any:
        """``value`` as a fake tensor of the graph's fake mode, for a new placeholder's ``val`` metadata."""
        mode = self._fake_mode
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
        """Drop a parameter / buffer placeholder nobody reads any more, with its signature entry and state."""
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
        """The edited program: graph checked and recompiled, outputs renamed as the graph now names them."""
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
class ProgramLayer:
    """A Conv / ConvTranspose / Linear op of the program whose weight (and bias) are parameters."""

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


class ProgramReader(GraphReader):
    """Reads an ExportedProgram's ATen graph for :mod:`normfold.passes.fold.flow`."""

    def __init__(self, prog: EditableProgram) -> None:
        self.prog = prog

    def shape(self, node: torch.fx.Node) -> tuple[int, ...] | None:
        t = _first_tensor(node.meta.get("val"))
        if t is None:
            return None
        try:
            return tuple(size_hint(s) for s in t.shape)
        except Exception:
            return None

    def describe(self, node: torch.fx.Node) -> str:
        if node.op == "placeholder":
            s = self.prog.spec(node)
            return f"the parameter {s.target}" if s is not None else "the model input"
        if node.op == "output":
            return "the model output"
        where = innermost_module_path(node)
        return f"{op_name(node)} ({node.name}{' in ' + where if where else ''})"

    def concrete(self, node: torch.fx.Node) -> Any:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return torch.empty(self.shape(node), dtype=torch.float64)
        if isinstance(val, (int, torch.SymInt)):
            return size_hint(val)
        raise NotConcrete(f"a shape argument is computed by {self.describe(node)}")

    def value_users(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return [u for u in node.users if not (u.op == "call_function" and (
            op_name(u) in _META or (op_name(u) in _SHAPE_FROM_ARG1 and u.args and u.args[0] is not node)))]

    def value_input(self, node: torch.fx.Node) -> torch.fx.Node | None:
        if node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
            return node.args[0]
        return None

    def holds_tensor(self, node: torch.fx.Node) -> bool:
        return isinstance(node.meta.get("val"), torch.Tensor)

    def lends_shape_only(self, node: torch.fx.Node) -> bool:
        return op_name(node) in _SHAPE_FROM_ARG1

    def run(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        return node.target(*args, **kwargs)

    # -- layers ---------------------------------------------------------------------------------------
    def _weight(self, arg: Any) -> tuple[torch.fx.Node, bool, torch.fx.Node | None] | None:
        """(parameter placeholder, stored transposed?, the transpose node) of a weight argument."""
        if self.prog.spec(arg) is not None:
            return arg, False, None
        if isinstance(arg, torch.fx.Node) and arg.op == "call_function" and self.prog.spec(arg.args[0]) is not None:
            p = op_name(arg)
            two_d = self.shape(arg.args[0]) is not None and len(self.shape(arg.args[0])) == 2
            if two_d and (p in ("t", "numpy_T") or (p == "permute" and list(arg.args[1]) == [1, 0])
                          or (p == "transpose" and sorted(int(a) % 2 for a in arg.args[1:3]) == [0, 1])):
                return arg.args[0], True, arg
        return None

    def layer(self, node: torch.fx.Node) -> ProgramLayer | Refusal | None:
        """``node`` as a Conv/Linear layer with parameter weights; a Refusal if it is one that cannot be edited."""
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            return None
        p = op_name(node)
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
                return Refusal(f"{self.describe(node)} scales with beta/alpha", node)
            kind, groups, pad, xi = "linear", 1, 0, 1
        elif p == "mm":
            a = bind_args(node, ("input", "weight"))
            a["bias"] = None
            kind, groups, pad, xi = "linear", 1, 0, 0
        else:
            return None
        w = self._weight(a["weight"])
        if w is None:
            return Refusal(f"the weight of {self.describe(node)} is computed in the program, not a parameter", node)
        wnode, has_t, t_node = w
        if p in ("addmm", "mm"):
            # (add)mm(x, M) computes x @ M with M = W.T for a Linear weight W (out, in): a parameter read
            # through t()/permute is W itself; a parameter read directly is stored transposed.
            transposed = not has_t
        elif has_t:
            return Refusal(f"the weight of {self.describe(node)} is computed in the program, not a parameter", node)
        else:
            transposed = False
        target = self.prog.spec(wnode).target
        path = parameter_path(target, ("weight",))
        label = f"{path} ({p})"
        readers = [u for u in wnode.users]
        if t_node is not None:
            if len(readers) != 1 or len(t_node.users) != 1:
                return Refusal(f"the weight {target} is read by several ops (a layer called twice or a shared weight)", node)
        elif len(readers) != 1:
            return Refusal(f"the weight {target} is read by {len(readers)} ops (a layer called twice or a shared weight)", node)
        bias = a.get("bias")
        if bias is not None:
            if self.prog.spec(bias) is None:
                return Refusal(f"the bias of {label} is computed in the program, not a parameter", node)
            if len(bias.users) != 1:
                return Refusal(f"the bias {self.prog.spec(bias).target} is read by several ops", node)
            bshape = self.shape(bias)
            if p == "addmm" and (bshape is None or len(bshape) != 1):
                return Refusal(f"the bias of {label} is not a vector", node)
        zero_pad = False
        if kind == "conv":
            if isinstance(pad, str):
                wshape = self.shape(wnode)
                zero_pad = pad != "valid" and any(k > 1 for k in wshape[2:])
            else:
                zero_pad = any(size_hint(x) != 0 for x in (pad if isinstance(pad, (list, tuple)) else [pad]))
        w_shape = self.shape(wnode)
        if kind != "linear" and (w_shape is None or len(w_shape) < 3):
            return Refusal(f"{label}: unexpected weight shape {w_shape}", node)
        return ProgramLayer(kind, node, xi, wnode, transposed, t_node, bias, int(groups), zero_pad, path, label)

    def canonical_weight(self, layer: ProgramLayer) -> torch.Tensor:
        """The weight as Conv/Linear store it (``(out, in)`` for a Linear even where the program keeps it transposed)."""
        w = self.prog.tensor(layer.weight)
        return w.t() if layer.transposed else w

    def concat(self, node: torch.fx.Node) -> tuple[list[torch.fx.Node], int] | None:
        """(inputs, dim) of an ``aten.cat``, else None."""
        if node.op != "call_function" or op_name(node) not in ("cat", "concat", "concatenate"):
            return None
        a = bind_args(node, ("tensors", "dim"), {"dim": 0})
        tensors, dim = a.get("tensors"), a.get("dim")
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, torch.fx.Node) for t in tensors):
            return None
        return list(tensors), int(dim)

    # -- the flow interface -----------------------------------------------------------------------------
    def producer(self, node: torch.fx.Node) -> Producer | Refusal | None:
        lay = self.layer(node)
        if lay is None or isinstance(lay, Refusal):
            return lay
        w = self.canonical_weight(lay)
        if lay.kind == "linear":
            return Producer("linear", lay.label, -1, w.shape[0], lay)
        out_c = w.shape[1] * lay.groups if lay.kind == "conv_transpose" else w.shape[0]
        return Producer(lay.kind, lay.label, -(w.dim() - 1), out_c, lay)

    def _consumer(self, node: torch.fx.Node, via: torch.fx.Node) -> Consumer | Rule | None:
        lay = self.layer(node)
        if lay is None:
            return None
        if isinstance(lay, Refusal):
            return self.block(self.describe(node), f"consumer {lay.reason}")
        args = list(node.args)
        if len(args) <= lay.input_index or args[lay.input_index] is not via or \
                sum(1 for a in flat_nodes((node.args, node.kwargs)) if a is via) != 1:
            return self.block(lay.label, f"{lay.label} reads the BatchNorm output as a weight")
        w = self.canonical_weight(lay)
        if lay.kind == "linear":
            return Consumer("linear", lay.label, -1, w.shape[1], False, lay)
        in_c = w.shape[0] if lay.kind == "conv_transpose" else w.shape[1] * lay.groups
        return Consumer(lay.kind, lay.label, -(w.dim() - 1), in_c, lay.zero_pad, lay)

    def classify(self, node: torch.fx.Node, via: torch.fx.Node) -> Rule | Consumer:
        if node.op == "output":
            return Rule("output", "the model output", reason="its output is returned by the program")
        if node.op != "call_function":
            return Rule("block", self.describe(node), reason=f"{self.describe(node)} reads it")
        label = self.describe(node)
        if node.target is operator.getitem:
            src = node.args[0]
            idx = node.args[1]
            if src.op == "call_function" and op_name(src) in _MAX_POOL_TUPLE and idx != 0:
                return Rule("block", label, reason=f"the indices of {self.describe(src)} are used")
            return Rule("move", label, apply=lambda i: i[idx])
        cons = self._consumer(node, via)
        if cons is not None:
            return cons
        p = op_name(node)
        if not node.args or node.args[0] is not via or \
                sum(1 for a in flat_nodes((node.args, node.kwargs)) if a is via) != 1:
            if p in _COMBINE:
                return Rule("block", label, reason=f"{label} combines the BatchNorm output with other tensors")
            return Rule("block", label, reason=f"{label} reads it and does not carry a per-channel affine")
        if p in _MOVE:
            return self.move(node, via, label)
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
            return self.pool(node, via, f"max-pool {label}", _MAX_POOL[p], nonneg=True)
        if p in _MAX_POOL_TUPLE:
            return self.pool(node, via, f"max-pool {label}", _MAX_POOL_TUPLE[p], nonneg=True, wrap=2)
        if p in _AVG_POOL:
            a = bind_args(node, ("self", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                 "divisor_override"), {"padding": 0, "count_include_pad": True})
            keeps, why = avg_pool_keeps_shift(a.get("padding"), a.get("count_include_pad"), a.get("divisor_override"))
            return self.pool(node, via, f"avg-pool {label}", _AVG_POOL[p], keeps_shift=keeps, shift_why=why)
        if p in _ADAPTIVE_AVG:
            return self.pool(node, via, f"avg-pool {label}", _ADAPTIVE_AVG[p])
        if p in ("mean", "amax", "amin"):
            a = bind_args(node, ("self", "dim", "keepdim"), {"dim": None, "keepdim": False})
            if a.get("dtype") is not None:
                return Rule("block", label, reason=f"{label} casts the dtype")
            dim = a.get("dim")
            if not dim and dim != 0:
                return Rule("block", label, reason=f"{label} reduces every axis, the channels too")
            dims = tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)
            return self.pool(node, via, f"{p} {label}", None, nonneg=p != "mean", axes=dims,
                              keepdim=bool(a.get("keepdim")))
        if p in _INTERP:
            return self.pool(node, via, label, None)
        if p in _COPY_PADS:
            return self.pool(node, via, label, len(node.args[1]) // 2)
        if p in ("constant_pad_nd", "pad"):
            a = bind_args(node, ("self", "pad", "mode", "value") if p == "pad" else ("self", "pad", "value"),
                          {"mode": "constant", "value": 0})
            pad = [size_hint(x) if not isinstance(x, torch.fx.Node) else self.concrete(x) for x in a["pad"]]
            if (a.get("mode") or "constant") != "constant":
                return self.pool(node, via, label, len(pad) // 2)
            if a.get("value") not in (None, 0, 0.0):
                return Rule("block", label, reason=f"{label} pads with {a.get('value')}")
            if not any(pad):
                return Rule("move", label, apply=lambda i: i)
            return self.pool(node, via, label, len(pad) // 2, keeps_shift=False, shift_why="pads with zeros")
        if is_activation_name(p):
            return self.block(label, f"an activation ({label}) reads it", activation=p.strip("_"))
        if p in _EVAL_BN or p in _BN_WITH_FLAG:
            return Rule("block", label, reason=f"another batch_norm ({label}) reads it")
        return Rule("block", label, reason=f"{label} reads it and does not carry a per-channel affine")


# ------------------------------------------------------------------------------------------------
# BatchNorm nodes


@dataclass
class BatchNormNode:
    """An eval batch_norm op of the program: the op, the node holding its value, its input, parameters, eps, module path."""

    node: torch.fx.Node
    value: torch.fx.Node  # the node holding the normalized tensor (getitem 0 for tuple variants)
    input: torch.fx.Node
    params: list[Any]  # weight, bias, running_mean, running_var (placeholders or None)
    eps: float
    path: str
    extra_users: list[torch.fx.Node] = field(default_factory=list)


def batchnorm_args(node: torch.fx.Node) -> dict[str, Any] | None:
    """A batch_norm op's arguments by name (``training`` False for the eval-only overloads), or None when ``node`` is no batch_norm."""
    p = op_name(node)
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


def is_batchnorm_op(node: torch.fx.Node) -> bool:
    """True for any batch_norm overload (eval or not; :meth:`FoldBatchNormProgram._parse` refuses the training ones)."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and batchnorm_args(node) is not None


