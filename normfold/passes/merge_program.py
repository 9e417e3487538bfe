"""Branch merging on an ExportedProgram (``.pt2``): the same regions, the same algebra, read from ATen ops.

:mod:`normfold.passes.merge_branches` states the math: every tensor of a region is a
term ``conv(x; W, b)`` in float64, built by the rules ``_add`` / ``_scale`` /
``_compose`` of that module and decided by :func:`~normfold.passes.merge_branches.mergeable`.
This module is only the ATen reader and writer, as the fold engine has one reader per IR:

* ``aten.conv1d/2d/3d`` and ``aten.convolution`` (not transposed) with a constant weight
  (parameter, buffer, lifted constant, or an op computed from those only) are conv terms;
* ``aten.batch_norm`` and the other eval batch_norm forms (``_native_batch_norm_legit_no_training``
  with its ``getitem 0``, :func:`~normfold.passes.fold.aten_reader.batchnorm_args`) are diagonal terms;
  one in training mode is a barrier with that reason;
* ``aten.avg_pool1d/2d/3d`` (zero padding counted, no ceil mode) is a uniform kernel;
* ``aten.linear`` with a constant weight is a Linear term (last axis; written as one ``aten.linear``);
* ``aten.add/sub`` (``alpha`` included) of two terms of one tensor, or of a term and a constant,
  ``aten.mul/div`` by a constant per-channel operand (layer scale ``gamma.view(1, -1, 1, 1)``,
  evaluated once), ``aten.neg``; the in-place forms ``add_`` / ``sub_`` / ``mul_`` / ``div_`` where
  the tensor they write is read by nothing else;
* eval ``dropout``, ``clone``, ``alias``, ``detach``, ``contiguous`` and same-dtype casts pass through.

Channel counts, ranks, dtypes come from each node's ``val`` metadata, so no example input is needed.
A region is written as one new ``aten.conv*d`` node (``aten.convolution`` in a program that uses
only that form) reading a new parameter ``<block>.merged_conv.weight`` / ``.bias`` (float64 math,
stored in the original dtype); the region's nodes, and the parameters, buffers and constants only
they read, leave the graph, its signature and its state_dict. The block is the innermost module
whose ``forward`` holds the region (from ``nn_module_stack``), so on the same model the records
name the blocks and modules the nn.Module pass names. A symbolic batch dimension stays symbolic:
the new conv's metadata is the value of the node it replaces.
"""

from __future__ import annotations

import operator
from dataclasses import replace
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

from normfold.graph import innermost_module_path
from normfold.norms import affine_from_statistics
from normfold.passes.base import Change, Skip
from normfold.passes.fold.aten_reader import EditableProgram, batchnorm_args, op_name, parameter_path, size_hint
from normfold.passes.fold.program_pass import ExportedPassResult, ProgramPass
from normfold.passes.fold.reader import bind_args, flat_nodes
from normfold.passes.merge_algebra import (PASS_NAME, _Analysis, _Barrier, _Const, _Term, _common_scope, _regroup,
                                           batchnorm_term, conv_term, linear_term, mergeable, pool_term,
                                           region_tops, worth_merging)

__all__ = ["MergeBranchesProgram", "merge_program"]

