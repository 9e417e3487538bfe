"""The ExportedProgram pass: fold BatchNorm in a torch.export program (``.pt2``), at the ATen level.

The same folds as the nn.Module pass (:mod:`normfold.passes.fold.module_pass`),
on ATen ops instead of modules, so a ``.pt2`` file can be folded without the
model's code:

* **weight standardization** (timm StdConv2d / ScaledStdConv2d): a
  ``batch_norm`` whose input is computed from parameters only is a constant;
  it is evaluated once in float64 and stored in place of the conv's weight
  (:mod:`normfold.passes.weight_standardization` states the math);
* **backward**: an eval ``batch_norm`` folds into the ``convolution`` /
  ``conv*d`` / ``conv_transpose*d`` / ``linear`` / ``addmm`` / ``mm`` that
  produces its input, directly or through ops that carry a per-channel affine
  (:mod:`normfold.passes.fold.flow`): ``W' = s W``, ``b' = s b + t``;
* **forward**: otherwise into the layers that read its output:
  ``W' = W diag(s)``, ``b' = b + W t``, only where no zero padding sees the shift.

The arithmetic is :mod:`normfold.passes.fold.arithmetic`. The ``batch_norm``
node is removed and its parameters and buffers leave the program's signature
and state_dict; a layer without bias gets a new parameter ``<layer>.bias``.
Module paths in the records come from the parameter names, so on the same
model the records match the nn.Module pass. Not folded here: torchvision's
FrozenBatchNorm2d (its forward is plain arithmetic, not a batch_norm op).
"""

from __future__ import annotations

import abc
import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

from normfold.errors import NormfoldError
from normfold.graph import innermost_module_path
from normfold.inputs import random_inputs
from normfold.norms import BatchNormAffine, affine_from_statistics
from normfold.passes.base import Change, Pass, PassResult, Skip
from normfold.passes.fold.arithmetic import fold_input_channels, fold_output_channels
from normfold.passes.fold.aten_reader import (BatchNormNode, EditableProgram, ProgramLayer, ProgramReader, aten,
                                              batchnorm_args, is_batchnorm_op, op_name, parameter_path, size_hint)
from normfold.passes.fold.flow import BackwardPlan, ForwardPlan, check_constraints, channel_index, walk_backward, \
    walk_forward
from normfold.passes.fold.reader import flat_nodes
from normfold.passes.fold.refusal import Refusal

__all__ = ["FoldBatchNormProgram", "ExportedPassResult", "ProgramPass", "fold_exported_program", "program_inputs"]


@dataclass
class ExportedPassResult(PassResult):
    """A PassResult whose rewrite is an ExportedProgram: ``program`` (``module`` is ``program.module()``)."""

    program: Any = None


class ProgramPass(Pass):
    """A pass over a torch.export ExportedProgram: subclasses implement :meth:`run_program`.

    ``pass_(program, inplace=False)`` works on a deep copy (the caller's program is not touched);
    the result is an :class:`ExportedPassResult` whose ``program`` is the rewritten program.
    """

    def __call__(self, program: Any, *, inplace: bool = False) -> ExportedPassResult:  # type: ignore[override]
        if not isinstance(program, ExportedProgram):
            raise NormfoldError(f"{self.name}: expected a torch.export.ExportedProgram, got {type(program).__name__}")
        if inplace:
            return self.call(program)
        ep = copy.deepcopy(program)
        # copy.deepcopy renames nodes that shadow builtins but not the signature: map the names back
        rename = {a.name: b.name for a, b in zip(program.graph.nodes, ep.graph.nodes) if a.name != b.name}
        return self.run_program(EditableProgram(ep, rename))

    def call(self, module: Any) -> ExportedPassResult:
        return self.run_program(EditableProgram(module))

    @abc.abstractmethod
    def run_program(self, prog: EditableProgram) -> ExportedPassResult:
        """Rewrite ``prog`` and build the new program."""


