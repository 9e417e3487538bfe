"""The nn.Module pass: fold eval-mode BatchNorms into the layers around them, editing the modules.

For each BatchNorm module the torch.fx graph calls, in order:

1. **Backward** (:func:`normfold.passes.fold.flow.walk_backward`): into the
   Conv / ConvTranspose / Linear that produces its input, ``W' = s W``,
   ``b' = s b + t`` per output channel. The direct pair is the walk's
   zero-op case (no shape needed, except a Linear's rank: a BatchNorm1d
   normalizes axis 1, which is the Linear's feature axis only on ``(N, C)``);
   with ``through_ops`` the walk also crosses ops that carry a per-channel
   affine (reshape, permute, pools, ``cat``: timm's LeViT ``LinearNorm``,
   MixedConv2d).
2. **Forward** (:func:`normfold.passes.fold.flow.walk_forward`): into the
   layers that read its output, ``W' = W diag(s)``, ``b' = b + W t``, where
   no zero padding sees the shift ``t``.

The first that succeeds is applied; a BatchNorm that folds neither way is
skipped with both reasons. The BatchNorm becomes its remnant
(``nn.Identity``, or the drop/act a timm BatchNormAct2d carried), so the
caller gets their own class back; only a functional ``F.batch_norm`` with
constant statistics makes the result a ``torch.fx.GraphModule``.

One trace serves every BatchNorm: a module folded earlier in the loop reads
as the Identity that replaced it. Shapes are propagated (one forward pass)
only when a fold needs one, after the structural checks, so a model whose
leftover BatchNorms all sit before an activation never pays for it.

A model torch.fx cannot trace is traced once with torch.export and folded by
:class:`~normfold.passes.fold.program_pass.FoldBatchNormProgram` under the
same rules; the folded weights are copied back into its own modules by
parameter name.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import torch
import torch.fx
from torch import nn

from normfold.errors import TraceError
from normfold.graph import ModelGraph, build_graph, eval_mode
from normfold.inputs import infer_input_shapes, model_dtype_device, random_inputs
from normfold.norms import STANDARD_BN_FORWARDS, BatchNormAffine, affine_from_statistics, batchnorm_affine, \
    batchnorm_problem, batchnorm_remnant, is_batchnorm, set_submodule
from normfold.passes.base import Change, Pass, PassResult, Skip
from normfold.passes.fold.arithmetic import fold_input_channels, fold_output_channels
from normfold.passes.fold.flow import BackwardPlan, ForwardPlan, check_constraints, channel_index, walk_backward, \
    walk_forward
from normfold.passes.fold.fx_reader import ModuleReader
from normfold.passes.fold.program_pass import FoldBatchNormProgram
from normfold.passes.fold.refusal import Refusal
from normfold.passes.fold.rules import producer_problem

__all__ = ["FoldBatchNormModules", "infer_example_inputs"]

log = logging.getLogger(__name__)

_FUNCTIONAL_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def infer_example_inputs(model: nn.Module) -> tuple | None:
    """Random inputs shaped from the model's first layer (:func:`normfold.inputs.infer_input_shapes`), or None."""
    try:
        inferred = infer_input_shapes(model)
    except Exception:  # a model whose first layer says nothing about its input: the caller reports it
        return None
    dtype, device = model_dtype_device(model)
    return random_inputs(inferred.shapes, dtype=dtype, device=device, integer_high=inferred.integer_high)