aten = torch.ops.aten

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                     "groups")
_AVG_POOL = {"avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3}
_AVG_POOL_ARGS = ("self", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
#: ops whose output is their input in eval (``dropout`` is checked for ``train`` separately)
_PASS_THROUGH = {"clone", "alias", "detach", "contiguous", "lift_fresh_copy", "dropout", "feature_dropout",
                 "alpha_dropout", "feature_alpha_dropout", "_to_copy", "to"}
_ADD = {"add": 1.0, "add_": 1.0, "sub": -1.0, "sub_": -1.0}
_MUL = {"mul": False, "mul_": False, "div": True, "div_": True}
_CONV_OPS = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}


def _is_leaf_module_type(type_name: str) -> bool:
    """A torch.nn layer (Conv2d, BatchNorm2d, AvgPool2d...): its ops belong to the block that calls it."""
    return type_name.startswith("torch.nn.modules.") and ".container." not in type_name


def _program_scope(node: torch.fx.Node) -> str:
    """The module whose ``forward`` made ``node``: as the fx reader scopes a module call, an op inside a
    torch.nn layer belongs to the module that called the layer."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = innermost_module_path(node) or ""
    value = list(stack.values())[-1]
    type_name = str(value[1]) if isinstance(value, (tuple, list)) and len(value) > 1 else ""
    if _is_leaf_module_type(type_name):
        return path.rpartition(".")[0]
    return path


class _ProgramAnalysis(_Analysis):
    """The ATen reader: terms of every node of an ExportedProgram's graph."""

    def __init__(self, prog: EditableProgram) -> None:
        self.prog = prog
        super().__init__(prog.graph)

    def _where(self, node: torch.fx.Node) -> str:
        return _program_scope(node) or "<model>"

    def _param_path(self, node: Any, suffix: str) -> str | None:
        s = self.prog.spec(node)
        return parameter_path(s.target, (suffix,)) if s is not None and s.target else None

    def _layer_path(self, node: torch.fx.Node) -> str | None:
        if node.op == "call_function" and (op_name(node) in _AVG_POOL or batchnorm_args(node) is not None
                                           or op_name(node) in ("conv1d", "conv2d", "conv3d", "convolution",
                                                                "linear")):
            return innermost_module_path(node) or node.name
        return None

    def _weighted(self, node: torch.fx.Node) -> int:
        st = self.status.get(node)
        if isinstance(st, _Term):
            return st.convs
        if node.op == "call_function" and op_name(node) in ("conv1d", "conv2d", "conv3d", "convolution", "linear",
                                                           "addmm", "mm", "conv_transpose1d", "conv_transpose2d",
                                                           "conv_transpose3d"):
            return 1
        return 0

    def _apply(self, node: torch.fx.Node, op: _Term | None, source: torch.fx.Node) -> _Term:
        """As the shared rule, except that a layer outside the block of a merged sum starts its own term.

        The module pass merges one block at a time, so a 1x1 conv of the next block (or of the model's
        head) is never composed into a block's merged conv; the program pass keeps to the same blocks,
        so both name the same regions and leave the same convs.
        """
        st = self.status.get(source)
        if op is not None and isinstance(st, _Term) and st.merges and len(source.users) == 1:
            block = _common_scope(set(st.nodes) | {source}, _program_scope)
            scope = _program_scope(node)
            if block and scope != block and not scope.startswith(block + "."):
                return op
        return super()._apply(node, op, source)

    def _const_value(self, a: Any) -> Any:
        st = self.status.get(a) if isinstance(a, torch.fx.Node) else None
        return st.value if isinstance(st, _Const) else None

    def _visit(self, node: torch.fx.Node) -> _Term | _Barrier | _Const:
        if node.op == "placeholder":
            if self.prog.spec(node) is not None:
                return _Const(self.prog.tensor(node))
            return _Barrier("placeholder")
        if node.op != "call_function":
            return _Barrier(node.op)
        if node.target is operator.getitem:
            return self._getitem(node)
        if not isinstance(node.target, torch._ops.OpOverload):
            return _Barrier(f"{op_name(node)} is not one of the linear ops this pass merges", nonlinear=True)
        ins = flat_nodes((node.args, node.kwargs))
        if ins and all(isinstance(self.status.get(i), _Const) for i in ins) and not node.target._schema.is_mutable:
            const = self._evaluate(node)
            if const is not None:
                return const
        p = op_name(node)
        if p in ("conv1d", "conv2d", "conv3d", "convolution"):
            return self._conv(node, p)
        if p == "linear":
            return self._linear(node)
        bn = batchnorm_args(node)
        if bn is not None:
            return self._batchnorm(node, bn)
        if p in _AVG_POOL:
            a = bind_args(node, _AVG_POOL_ARGS, {"stride": None, "padding": 0, "ceil_mode": False,
                                                 "count_include_pad": True, "divisor_override": None})
            path = innermost_module_path(node) or node.name
            op = pool_term(a["kernel_size"], a["stride"], a["padding"], rank=_AVG_POOL[p], ceil_mode=a["ceil_mode"],
                           count_include_pad=a["count_include_pad"], divisor_override=a["divisor_override"],
                           node=node, root=a["self"], path=path)
            return op if isinstance(op, _Barrier) else self._apply(node, op, a["self"])
        if p in _PASS_THROUGH:
            return self._pass_through(node, p)
        args = node.args
        if p in _ADD and len(args) == 2:
            alpha = node.kwargs.get("alpha", 1)
            if set(node.kwargs) - {"alpha"} or not isinstance(alpha, (int, float)):
                return _Barrier(f"{node.name} takes arguments this pass does not read", nonlinear=True)
            if p.endswith("_") and not self._writes_own(node):
                return _Barrier(f"{node.name} modifies a tensor read elsewhere in place", nonlinear=True)
            return self._add(node, args[0], args[1], _ADD[p] * float(alpha))
        if p in _MUL and len(args) == 2 and not node.kwargs:
            if p.endswith("_") and not self._writes_own(node):
                return _Barrier(f"{node.name} modifies a tensor read elsewhere in place", nonlinear=True)
            return self._mul(node, args[0], args[1], div=_MUL[p])
        if p == "neg" and len(args) == 1 and isinstance(args[0], torch.fx.Node):
            return self._mul(node, args[0], -1.0, div=False)
        return _Barrier(f"{p} is not one of the linear ops this pass merges", nonlinear=True)

    def _writes_own(self, node: torch.fx.Node) -> bool:
        """An in-place op whose written tensor nobody else reads (``out += conv(x)``): it is its functional form."""
        dst = node.args[0]
        return isinstance(dst, torch.fx.Node) and len(dst.users) == 1 and dst.op == "call_function"

    def _evaluate(self, node: torch.fx.Node) -> _Const | None:
        """An op on constants only (``gamma.view(1, -1, 1, 1)``), computed once on the stored tensors."""
        try:
            args = torch.fx.node.map_arg(node.args, lambda a: self.status[a].value)
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda a: self.status[a].value)
            with torch.no_grad():
                return _Const(node.target(*args, **kwargs))
        except Exception:  # not computable here (a symbolic shape argument): not a constant
            return None

    def _getitem(self, node: torch.fx.Node) -> _Term | _Barrier:
        """``getitem(batch_norm, 0)`` of a tuple-valued BatchNorm: its term, the unused outputs with it."""
        src, idx = node.args
        st = self.status.get(src)
        if idx != 0 or not isinstance(st, _Term):
            return _Barrier("getitem")
        others = [u for u in src.users if u is not node]
        if any(u.target is not operator.getitem or u.users for u in others):
            return _Barrier(f"the saved statistics of {src.name} are used")
        return replace(st, nodes=st.nodes + others + [node])

    def _pass_through(self, node: torch.fx.Node, p: str) -> _Term | _Barrier:
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node):
            return _Barrier(f"{p} without a tensor input")
        if "dropout" in p:
            a = bind_args(node, ("input", "p", "train"), {"train": False})
            if a.get("train"):
                return _Barrier(f"{node.name} is a dropout in training mode", nonlinear=True)
        elif p in ("_to_copy", "to"):
            tin, tout = src.meta.get("val"), node.meta.get("val")
            if not (isinstance(tin, torch.Tensor) and isinstance(tout, torch.Tensor) and tin.dtype == tout.dtype
                    and tin.device == tout.device):
                return _Barrier(f"{node.name} casts the tensor", nonlinear=True)
        return self._apply(node, None, src)

    def _conv(self, node: torch.fx.Node, p: str) -> _Term | _Barrier:
        if p == "convolution":
            a = bind_args(node, _CONVOLUTION_ARGS)
            if a.get("transposed"):
                return _Barrier(f"{node.name} is a transposed conv, which this pass does not merge", nonlinear=True)
        else:
            a = bind_args(node, _CONV_ARGS, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        x, w_node, b_node = a["input"], a["weight"], a.get("bias")
        weight = self._const_value(w_node)
        bias = self._const_value(b_node) if b_node is not None else None
        path = self._param_path(w_node, "weight") or innermost_module_path(node) or node.name
        if not isinstance(x, torch.fx.Node) or not isinstance(weight, torch.Tensor) or \
                (b_node is not None and not isinstance(bias, torch.Tensor)):
            return _Barrier(f"{path}: its weight or bias is computed from the input", nonlinear=True)
        if not weight.is_floating_point():
            return _Barrier(f"{path}: its weight is not floating point", nonlinear=True)
        padding = a.get("padding", 0)
        if not isinstance(padding, str):
            padding = [size_hint(v) for v in padding] if isinstance(padding, (list, tuple)) else size_hint(padding)
        op = conv_term(weight, bias, stride=a.get("stride", 1), padding=padding, dilation=a.get("dilation", 1),
                       groups=a.get("groups", 1), node=node, root=x, path=path)
        return self._apply(node, op, x)

    def _linear(self, node: torch.fx.Node) -> _Term | _Barrier:
        a = bind_args(node, ("input", "weight", "bias"), {"bias": None})
        x, w_node, b_node = a["input"], a["weight"], a.get("bias")
        weight = self._const_value(w_node)
        bias = self._const_value(b_node) if b_node is not None else None
        path = self._param_path(w_node, "weight") or innermost_module_path(node) or node.name
        if not isinstance(x, torch.fx.Node) or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or \
                not weight.is_floating_point() or (b_node is not None and not isinstance(bias, torch.Tensor)):
            return _Barrier(f"{path}: its weight or bias is computed from the input", nonlinear=True)
        return self._apply(node, linear_term(weight, bias, node=node, root=x, path=path), x)

    def _batchnorm(self, node: torch.fx.Node, a: dict[str, Any]) -> _Term | _Barrier:
        x = a.get("input")
        mean_node = a.get("running_mean")
        path = self._param_path(mean_node, "running_mean") or innermost_module_path(node) or node.name
        if a.get("training"):
            return _Barrier(f"{path}: in training mode (export the model in eval)")
        params = [a.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
        values = [self._const_value(v) if v is not None else None for v in params]
        if params[2] is None or params[3] is None:
            return _Barrier(f"{path}: without running statistics it normalizes with batch statistics")
        if any(v is not None and not isinstance(c, torch.Tensor) for v, c in zip(params, values)):
            return _Barrier(f"{path}: its parameters are computed from the input", nonlinear=True)
        if not isinstance(x, torch.fx.Node):
            return _Barrier(f"{path}: no tensor input")
        val = x.meta.get("val")
        dim = val.dim() if isinstance(val, torch.Tensor) else None
        rank = dim - 2 if dim is not None and dim >= 3 else None
        aff = affine_from_statistics(values[2], values[3], values[0], values[1], float(a.get("eps", 1e-5)))
        op = batchnorm_term(aff, rank, dtype=values[2].dtype, device=values[2].device, node=node, root=x, path=path)
        return op if isinstance(op, _Barrier) else self._apply(node, op, x)


def _input_info(node: torch.fx.Node) -> tuple[int, torch.dtype, torch.device] | None:
    """(channels, dtype, device) of a region's input, from its ``val`` metadata."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    return size_hint(val.shape[1]), val.dtype, val.device


def _modifies_in_place(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and \
        node.target._schema.is_mutable


class MergeBranchesProgram(ProgramPass):
    """Merge the parallel branches of re-parameterizable blocks of an ExportedProgram; see the module docstring."""

    name = PASS_NAME

    def run_program(self, prog: EditableProgram) -> ExportedPassResult:
        return _ProgramMerge(prog).run()


class _ProgramMerge:
    """One run of :class:`MergeBranchesProgram` over one program."""

    def __init__(self, prog: EditableProgram) -> None:
        self.prog = prog
        self.analysis = _ProgramAnalysis(prog)
        self.result = ExportedPassResult(module=None)  # type: ignore[arg-type]
        #: a region's input that an earlier region's conv replaced (RepMixer's output feeds the next block)
        self.replaced: dict[torch.fx.Node, torch.fx.Node] = {}
        graph_ops = {op_name(n) for n in prog.graph.nodes if n.op == "call_function"}
        # a decomposed (core ATen) program has only ``convolution``: the merged conv keeps to that form
        self.use_convolution = "convolution" in graph_ops and not graph_ops & {"conv1d", "conv2d", "conv3d"}

    def run(self) -> ExportedPassResult:
        a = self.analysis
        for paths, reason in a.skips:
            self.result.skipped.append(Skip(PASS_NAME, paths, reason))
        for node in region_tops(a):
            self._materialize(node)
        merged = {p for c in self.result.changes for p in c.paths[1:]}
        self.result.skipped = [s for s in self.result.skipped if not (set(s.paths[1:]) & merged)]
        new_ep = self.prog.finish()
        self.result.program = new_ep
        self.result.module = new_ep.module()
        self.result.metrics["blocks_merged"] = len(self.result.changes)
        self.result.metrics["branches_merged"] = sum(c.details.get("branches", 0) for c in self.result.changes)
        self.result.metrics["graph_source"] = "export"
        return self.result

    def _materialize(self, node: torch.fx.Node) -> None:
        t = self.analysis.status[node]
        assert isinstance(t, _Term)
        if not worth_merging(t):
            return
        if not isinstance(node.meta.get("val"), torch.Tensor):  # a tuple-valued BatchNorm whose statistics are read
            for inner in t.inputs:
                if inner is not node and isinstance(self.analysis.status.get(inner), _Term):
                    self._materialize(inner)
            return
        where = _common_scope(set(t.nodes) | {node}, _program_scope) or "<model>"

        def fall_back(reason: str | None) -> None:
            if reason:
                self.result.skipped.append(Skip(PASS_NAME, (where, *t.paths), reason))
            for inner in t.inputs:
                if inner is not node and isinstance(self.analysis.status.get(inner), _Term):
                    self._materialize(inner)

        root = self.replaced.get(t.root, t.root)
        t = replace(t, root=root)
        ready = mergeable(t, lambda: _input_info(root), _modifies_in_place)
        if not isinstance(ready, _Term):
            return fall_back(ready)
        t = ready
        prefix = "" if where == "<model>" else where + "."
        if t.linear:  # Linears (RepViT's head and its distillation head): one aten.linear, a dense (out, in) weight
            t = _regroup(t, 1)
            t = replace(t, weight=t.weight.reshape(t.cout, t.cin))
        name = self._free_name(f"{prefix}merged_linear" if t.linear else f"{prefix}merged_conv")
        w = self.prog.add_parameter(f"{name}.weight", t.weight.to(t.dtype).to(t.device), t.requires_grad)
        b = self.prog.add_parameter(f"{name}.bias", t.bias.to(t.dtype).to(t.device), t.requires_grad)
        graph = self.prog.graph
        with graph.inserting_before(node):
            if t.linear:
                new = graph.call_function(aten.linear.default, (root, w, b))
            elif self.use_convolution:
                new = graph.call_function(aten.convolution.default, (root, w, b, list(t.stride), list(t.lo),
                                                                      list(t.dilation), False, [0] * t.rank, t.groups))
            else:
                new = graph.call_function(_CONV_OPS[t.rank], (root, w, b, list(t.stride), list(t.lo),
                                                              list(t.dilation), t.groups))
        # the value (a symbolic batch stays symbolic), the stack and the trace of the node it stands for
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack",
                                                                     "stack_trace", "source_fn_stack")})
        node.replace_all_uses_with(new)
        self.replaced[node] = new
        order = {n: i for i, n in enumerate(graph.nodes)}
        region = sorted(set(t.nodes) | {node}, key=order.__getitem__, reverse=True)
        consts = {i for n in region for i in n.all_input_nodes if isinstance(self.analysis.status.get(i), _Const)}
        for n in region:
            if not n.users:
                graph.erase_node(n)
        self._drop_unused(consts, t.paths)
        kernel = "x".join(map(str, t.kernel))
        what = f"merged {t.branches} branches of {where}" if t.merges else f"composed the conv chain of {where}"
        module_paths = tuple(sorted(set(t.paths), key=t.paths.index))
        into = "one Linear" if t.linear else f"one {kernel} conv (groups={t.groups}, stride={tuple(t.stride)})"
        self.result.changes.append(Change(
            PASS_NAME, "merge_branches", (where, *module_paths),
            f"{what} ({', '.join(module_paths)}) into {into} as the parameter {name}",
            details={"block": where, "conv": name, "kernel": t.kernel, "groups": t.groups, "stride": t.stride,
                     "branches": t.branches}))

    def _free_name(self, base: str) -> str:
        taken = set(self.prog.state_dict) | set(self.prog.constants)
        name, i = base, 1
        while f"{name}.weight" in taken or f"{name}.bias" in taken:
            name, i = f"{base}_{i}", i + 1
        return name

    def _drop_unused(self, consts: set[torch.fx.Node], paths: list[str]) -> None:
        """The ops on constants, and the parameters, buffers and constants, that only a merged region read;
        the step counters of its BatchNorms (read by nothing, before and after)."""
        stack = list(consts)
        while stack:
            n = stack.pop()
            if n.users or n.graph is not self.prog.graph or getattr(n, "_erased", False):
                continue
            if n.op == "call_function":
                stack.extend(i for i in n.all_input_nodes if isinstance(self.analysis.status.get(i), _Const))
                self.prog.graph.erase_node(n)
            elif n.op == "placeholder":
                self.prog.remove_if_unused(n)
        counters = {f"{p}.num_batches_tracked" for p in paths}
        for n in [n for n in self.prog.graph.nodes if n.op == "placeholder"]:
            s = self.prog.spec(n)
            if s is not None and s.target in counters and not n.users:
                self.prog.remove_if_unused(n)


def merge_program(program: ExportedProgram, *, inplace: bool = False) -> ExportedPassResult:
    """Merge the branches of an ExportedProgram; :func:`normfold.merge_branches` calls this for a program."""
    return MergeBranchesProgram()(program, inplace=inplace)