class FoldBatchNormProgram(ProgramPass):
    """Fold every foldable BatchNorm of an ExportedProgram; see the module docstring.

    ``through_ops=False`` and ``forward=False`` leave only the direct layer -> BatchNorm fold.
    ``only``: fold only the BatchNorms at these module paths and record
    nothing about the others (the nn.Module pass uses this for models torch.fx
    cannot trace).
    """

    name = "fold_batchnorm_program"

    def __init__(self, *, forward: bool = True, through_ops: bool = True, weight_standardization: bool = True,
                 only: set[str] | None = None) -> None:
        self.forward = forward
        self.through_ops = through_ops
        self.weight_standardization = weight_standardization
        self.only = only

    def run_program(self, prog: EditableProgram) -> ExportedPassResult:
        """Bake constant batch_norms, fold every BatchNorm op, build the new program."""
        d = ProgramReader(prog)
        result = ExportedPassResult(module=None)  # type: ignore[arg-type]
        if self.weight_standardization:
            self._bake_constant_batchnorms(prog, result)
        for node in list(prog.graph.nodes):
            if not getattr(node, "_erased", False) and is_batchnorm_op(node):
                self._fold_one(prog, d, node, result)
        new_ep = prog.finish()
        result.program = new_ep
        result.module = new_ep.module()
        result.metrics["graph_source"] = "export"
        return result

    # -- one BatchNorm -------------------------------------------------------------------------------
    def _parse(self, prog: EditableProgram, node: torch.fx.Node) -> BatchNormNode | Refusal:
        """The BatchNorm op with its parameters, or why it is not an eval BatchNorm that can be folded."""
        a = batchnorm_args(node)
        if a.get("training"):
            return Refusal("in training mode (the program was exported with model.train(); export it in eval)", node)
        params = [a.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
        if params[2] is None or params[3] is None:
            return Refusal("without running statistics: it normalizes with batch statistics even in eval", node)
        for p, what in zip(params, ("weight", "bias", "running_mean", "running_var")):
            if p is None:
                continue
            if prog.spec(p) is None:
                return Refusal(f"its {what} is computed in the program, not a parameter or buffer", node)
            if len(p.users) != 1:
                return Refusal(f"its {what} ({prog.spec(p).target}) is read by {len(p.users)} ops: the BatchNorm is "
                               f"called {len(p.users)} times, folding would change every call", node)
        target = prog.spec(params[2]).target
        path = parameter_path(target, ("running_mean",))
        if not target.endswith("running_mean"):
            path = innermost_module_path(node) or node.name
        if isinstance(node.meta.get("val"), torch.Tensor):
            value = node
        else:
            gets = [u for u in node.users if u.target is operator.getitem]
            others = [u for u in node.users if u.target is not operator.getitem]
            value_nodes = [u for u in gets if u.args[1] == 0]
            extra = [u for u in gets if u.args[1] != 0 and u.users]
            if others or extra or len(value_nodes) != 1:
                return Refusal("its saved mean/invstd outputs are used", node)
            value = value_nodes[0]
        inp = a["input"]
        if not isinstance(inp, torch.fx.Node):
            return Refusal("its input could not be traced", node)
        return BatchNormNode(node, value, inp, params, float(a.get("eps", 1e-5)), path)

    def _affine(self, prog: EditableProgram, bn: BatchNormNode) -> BatchNormAffine:
        """The BatchNorm op's float64 affine, from its parameter tensors."""
        w, b, mean, var = (prog.tensor(p) if p is not None else None for p in bn.params)
        return affine_from_statistics(mean, var, w, b, bn.eps)

    def _fold_one(self, prog: EditableProgram, d: ProgramReader, node: torch.fx.Node,
                  result: ExportedPassResult) -> None:
        """Fold one BatchNorm op: backward first, then forward; record the change or the skip with both reasons."""
        parsed = self._parse(prog, node)
        path = parsed.path if isinstance(parsed, BatchNormNode) else (innermost_module_path(node) or node.name)
        if self.only is not None and path not in self.only:
            return
        if isinstance(parsed, Refusal):
            result.skipped.append(Skip(self.name, (path,), parsed.reason))
            return
        bn = parsed
        affine = self._affine(prog, bn)
        bn_dtype = prog.tensor(bn.params[2]).dtype
        back = walk_backward(d, bn.node, bn.input, affine.num_features, through_ops=self.through_ops)
        if isinstance(back, BackwardPlan):
            refused = check_constraints(back.constraints, affine, bn_dtype) or self._fold_backward(prog, d, back,
                                                                                                   affine)
            if refused is None:
                self._remove(prog, bn)
                lays: list[ProgramLayer] = [part.producer.ref for part in back.parts]
                through = f" through {', '.join(back.ops)}" if back.ops else ""
                result.changes.append(Change(self.name, "fold", (bn.path, *(x.path for x in lays)),
                                             f"folded {bn.path} (batch_norm) into "
                                             f"{', '.join(x.label for x in lays)}{through}",
                                             {"channels": affine.num_features, "through": list(back.ops)}))
                return
            back = refused
        if not self.forward:
            result.skipped.append(Skip(self.name, (bn.path,), back.reason))
            return
        fwd = self._try_forward(prog, d, bn, affine, bn_dtype)
        if isinstance(fwd, Refusal):
            result.skipped.append(Skip(self.name, (bn.path,), f"{back.reason}; forward: {fwd.reason}"))
            return
        self._remove(prog, bn)
        names = ", ".join(h.consumer.label for h in fwd.hits)
        through = f" through {', '.join(fwd.ops)}" if fwd.ops else ""
        result.changes.append(Change(self.name, "fold_forward", (bn.path, *(h.consumer.ref.path for h in fwd.hits)),
                                     f"folded {bn.path} (batch_norm) forward into {names}{through}",
                                     {"channels": affine.num_features, "through": list(fwd.ops)}))

    def _fold_backward(self, prog: EditableProgram, d: ProgramReader, plan: BackwardPlan,
                       affine: BatchNormAffine) -> Refusal | None:
        """Fold into every producer of the plan, or (one refusing) into none."""
        edits = []
        for part in plan.parts:
            lay: ProgramLayer = part.producer.ref
            stored = prog.tensor(lay.weight).detach().clone()
            bias = prog.tensor(lay.bias) if lay.bias is not None else None
            fold = fold_output_channels(stored.t() if lay.transposed else stored, bias, lay.kind, lay.groups,
                                        *part.scale_shift(affine))
            if isinstance(fold, Refusal):
                return fold.suffixed(f" ({lay.label})")
            edits.append((lay, stored, fold))
        for lay, stored, fold in edits:
            new_b = fold.apply()  # writes the scaled weight into ``stored`` (through the transposed view)
            self._write(prog, lay, stored, new_b)
        return None

    def _try_forward(self, prog: EditableProgram, d: ProgramReader, bn: BatchNormNode, affine: BatchNormAffine,
                     bn_dtype: torch.dtype) -> ForwardPlan | Refusal:
        """Fold into the layers that read the BatchNorm output, all or none."""
        shape = d.shape(bn.value)
        if shape is None or len(shape) < 2:
            return Refusal("the BatchNorm output is not a batched tensor of known shape", bn.value)
        plan = walk_forward(d, bn.value, lambda: channel_index(shape, 1))
        if isinstance(plan, Refusal):
            return plan
        refused = check_constraints(plan.constraints, affine, bn_dtype)
        if refused is not None:
            return refused
        edits = []
        for h in plan.hits:
            lay: ProgramLayer = h.consumer.ref
            w = d.canonical_weight(lay)
            b = prog.tensor(lay.bias) if lay.bias is not None else None
            folded = fold_input_channels(lay.kind, w, b, lay.groups, *h.scale_shift(affine))
            if isinstance(folded, Refusal):
                return folded.suffixed(f" ({lay.label})")
            new_w, new_b = folded
            edits.append((lay, new_w.t().contiguous() if lay.transposed else new_w, new_b))
        for lay, stored, new_b in edits:
            self._write(prog, lay, stored, new_b)
        return plan

    def _write(self, prog: EditableProgram, lay: ProgramLayer, stored: torch.Tensor,
               new_b: torch.Tensor | None) -> None:
        """Store a folded weight (in its stored layout) and bias; a layer without bias gets a new parameter."""
        prog.set_tensor(lay.weight, stored)
        if new_b is None:
            return
        if lay.bias is not None:
            prog.set_tensor(lay.bias, new_b)
            return
        req = prog.tensor(lay.weight).requires_grad
        bnode = prog.add_parameter(f"{lay.path}.bias" if lay.path else "bias", new_b, req)
        node = lay.node
        if op_name(node) == "mm":
            with prog.graph.inserting_after(node):
                new = prog.graph.call_function(aten.addmm.default, (bnode, node.args[0], node.args[1]))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            prog.graph.erase_node(node)
            lay.node = new
        elif "bias" in node.kwargs:
            node.kwargs = {**node.kwargs, "bias": bnode}
        else:
            args = list(node.args)
            while len(args) < 3:
                args.append(None)
            args[2] = bnode
            node.args = tuple(args)
        lay.bias = bnode

    def _remove(self, prog: EditableProgram, bn: BatchNormNode) -> None:
        """Take the folded batch_norm out of the graph, with the parameters and buffers only it read."""
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
    def _bake_constant_batchnorms(self, prog: EditableProgram, result: ExportedPassResult) -> None:
        """Evaluate batch_norms computed from parameters only (weight standardization) and store their result."""
        const: dict[torch.fx.Node, bool] = {}

        def is_const(n: torch.fx.Node) -> bool:
            if n in const:
                return const[n]
            if n.op == "placeholder":
                v = prog.spec(n) is not None
            elif n.op == "call_function" and (isinstance(n.target, torch._ops.OpOverload)
                                              or n.target is operator.getitem):
                ins = flat_nodes((n.args, n.kwargs))
                v = bool(ins) and all(is_const(i) for i in ins)
                if v and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
                    v = False
            else:
                v = False
            const[n] = v
            return v

        for node in list(prog.graph.nodes):
            if not is_batchnorm_op(node) or not is_const(node):
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
            fshape = ProgramReader(prog).shape(frontier)
            target_w = [w for w in weights if ProgramReader(prog).shape(w) == fshape
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
            path = parameter_path(prog.spec(wnode).target, ("weight",))
            result.changes.append(Change("fold_weight_standardization", "bake", (path,),
                                         f"baked the weight standardization of {path} (a batch_norm over its "
                                         f"weight) into its weight", {"out_channels": int(fshape[0]) if fshape else 0}))

    @staticmethod
    def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
        """Every node ``node`` depends on, itself included."""
        seen: set[torch.fx.Node] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            stack.extend(flat_nodes((n.args, n.kwargs)))
        return seen

    @staticmethod
    def _evaluate(prog: EditableProgram, frontier: torch.fx.Node, ancestors: set[torch.fx.Node]) -> torch.Tensor:
        """Run the constant subgraph ending at ``frontier`` in float64 on the stored tensors."""
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
    return FoldBatchNormProgram(forward=forward, weight_standardization=weight_standardization)(program,
                                                                                               inplace=inplace)


def program_inputs(program: ExportedProgram, *, seed: int = 0) -> tuple[torch.Tensor, ...] | None:
    """Seeded random positional inputs shaped like the program's example inputs (or its input placeholders)."""
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
                shapes.append(tuple(size_hint(s) for s in v.shape))
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
