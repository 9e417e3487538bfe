"""Merge parallel linear branches that meet at an add into one convolution (structural re-parameterization).

RepVGG, MobileOne, FastViT, RepViT, RepGhost, ACNet and DBB train blocks whose
branches read the same tensor ``x`` and add up::

    y = BN_a(conv_kxk(x)) + BN_b(conv_1x1(x)) + BN_c(x) [+ avgpool(x)] [* gamma] ...

In eval mode every branch is an affine map of ``x`` that is itself a
convolution, so the sum is one convolution. This pass finds such regions on the
dataflow graph (torch.fx, one block at a time) and writes the one conv.

The algebra (terms, and how adds, scales and chains combine them) is
:mod:`normfold.passes.merge_algebra`, shared with the ExportedProgram pass
(:mod:`normfold.passes.merge_program`).

What is refused, each with its reason in ``PassResult.skipped``: a branch
through a nonlinearity, a BatchNorm in training mode, strides, dilations or
paddings that do not line up, a branch output read elsewhere, a module with
hooks, an in-place op on the shared input, and a merge whose conv would cost
more multiply-adds than the ops it replaces (a dense 1x1 after a depthwise kxk
is left alone for that reason). Refusals are reported where the add looks like a
re-parameterizable block (every branch short); a residual around a conv-act-conv
stack or an attention module is not one and is not reported. Rewritten only when
something merges: a conv -> pool chain alone (DenseNet's transition) and sums of
identities and constants alone (``x + x``) stay as written.

Regions are found on one fx trace of the whole model; each block is then traced
on its own and rewritten. A model that does not trace whole is tried module by
module, children first.

The model that comes back: the outer class stays; each block whose branches
merged (the innermost module whose ``forward`` holds the whole region) gives
way, at its path, to what :func:`normfold.passes.merge_modules.merged_block_module`
builds: an ``nn.Sequential`` of the merged conv (``merged_conv``) and whatever
came after the add (activation, SE, ...) under their own names when the block
computes a chain, else the ``torch.fx.GraphModule`` the merge wrote. Branches
that meet in the model's own ``forward`` (LeViT's distillation head) are left,
saying so: merging them would replace the user's class. Each merge is a
:class:`Change` naming the block and the modules merged.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import replace
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.export import ExportedProgram
from torch.nn import functional as F

from normfold.graph import eval_mode, is_leaf_type
from normfold.norms import batchnorm_affine, batchnorm_remnant, is_batchnorm, set_submodule
from normfold.passes.base import Change, Pass, PassResult, Skip
from normfold.passes.merge_algebra import (batchnorm_term, conv_term, linear_term, mergeable, PASS_NAME, pool_term,
                                           region_tops, worth_merging, _ADD, _Analysis, _Barrier, _common_scope,
                                           _Const, _CONST_FUNCTIONS, _CONST_METHODS, _CONV_FORWARDS, _DIV, _DROPOUTS,
                                           _is_inplace, _MUL, _NEG, _PASS_THROUGH, _per_channel, _POOLS, _regroup,
                                           _scope, _SUB, _Term, _with_channels, _with_rank)
from normfold.passes.merge_modules import merged_block_module
from normfold.passes.merge_program import merge_program
from normfold.passes.merge_tracer import MergeTracer, timm_notrace

log = logging.getLogger(__name__)

__all__ = ["MergeBranches", "merge_branches"]

def _module_term(m: nn.Module, path: str, node: torch.fx.Node, root: torch.fx.Node) -> _Term | _Barrier | None:
    """The term of module ``m`` applied to ``root``; None for a pass-through (Identity, eval Dropout)."""
    if m._forward_hooks or m._forward_pre_hooks:
        return _Barrier(f"{path} has forward hooks that merging would drop")
    if isinstance(m, _PASS_THROUGH):
        return None
    if isinstance(m, _DROPOUTS):
        return None if not m.training else _Barrier(f"{path} is a dropout in training mode", nonlinear=True)
    rank = _CONV_FORWARDS.get(type(m).forward)
    if isinstance(m, nn.modules.conv._ConvNd) and rank is not None and not m.transposed:
        if m.padding_mode != "zeros":
            return _Barrier(f"{path} pads with {m.padding_mode!r}, not zeros")
        return conv_term(m.weight, m.bias, stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                         node=node, root=root, path=path)
    if type(m).forward is nn.Linear.forward and not isinstance(m.weight, nn.parameter.UninitializedParameter):
        return linear_term(m.weight, m.bias, node=node, root=root, path=path)
    if is_batchnorm(m):
        aff = batchnorm_affine(m)
        if isinstance(aff, str):
            return _Barrier(f"{path}: {aff}")
        if not isinstance(batchnorm_remnant(m), nn.Identity):
            return _Barrier(f"{path} applies an activation after normalizing", nonlinear=True)
        rank = {nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(next((c for c in type(m).__mro__ if c in
                                                               (nn.BatchNorm2d, nn.BatchNorm3d)), None))
        return batchnorm_term(aff, rank, dtype=m.running_mean.dtype, device=m.running_mean.device, node=node,
                              root=root, path=path)
    pool_rank = next((r for cls, r in _POOLS.items() if type(m) is cls), None)
    if pool_rank is not None:
        return pool_term(m.kernel_size, m.stride, m.padding, rank=pool_rank, ceil_mode=m.ceil_mode,
                         count_include_pad=m.count_include_pad,
                         divisor_override=getattr(m, "divisor_override", None), node=node, root=root, path=path)
    if type(m).__module__ == nn.modules.activation.__name__:
        return _Barrier(f"{path} ({type(m).__name__}) is not linear", nonlinear=True)
    return _Barrier(f"{path} ({type(m).__name__}) is not an op this pass merges "
                    "(conv, BatchNorm, avg-pool, identity, constant scale)", nonlinear=True)


class _BlockAnalysis(_Analysis):
    """The torch.fx reader: terms of every node of one traced block (modules, functions, methods)."""

    def __init__(self, graph: torch.fx.Graph, root: nn.Module, block_path: str) -> None:
        self.root = root
        self.block_path = block_path
        self.modules = dict(root.named_modules())
        super().__init__(graph)

    def _path(self, target: str) -> str:
        return f"{self.block_path}.{target}" if self.block_path else target

    def _where(self, node: torch.fx.Node) -> str:
        return self.block_path or "<model>"

    def _layer_path(self, node: torch.fx.Node) -> str | None:
        return self._path(node.target) if node.op == "call_module" else None

    def _visit(self, node: torch.fx.Node) -> _Term | _Barrier | _Const:
        if node.op == "get_attr":
            return _Const(_fetch(self.root, node.target))
        if node.op in ("placeholder", "output"):
            return _Barrier(node.op)
        args = [a for a in node.args]
        tensor_args = [a for a in args if isinstance(a, torch.fx.Node) and not isinstance(self.status.get(a), _Const)]
        if node.op in ("call_function", "call_method") and not tensor_args and not node.kwargs:
            const = self._const(node)
            if const is not None:
                return const
        if node.op == "call_module":
            if len(args) != 1 or node.kwargs or not isinstance(args[0], torch.fx.Node):
                return _Barrier(f"{self._path(node.target)} takes more than one input")
            m = self.modules[node.target]
            op = _module_term(m, self._path(node.target), node, args[0])
            if isinstance(op, _Barrier):
                return op
            return self._apply(node, op, args[0])
        target = node.target
        if node.op == "call_function" and target is operator.setitem and isinstance(args[0], torch.fx.Node) \
                and args[0].op == "call_function" and args[0].target is F.pad:
            # the pad's term is decided at its last border write, once the border value is known
            # (DBB computes it after the pad); every reader of the pad comes after that write
            writes = [u for u in args[0].users if u.target is operator.setitem]
            if all(w in self.status for w in writes if w is not node):
                padded = self._border_pad(args[0])
                if padded is not None:
                    self.status[args[0]] = padded
        if node.op in ("call_function", "call_method") and not node.kwargs:
            if (target in _ADD or target in _SUB) and len(args) == 2:
                return self._add(node, args[0], args[1], -1.0 if target in _SUB else 1.0)
            if (target in _MUL or target in _DIV) and len(args) == 2:
                return self._mul(node, args[0], args[1], div=target in _DIV)
            if target in _NEG and len(args) == 1 and isinstance(args[0], torch.fx.Node):
                return self._mul(node, args[0], -1.0, div=False)
        name = getattr(target, "__name__", str(target))
        return _Barrier(f"{name} is not one of the linear ops this pass merges", nonlinear=True)

    def _border_pad(self, node: torch.fx.Node) -> _Term | _Barrier | None:
        """``F.pad(T, [p] * 2r)`` whose border is then overwritten with a per-channel constant ``c``.

        DBB's ``BNAndPadLayer`` writes the border of the zero-padded BN output with the BN's own bias,
        one ``setitem`` per side (``out[:, :, 0:p, :] = c``, ``out[:, :, -p:, :] = c``, ...), and the kxk
        conv after it has padding 0. For a pointwise ``T = W x + b`` and ``c = b`` the padded tensor is
        ``T`` with padding ``p`` (a 1x1 conv of ``x`` zero-padded by ``p`` gives ``b`` on the border), the
        algebra's term. ``c`` is compared in float64 relative to ``max |b|``, within the rounding of
        the dtype ``c`` was computed in. None: not this pattern (the pad stays an op this pass does
        not merge); a barrier: this pattern, but not exact, with the reason.
        """
        args = list(node.args) + [None] * (4 - len(node.args))
        src, pad = args[0], node.kwargs.get("pad", args[1])
        mode, value = node.kwargs.get("mode", args[2] or "constant"), node.kwargs.get("value", args[3])
        if not isinstance(src, torch.fx.Node) or not isinstance(pad, (list, tuple)) or not pad or len(pad) % 2 \
                or len(set(pad)) != 1 or not isinstance(pad[0], int) or pad[0] <= 0 or mode != "constant" \
                or value not in (None, 0):
            return None
        p, rank = pad[0], len(pad) // 2
        writes = [u for u in node.users if u.op == "call_function" and u.target is operator.setitem]
        readers = [u for u in node.users if u not in writes]
        if not writes or len(readers) != 1 or any(len(w.args) != 3 or w.kwargs for w in writes):
            return None
        sides = {_border_side(w.args[1], p, rank) for w in writes}
        if len(writes) != 2 * rank or None in sides or len(sides) != 2 * rank or \
                any(w.args[2] is not writes[0].args[2] for w in writes):
            return None  # not exactly the border, once per side, with one value
        after = False  # every write before the one reader: it must see the finished border
        for n in node.graph.nodes:
            if n is readers[0]:
                after = True
            elif after and n in writes:
                return None
        const = self._value_or_term(writes[0].args[2])
        t = _with_rank(self._operand(src), rank)
        if const is None or isinstance(t, str):
            return None
        where = self._path(_scope(node)) or "<model>"
        c = _per_channel(const, rank)
        if isinstance(c, str):
            return _Barrier(f"{where} writes the border of a padded tensor with {c}")
        if not t.is_pointwise():
            return _Barrier(f"{where} pads the output of a {t.kernel} kernel with a border value: only a "
                            "pointwise op before it makes it one conv")
        t = _with_channels(t, c[0].numel()) if c[0].numel() > 1 else t
        if isinstance(t, str):
            return _Barrier(f"{where}: {t}")
        cv, b = c[0].expand_as(t.bias), t.bias
        dtype = const.dtype if isinstance(const, torch.Tensor) else (t.dtype or torch.float32)
        # c is computed in the model's dtype, b_T here in float64: equal within a few roundings of dtype
        tol = 64 * torch.finfo(dtype).eps * max(float(b.abs().max()), torch.finfo(dtype).tiny)
        diff = (cv - b).abs()
        if float(diff.max()) > tol:
            i = int(diff.argmax())
            return _Barrier(f"{where} pads with border value {float(cv[i]):.6g} where its input's bias is "
                            f"{float(b[i]):.6g} (channel {i}): only that bias makes the padded chain one conv")
        return replace(t, lo=(p,) * rank, hi=(p,) * rank, nodes=t.nodes + [node, *writes], inputs=[src])

    def _const(self, node: torch.fx.Node) -> _Const | None:
        ok = (node.op == "call_method" and node.target in _CONST_METHODS) or \
             (node.op == "call_function" and node.target in _CONST_FUNCTIONS)
        if not ok:
            return None
        vals = [self.status[a].value if isinstance(a, torch.fx.Node) else a for a in node.args]
        try:
            with torch.no_grad():
                if node.op == "call_method":
                    return _Const(getattr(vals[0], node.target)(*vals[1:]))
                return _Const(node.target(*vals))
        except Exception:  # not computable here (a shape that only the real input has): not a constant
            return None

    def _weighted(self, node: torch.fx.Node) -> int:
        """Weighted layers (conv, linear) a path node stands for: a merged term's convs, an opaque module's."""
        st = self.status.get(node)
        if isinstance(st, _Term):
            return st.convs
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(st, _Barrier) and not is_batchnorm(m) and not isinstance(m, nn.modules.conv._ConvNd) \
                    and any(True for _ in m.parameters()):
                return 3  # an opaque module with weights (attention, an MLP): never one branch of a block
            return sum(isinstance(sub, (nn.modules.conv._ConvNd, nn.Linear)) for sub in m.modules())
        return 0


def _border_side(index: Any, p: int, rank: int) -> tuple[int, int] | None:
    """(axis, 0 for the first ``p`` / 1 for the last ``p``) when ``index`` selects one border slab of a
    tensor of ``rank`` spatial axes padded by ``p`` (``[:, :, 0:p, :]``, ``[:, :, -p:]``); else None."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > 2 + rank or not all(isinstance(i, slice) for i in index):
        return None
    index = index + (slice(None),) * (2 + rank - len(index))
    whole = slice(None)
    if index[0] != whole or index[1] != whole or any(i.step not in (None, 1) for i in index):
        return None
    cut = [(d, i) for d, i in enumerate(index[2:]) if (i.start, i.stop) != (None, None)]
    if len(cut) != 1:
        return None
    d, i = cut[0]
    if i.start in (None, 0) and i.stop == p:
        return d, 0
    if i.start == -p and i.stop is None:
        return d, 1
    return None


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------------- the pass