def _bn_dtype(bn: nn.Module) -> torch.dtype | None:
    """The BatchNorm's floating dtype (the rounding level of its zero-shift test)."""
    for name in ("weight", "bias", "running_mean"):
        t = getattr(bn, name, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return None


def _layer_names(where: ModuleReader | nn.Module, paths: list[str]) -> str:
    """``"a.conv (Conv2d), b.fc (Linear)"`` for the change messages."""
    get = where.module_at if isinstance(where, ModuleReader) else where.get_submodule
    return ", ".join(f"{p} ({type(get(p)).__name__})" for p in paths)


def _set_bias(layer: nn.Module, new_b: torch.Tensor) -> None:
    """Write the folded bias into ``layer`` (a new Parameter, with the weight's requires_grad, when it had none)."""
    if layer.bias is not None:
        layer.bias.detach().copy_(new_b)  # the same storage, without autograd seeing an in-place write
    else:
        layer.bias = nn.Parameter(new_b, requires_grad=layer.weight.requires_grad)


class FoldBatchNormModules(Pass):
    """Fold every foldable eval-mode BatchNorm of an nn.Module; see the module docstring.

    ``example_inputs`` give shapes (a Linear's rank, walks through reshapes)
    and let torch.export trace a model torch.fx cannot; with
    ``infer_inputs``, inputs are inferred from the first layer when a step
    needs them and none were given. ``through_ops=False`` and
    ``forward=False`` leave only the direct Conv/Linear -> BatchNorm fold.
    """

    name = "fold_batchnorm"

    def __init__(self, *, example_inputs: Any = None, infer_inputs: bool = False, through_ops: bool = True,
                 forward: bool = True) -> None:
        self.example_inputs = example_inputs
        self.infer_inputs = infer_inputs
        self.through_ops = through_ops
        self.forward = forward

    def _inferred(self, module: nn.Module) -> tuple | None:
        if self.example_inputs is not None or not self.infer_inputs:
            return None
        return infer_example_inputs(module)

    def call(self, module: nn.Module) -> PassResult:
        result = PassResult(module=module)
        try:
            graph = build_graph(module, self.example_inputs, shapes=False, allow_export=False)
        except TraceError as fx_exc:
            inputs = self.example_inputs if self.example_inputs is not None else self._inferred(module)
            if inputs is None:
                raise TraceError(f"{fx_exc}; pass example_inputs (or --input-shape) so that torch.export can "
                                 "trace it instead") from fx_exc
            self._fold_via_export(module, inputs, str(fx_exc), result)
            result.metrics["graph_source"] = "export"
            return result
        reader = ModuleReader(module, graph, lambda: self._inferred(module))
        seen: set[str] = set()
        functional = []
        for node in list(graph.fx_graph.nodes):
            if node.op == "call_module" and node.target not in seen:
                m = reader.module_at(node.target)
                if is_batchnorm(m):
                    seen.add(node.target)
                    self._fold_one(reader, node, m, result)
            elif reader.is_functional_batchnorm(node):
                functional.append(node)
        if functional:
            folded_any = False
            for node in functional:
                folded_any |= self._fold_functional(reader, node, result)
            if folded_any:
                gm = graph.graph_module
                gm.graph.eliminate_dead_code()
                gm.graph.lint()
                gm.recompile()
                result.module = gm
        # BatchNorms the forward never calls are reported too: nothing folds into them.
        for path, m in module.named_modules():
            if is_batchnorm(m) and path not in seen:
                result.skipped.append(Skip(self.name, (path,), "not called in forward()"))
        result.metrics["graph_source"] = graph.source
        return result

    # -- one BatchNorm module ------------------------------------------------------------------------
    def _fold_one(self, r: ModuleReader, node: torch.fx.Node, bn: nn.Module, result: PassResult) -> None:
        """Fold one BatchNorm module: backward first, then forward; record the change or the skip with both reasons."""
        path = node.target
        refused = self._bn_refusal(r.graph, path, bn)
        if refused is not None:
            result.skipped.append(Skip(self.name, (path,), refused.reason))
            return
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            result.skipped.append(Skip(self.name, (path,), "its input could not be traced"))
            return
        dtype = _bn_dtype(bn)
        affine: BatchNormAffine | None = None  # computed once a plan needs it: most refusals are structural

        def the_affine() -> BatchNormAffine:
            nonlocal affine
            if affine is None:
                affine = batchnorm_affine(bn)
            return affine

        back = walk_backward(r, node, node.args[0], bn.running_mean.numel(), through_ops=self.through_ops)
        if isinstance(back, BackwardPlan):
            back = check_constraints(back.constraints, the_affine(), dtype) or self._fold_backward(
                r, node, bn, back, the_affine(), result)
            if back is None:
                return
        if not self.forward:
            result.skipped.append(Skip(self.name, self._skip_paths(r, path, back), back.reason))
            return
        fwd = self._fold_forward(r, node, bn, the_affine, dtype, result)
        if fwd is not None:
            result.skipped.append(Skip(self.name, (path,), f"{back.reason}; forward: {fwd.reason}"))

    @staticmethod
    def _skip_paths(r: ModuleReader, path: str, refusal: Refusal) -> tuple[str, ...]:
        """The BatchNorm, and the layer the refusal is about when it is a module call."""
        n = refusal.node
        if isinstance(n, torch.fx.Node) and n.op == "call_module" and n.target != path:
            return (path, n.target)
        return (path,)

    @staticmethod
    def _bn_refusal(graph: ModelGraph, path: str, bn: nn.Module) -> Refusal | None:
        """Why no fold can remove this BatchNorm, whatever is around it; None when one may."""
        problem = batchnorm_problem(bn)
        if problem is not None:
            return Refusal(problem)
        calls = graph.call_count(path)
        if calls > 1:
            return Refusal(f"called {calls} times in forward(); folding would change every call")
        if bn._forward_hooks or bn._forward_pre_hooks:
            return Refusal("has forward hooks that would be lost")
        return None

    def _fold_backward(self, r: ModuleReader, node: torch.fx.Node, bn: nn.Module, plan: BackwardPlan,
                       affine: BatchNormAffine, result: PassResult) -> Refusal | None:
        """Fold into every producer of the plan, or (one refusing) into none."""
        edits = []
        for part in plan.parts:
            layer = r.module_at(part.producer.ref)
            fold = fold_output_channels(layer.weight, layer.bias, part.producer.kind, getattr(layer, "groups", 1),
                                        *part.scale_shift(affine))
            if isinstance(fold, Refusal):
                return Refusal(fold.reason, part.node) if len(plan.parts) == 1 and not plan.ops else \
                    fold.suffixed(f" ({part.producer.ref})")
            edits.append((layer, fold))
        for layer, fold in edits:
            _set_bias(layer, fold.apply())
        self._remove_bn(r, node.target, bn)
        result.changes.append(self._fold_change(r, "fold", node.target, bn, [p.producer.ref for p in plan.parts],
                                                plan.ops, affine))
        return None

    def _fold_forward(self, r: ModuleReader, node: torch.fx.Node, bn: nn.Module,
                      the_affine: Callable[[], BatchNormAffine], dtype: torch.dtype | None,
                      result: PassResult) -> Refusal | None:
        """Fold into the layers that read the BatchNorm output, all or none."""
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and type(bn).forward in STANDARD_BN_FORWARDS:
            pass  # a plain BatchNorm leaves nothing behind (no need to build its remnant to see that)
        else:
            rem = batchnorm_remnant(bn)
            if not isinstance(rem, (nn.Identity, nn.modules.dropout._DropoutNd)) or (
                    isinstance(rem, nn.modules.dropout._DropoutNd) and rem.training):
                return Refusal(f"{type(rem).__name__} runs inside {type(bn).__name__} after the normalization")

        def index() -> torch.Tensor | Refusal:
            shape = r.shape(node)
            if shape is None:
                return Refusal("the BatchNorm output shape is unknown (pass example_inputs)", node)
            if len(shape) < 2:
                return Refusal("the BatchNorm output is not batched", node)
            return channel_index(shape, 1)

        plan = walk_forward(r, node, index)
        if isinstance(plan, Refusal):
            return plan
        affine = the_affine()
        refused = check_constraints(plan.constraints, affine, dtype)
        if refused is not None:
            return refused
        edits = []
        for h in plan.hits:
            layer = r.module_at(h.consumer.ref)
            folded = fold_input_channels(h.consumer.kind, layer.weight, layer.bias, getattr(layer, "groups", 1),
                                         *h.scale_shift(affine))
            if isinstance(folded, Refusal):
                return folded.suffixed(f" ({h.consumer.label})") if "overflow" in folded.reason else folded
            edits.append((layer, *folded))
        for layer, new_w, new_b in edits:
            layer.weight.detach().copy_(new_w)
            if new_b is not None:
                _set_bias(layer, new_b)
        self._remove_bn(r, node.target, bn)
        result.changes.append(self._fold_change(r, "fold_forward", node.target, bn,
                                                [h.consumer.ref for h in plan.hits], plan.ops, affine))
        return None

    def _fold_change(self, r: ModuleReader, kind: str, bn_path: str, bn: nn.Module, layers: list[str],
                     ops: list[str], affine: BatchNormAffine) -> Change:
        """The record of one fold: the BatchNorm, the layers it went into, the ops it was carried through."""
        into = "forward into" if kind == "fold_forward" else "into"
        through = f" through {', '.join(ops)}" if ops else ""
        return Change(self.name, kind, (bn_path, *layers),
                      f"folded {bn_path} ({type(bn).__name__}) {into} {_layer_names(r, layers)}{through}",
                      {"channels": affine.num_features, "through": list(ops)})

    @staticmethod
    def _remove_bn(r: ModuleReader, path: str, bn: nn.Module) -> None:
        """Put the BatchNorm's remnant (Identity, or its drop/act) in its place, in the model and in the GraphModule."""
        remnant = batchnorm_remnant(bn)
        parent, _, name = path.rpartition(".")
        # the parent's module table directly: set_submodule walks the path with get_submodule (30 us a call)
        r.module_at(parent)._modules[name] = remnant
        if r.graph.has_graph_module and r.graph.graph_module is not r.root:
            try:
                # the GraphModule holds its own references to the leaf modules; keep it in step in case a
                # functional fold makes it the returned module
                set_submodule(r.graph.graph_module, path, remnant)
            except AttributeError:
                # fx only copies the submodules its graph calls into the GraphModule: a BatchNorm it never
                # called has no slot there, and the root (what the user gets) is already edited
                pass

    # -- functional F.batch_norm ----------------------------------------------------------------------
    def _fold_functional(self, r: ModuleReader, node: torch.fx.Node, result: PassResult) -> bool:
        """Fold a ``F.batch_norm`` whose statistics are constants into its producer (a graph edit)."""
        gm = r.graph.graph_module

        def skip(reason: str, *extra: str) -> bool:
            result.skipped.append(Skip(self.name, (node.name, *extra), reason))
            return False

        try:
            # torch.batch_norm and F.batch_norm order their arguments differently: let fx bind them
            norm = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
            kw = dict(norm.kwargs) if norm is not None else None
        except Exception:  # an overload fx cannot match: fall back to F.batch_norm's order
            kw = None
        if kw is None:
            kw = dict(zip(_FUNCTIONAL_BN_ARGS, node.args))
            kw.update(node.kwargs)
        if kw.get("training", False) is not False:
            return skip("functional batch_norm with training=True (or a training flag only known at run time)")
        tensors: dict[str, torch.Tensor | None] = {}
        for key in ("running_mean", "running_var", "weight", "bias"):
            v = kw.get(key)
            if v is None:
                tensors[key] = None
            elif isinstance(v, torch.fx.Node) and v.op == "get_attr":
                tensors[key] = _fetch_attr(gm, v.target)
            else:
                return skip(f"functional batch_norm's {key} is computed in forward(), not a constant")
        if tensors["running_mean"] is None or tensors["running_var"] is None:
            return skip("functional batch_norm without running statistics normalizes with batch statistics")
        affine = affine_from_statistics(tensors["running_mean"], tensors["running_var"], tensors["weight"],
                                        tensors["bias"], float(kw.get("eps", 1e-5)))
        src = kw.get("input")
        if not isinstance(src, torch.fx.Node):
            return skip("its input could not be traced")
        plan = walk_backward(r, node, src, affine.num_features, through_ops=False)
        if isinstance(plan, Refusal):
            return skip(plan.reason, *self._skip_paths(r, node.name, plan)[1:])
        part = plan.parts[0]
        layer = r.module_at(part.producer.ref)
        fold = fold_output_channels(layer.weight, layer.bias, part.producer.kind, getattr(layer, "groups", 1),
                                    affine.scale, affine.shift)
        if isinstance(fold, Refusal):
            return skip(fold.reason, part.producer.ref)
        _set_bias(layer, fold.apply())
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        result.changes.append(Change(self.name, "fold", (node.name, part.producer.ref),
                                     f"folded functional batch_norm {node.name} into {part.producer.ref} "
                                     f"({type(layer).__name__}); the result is a torch.fx.GraphModule",
                                     {"channels": affine.num_features}))
        return True

    # -- models torch.fx cannot trace ------------------------------------------------------------------
    def _fold_via_export(self, module: nn.Module, inputs: Any, fx_error: str, result: PassResult) -> None:
        """Fold on the model's torch.export graph, then copy the folded weights into its own modules.

        The ExportedProgram pass decides under the same rules; its parameter
        names are the module paths. Only BatchNorms with an eval affine and no
        hooks are offered to it, and a fold is kept only when every layer it
        writes is a standard Conv/Linear module (a layer with its own forward
        would not compute what its exported ops did): the others are folded
        again without them.
        """
        mods = dict(module.named_modules())
        wanted: set[str] = set()
        for p, m in mods.items():
            if not is_batchnorm(m):
                continue
            problem = batchnorm_problem(m)
            if problem is not None:
                result.skipped.append(Skip(self.name, (p,), problem))
            elif m._forward_hooks or m._forward_pre_hooks:
                result.skipped.append(Skip(self.name, (p,), "has forward hooks that would be lost"))
            else:
                wanted.add(p)
        if not wanted:
            return
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        try:
            with eval_mode(module), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(module, args, strict=False)
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TraceError(f"neither torch.fx ({fx_error}) nor torch.export ({type(exc).__name__}: {msg}) could trace "
                             f"{type(module).__name__}; check that the example inputs are what forward() takes, "
                             "or fold an ExportedProgram (.pt2) instead") from exc
        def program_pass(only: set[str]) -> FoldBatchNormProgram:
            return FoldBatchNormProgram(forward=self.forward, through_ops=self.through_ops,
                                        weight_standardization=False, only=only)

        dry = program_pass(wanted)(ep)
        ok = {c.paths[0] for c in dry.changes
              if all(isinstance(mods.get(p), (nn.modules.conv._ConvNd, nn.Linear)) and producer_problem(mods[p]) is None
                     for p in c.paths[1:])}
        # fold again with only the BatchNorms whose layers can take the weights, so that no layer carries a
        # fold that is not applied to the module
        done = program_pass(ok)(ep, inplace=True) if ok != {c.paths[0] for c in dry.changes} else dry
        state = done.program.state_dict
        for c in done.changes:
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
            through = c.details.get("through") or []
            direction = "forward into" if c.action == "fold_forward" else "into"
            result.changes.append(Change(self.name, c.action, c.paths,
                                         f"folded {bn_path} ({type(bn).__name__}) {direction} "
                                         f"{_layer_names(module, list(c.paths[1:]))}"
                                         + (f" through {', '.join(through)}" if through else "")
                                         + " (traced with torch.export)", dict(c.details)))
        folded = {c.paths[0] for c in done.changes}
        reasons = {s.paths[0]: s.reason for s in dry.skipped if s.paths}
        for p in sorted(wanted - folded):
            if p in reasons:
                why = reasons[p]
            elif any(c.paths[0] == p for c in dry.changes):
                why = "a layer it would fold into has its own forward()"
            else:
                why = "not called in forward()"
            result.skipped.append(Skip(self.name, (p,), why))


def _fetch_attr(root: nn.Module, target: str) -> Any:
    """The object at dotted ``target`` below ``root`` (a get_attr node of a GraphModule)."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