class MergeBranches(Pass):
    """Merge parallel conv / BatchNorm / identity / avg-pool / scale branches that meet at an add into one conv.

    Runs on a model with or without its conv+BN pairs folded. See the module docstring for the
    algebra and the refusals.
    """

    name = PASS_NAME

    def __init__(self, *, example_inputs: Any = None) -> None:
        self.example_inputs = example_inputs

    def call(self, module: nn.Module) -> PassResult:
        # one run's state (what was traced, the example inputs' channels) lives in its own object
        return _MergeRun(self.example_inputs).run(module)


class _MergeRun:
    """One run of :class:`MergeBranches` over one model."""

    def __init__(self, example_inputs: Any) -> None:
        self.example_inputs = example_inputs
        self._tracer_args = timm_notrace()
        #: blocks traced on their own (a region inside one of them is merged there, not at a parent)
        self._traced: set[str] = set()
        #: True when the model does not trace whole and every module is tried
        self._fallback = False
        self._input_channels: dict[str, list[tuple[int, torch.dtype, torch.device] | None]] = {}

    def run(self, module: nn.Module) -> PassResult:
        """Merge every region of ``module`` (edited in place) and describe what was done."""
        result = PassResult(module=module)
        self._input_channels = self._record_input_channels(module)
        seen_skips: set[tuple[tuple[str, ...], str]] = set()
        merged_blocks = 0
        blocks = self._candidate_blocks(module)
        for path in blocks:
            try:
                block = module.get_submodule(path) if path else module
            except AttributeError:  # inside a block that a deeper merge already replaced
                continue
            try:
                graph = MergeTracer(*self._tracer_args).trace(block)
            except Exception as exc:  # an untraceable block: its parent may still trace
                log.debug("merge_branches: %s does not trace (%s)", path or "<model>", exc)
                if not self._fallback:
                    result.skipped.append(Skip(PASS_NAME, (path or "<model>",), "branches found in the model's "
                                               f"trace, but the block does not trace on its own: {exc}"))
                continue
            self._traced.add(path)
            changes, skips, gm = self._merge_block(block, graph, path)
            for paths, reason in skips:
                # a parent block re-traces its children: report each refusal once, at the innermost block
                if (paths[1:], reason) not in seen_skips:
                    seen_skips.add((paths[1:], reason))
                    result.skipped.append(Skip(PASS_NAME, paths, reason))
            if gm is None or not changes:
                continue
            gm.train(block.training)
            replacement = merged_block_module(gm, block)
            if not path and not isinstance(block, torch.fx.GraphModule):
                # the branches meet in the model's own forward: merging would hand back another module in place
                # of the user's class (a GraphModule, which the safe weights format cannot save either, or a
                # Sequential); the outer class stays, and these branches with it
                for c in changes:
                    result.skipped.append(Skip(PASS_NAME, c.paths, f"{', '.join(c.paths[1:])} meet in the model's "
                                               f"own forward: merging them would replace its class "
                                               f"({type(block).__name__}) with a "
                                               f"{type(replacement).__name__}; left as written"))
                continue
            merged_blocks += 1
            result.changes.extend(changes)
            if path:
                set_submodule(module, path, replacement)
            else:
                result.module = replacement
                module = replacement
        # a skip of a region inside a block that merged later at a parent is moot
        merged = {p for c in result.changes for p in c.paths[1:]}
        result.skipped = [s for s in result.skipped if not (s.paths[1:] and set(s.paths[1:]) <= merged)]
        result.metrics["blocks_merged"] = merged_blocks
        result.metrics["branches_merged"] = sum(c.details.get("branches", 0) for c in result.changes)
        return result

    def _candidate_blocks(self, module: nn.Module) -> list[str]:
        """Paths of the modules to trace and merge in, innermost first.

        One trace of the whole model finds the regions; each region's block is the innermost
        module whose call holds all of its nodes (``nn_module_stack``). Tracing costs tens of
        milliseconds of fixed overhead, so only those blocks are traced again. When the whole
        model does not trace, every module that may hold a region is tried, children first.
        """
        try:
            graph = MergeTracer(*self._tracer_args).trace(module)
        except Exception as exc:
            log.debug("merge_branches: the model does not trace as a whole (%s); trying each module", exc)
            self._fallback = True
            # reversed pre-order visits every module after all of its descendants
            return [p for p, m in reversed(list(module.named_modules())) if self._worth_tracing(m)]
        analysis = _BlockAnalysis(graph, module, "")
        found: set[str] = set()
        for node, st in analysis.status.items():
            if not isinstance(st, _Term) or not (st.merges or st.convs >= 2):
                continue
            found.add(_common_scope(set(st.nodes) | {node}))
        found.update(_scope(n) for n in analysis.skip_nodes)  # traced again to report at the right block
        return sorted(found, key=lambda p: (-(p.count(".") + 1) if p else 0, p))

    def _worth_tracing(self, m: nn.Module) -> bool:
        """A module that may hold a region: not a leaf, and a conv, avg-pool or BatchNorm inside
        (one is enough: ``x + conv(x)``)."""
        if not any(True for _ in m.children()):
            return False
        leaves = self._tracer_args[0]
        if is_leaf_type(m) or is_batchnorm(m) or (leaves and isinstance(m, leaves)):
            return False
        return any(isinstance(sub, (nn.modules.conv._ConvNd, nn.modules.pooling._AvgPoolNd)) or is_batchnorm(sub)
                   for sub in m.modules())

    def _record_input_channels(self, module: nn.Module) -> dict[str, list[tuple[int, torch.dtype, torch.device] | None]]:
        """(channels, dtype, device) of each module's positional inputs in one forward of ``example_inputs``."""
        if self.example_inputs is None:
            return {}
        seen: dict[str, list[tuple[int, torch.dtype, torch.device] | None]] = {}
        handles = []
        for path, m in module.named_modules():
            def hook(mod: nn.Module, args: tuple, path: str = path) -> None:
                seen.setdefault(path, [(a.shape[1], a.dtype, a.device) if isinstance(a, torch.Tensor) and a.dim() > 1
                                       else None for a in args])
            handles.append(m.register_forward_pre_hook(hook))
        inputs = self.example_inputs if isinstance(self.example_inputs, tuple) else (self.example_inputs,)
        try:
            with torch.no_grad(), eval_mode(module):  # a training-mode forward would move running statistics
                module(*inputs)
        finally:
            for h in handles:
                h.remove()
        return seen

    def _input_info(self, node: torch.fx.Node, modules: dict[str, nn.Module],
                    path: str) -> tuple[int, torch.dtype, torch.device] | None:
        """(channels, dtype, device) of a region's input, when the graph or the example inputs tell it."""
        for _ in range(32):
            if node.op == "placeholder":
                placeholders = [n for n in node.graph.nodes if n.op == "placeholder"]
                recorded = self._input_channels.get(path, [])
                i = placeholders.index(node)
                return recorded[i] if i < len(recorded) else None
            if node.op == "call_module":
                m = modules[node.target]
                if isinstance(m, nn.modules.conv._ConvNd):
                    return m.out_channels, m.weight.dtype, m.weight.device
                if is_batchnorm(m) and m.running_mean is not None:
                    return int(m.num_features), m.running_mean.dtype, m.running_mean.device
            ins = node.all_input_nodes
            if len(ins) != 1:
                return None
            node = ins[0]
        return None

    def _merge_block(self, block: nn.Module, graph: torch.fx.Graph, path: str
                     ) -> tuple[list[Change], list[tuple[tuple[str, ...], str]], torch.fx.GraphModule | None]:
        """Merge the regions of one traced block: (changes, skips, the block's replacement or None)."""
        analysis = _BlockAnalysis(graph, block, path)
        skips = list(analysis.skips)
        changes: list[Change] = []
        tops = region_tops(analysis)
        if not any(st.merges or st.convs >= 2 for st in map(analysis.status.get, tops)):
            return changes, skips, None
        # the GraphModule shares the graph's nodes: the analysis stays valid for it
        gm = torch.fx.GraphModule(block, graph, class_name=f"Merged{type(block).__name__}")
        for node in tops:
            self._materialize(gm, analysis, node, path, changes, skips)
        if changes:
            # parameters and constant ops that only the merged branches read
            for n in reversed(list(gm.graph.nodes)):
                if not n.users and n.op in ("get_attr", "call_method", "call_function") and \
                        isinstance(analysis.status.get(n), _Const):
                    gm.graph.erase_node(n)
            gm.graph.lint()
            gm.delete_all_unused_submodules()
            gm.recompile()
        return changes, skips, gm

    def _materialize(self, gm: torch.fx.GraphModule, analysis: _BlockAnalysis, node: torch.fx.Node, path: str,
                     changes: list[Change], skips: list[tuple[tuple[str, ...], str]]) -> None:
        t = analysis.status[node]
        assert isinstance(t, _Term)
        if not worth_merging(t):
            return
        inner_scope = _common_scope(set(t.nodes) | {node})
        if inner_scope and (f"{path}.{inner_scope}" if path else inner_scope) in self._traced:
            return  # a deeper block holds this region; it merged there or was left with its reason
        where = path or "<model>"

        def fall_back(reason: str | None) -> None:
            if reason:
                skips.append(((where, *t.paths), reason))
            for inner in t.inputs:
                if inner is not node and isinstance(analysis.status.get(inner), _Term):
                    self._materialize(gm, analysis, inner, path, changes, skips)

        ready = mergeable(t, lambda: self._input_info(t.root, analysis.modules, path),
                          lambda user: _is_inplace(user, analysis.modules))
        if not isinstance(ready, _Term):
            return fall_back(ready)
        t = ready
        if t.linear:  # Linears (RepViT's head and its distillation head): one Linear, a dense (out, in) weight
            t = _regroup(t, 1)
            conv: nn.Module = nn.Linear(t.cin, t.cout, bias=True, device=t.device, dtype=t.dtype)
            w32 = t.weight.reshape(t.cout, t.cin).to(t.dtype)
        else:
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[t.rank]
            conv = cls(t.cin, t.cout, t.kernel, stride=t.stride, padding=t.lo, dilation=t.dilation, groups=t.groups,
                       bias=True, device=t.device, dtype=t.dtype)
            w32 = t.weight.to(t.dtype)
        with torch.no_grad():
            conv.weight.copy_(w32)
            conv.bias.copy_(t.bias.to(t.dtype))
        conv.weight.requires_grad_(t.requires_grad)
        conv.bias.requires_grad_(t.requires_grad)
        name = _free_name(gm, "merged_linear" if t.linear else "merged_conv")
        gm.add_module(name, conv)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (t.root,))
        node.replace_all_uses_with(new)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for n in sorted(set(t.nodes), key=order.__getitem__, reverse=True):
            if not n.users:
                gm.graph.erase_node(n)
        kernel = "x".join(map(str, t.kernel))
        what = f"merged {t.branches} branches of {where}" if t.merges else f"composed the conv chain of {where}"
        module_paths = tuple(sorted(set(t.paths), key=t.paths.index))
        into = "one Linear" if t.linear else f"one {kernel} conv (groups={t.groups}, stride={tuple(t.stride)})"
        changes.append(Change(
            PASS_NAME, "merge_branches", (where, *module_paths),
            f"{what} ({', '.join(module_paths)}) into {into} at {where + '.' if path else ''}{name}",
            details={"block": where, "conv": name, "kernel": t.kernel, "groups": t.groups, "stride": t.stride,
                     "branches": t.branches}))


def _free_name(gm: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def merge_branches(model: nn.Module | ExportedProgram, *, inplace: bool = False,
                   example_inputs: Any = None) -> PassResult:
    """Merge the parallel linear branches of re-parameterizable blocks into one conv each.

    Where several branches read the same tensor and meet at an add (chains of adds, ``sum`` of a
    list, a subtraction, a per-channel scale of the sum included), each branch a conv (+BatchNorm),
    a BatchNorm alone (identity), an avg-pool or a per-channel scale, the branches become one conv:
    kernels zero-padded to the covering kernel, the identity as a one-hot kernel, the avg-pool as a
    uniform kernel, the scale as a diagonal kernel, summed in float64 (see the module docstring).
    A pointwise conv followed by a kxk conv becomes one kxk conv where that is exact and no
    costlier. Run it on an eval-mode model, after :func:`normfold.fold_batchnorm` or on its own.

    ``example_inputs`` is only needed where no op tells the channel count of a region's input
    (an identity plus an avg-pool, nothing else). Returns a :class:`PassResult` whose ``changes``
    name each merged block and its merged modules and whose ``skipped`` give the reason for every
    branch set left alone.

    Given a ``torch.export.ExportedProgram``, merges at the ATen level
    (:mod:`normfold.passes.merge_program`, the same algebra) and returns an
    :class:`~normfold.passes.fold.program_pass.ExportedPassResult` whose ``program`` is the merged
    program; ``example_inputs`` is not needed there (every node carries its shape).
    """
    if isinstance(model, ExportedProgram):
        return merge_program(model, inplace=inplace)
    return MergeBranches(example_inputs=example_inputs)(model, inplace=inplace)
