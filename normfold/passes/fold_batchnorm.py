"""Fold eval-mode BatchNorm into the Conv / ConvTranspose / Linear that feeds it.

Math. In eval a BatchNorm is the per-channel affine ``y = s * x + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``
(:func:`normfold.norms.batchnorm_affine`). If ``x = W * u + b`` is the output
of a linear producer whose output-channel axis is the BatchNorm's channel
axis, then ``y = (s W) * u + (s b + t)``:

* Conv{1,2,3}d: weight ``(C_out, C_in/groups, *k)``; scale axis 0. Groups,
  stride, dilation and padding mode do not matter: every output channel has
  its own filter.
* ConvTranspose{1,2,3}d: weight ``(C_in, C_out/groups, *k)``; output channel
  ``o = g * (C_out/groups) + j`` is produced by ``weight[g*C_in/groups:(g+1)*C_in/groups, j]``,
  so the weight is viewed as ``(groups, C_in/groups, C_out/groups, *k)`` and
  scaled along axis 2 by ``s`` viewed as ``(groups, 1, C_out/groups)``.
* Linear: weight ``(out, in)``; scale axis 0. Exact only when the BatchNorm's
  channel axis is the Linear's output-feature axis, i.e. a BatchNorm1d on a
  2-D ``(N, C)`` tensor. On ``(N, L, C)`` a BatchNorm1d normalizes axis 1,
  not the features: that case is skipped, never folded along the wrong axis.

A missing bias is ``b = 0`` and gets created. The arithmetic is done in
float64 and cast back to the producer's dtype; a result that does not fit
that dtype (float16 and bfloat16 overflow) is skipped.

Rules. The dataflow comes from :mod:`normfold.graph`; the edit is made on the
modules, so the caller gets back their own class (the BatchNorm becomes
``nn.Identity``, or the drop/act a timm BatchNormAct2d carried). Only a
functional ``F.batch_norm`` with constant running statistics needs a graph
rewrite, and then the result is a ``torch.fx.GraphModule``. Every BatchNorm
that is not folded is listed in ``skipped`` with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normfold.errors import TraceError
from normfold.graph import GNode, ModelGraph, build_graph, describe_node
from normfold.norms import (BatchNormAffine, batchnorm_affine, batchnorm_remnant, is_batchnorm,
                            set_submodule)
from normfold.passes.base import Change, Pass, PassResult, Skip

__all__ = ["FoldBatchNorm", "fold_batchnorm", "producer_problem", "fold_into_output_channels"]

log = logging.getLogger(__name__)

_CONV_FORWARDS = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}
_CONVT_FORWARDS = {nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward}
#: Conv subclasses whose forward pads and then calls F.conv with self.weight / self.bias:
#: still linear in (weight, bias), so output-channel scaling is exact.
_PADDING_CONV_NAMES = {"Conv2dSame"}

_FUNCTIONAL_BN = {F.batch_norm, torch.batch_norm}


def _activation_name(graph: ModelGraph, node: GNode) -> str | None:
    """Name of an activation sitting between producer and BN, for a precise skip reason."""
    if node.op == "module":
        m = graph.modules.get(node.target)
        if m is not None and type(m).__module__.startswith("torch.nn.modules.activation"):
            return type(m).__name__
    if node.op in ("function", "method"):
        t = node.target
        name = t if isinstance(t, str) else getattr(t, "__name__", "")
        if name.strip("_") in {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
                               "leaky_relu", "elu", "mish", "softplus"}:
            return name.strip("_")
    return None


def producer_problem(producer: nn.Module) -> str | None:
    """Why ``producer`` cannot take an output-channel affine, or None when it can."""
    fwd = type(producer).forward
    if isinstance(producer, nn.modules.conv._ConvTransposeNd):
        if fwd not in _CONVT_FORWARDS:
            return f"{type(producer).__name__} overrides forward()"
    elif isinstance(producer, nn.modules.conv._ConvNd):
        if fwd not in _CONV_FORWARDS and type(producer).__name__ not in _PADDING_CONV_NAMES:
            return f"{type(producer).__name__} overrides forward() (run fold_batchnorm after baking its weight)"
    elif isinstance(producer, nn.Linear):
        if fwd is not nn.Linear.forward:
            return f"{type(producer).__name__} overrides forward()"
    else:
        return f"{type(producer).__name__} is not a Conv, ConvTranspose or Linear"
    if torch.nn.utils.parametrize.is_parametrized(producer):
        return "its weight is parametrized (weight_norm/spectral_norm): run fold_weight_norm first"
    if hasattr(producer, "weight_g") or hasattr(producer, "weight_orig"):
        return "its weight is recomputed by a weight_norm/spectral_norm hook: run fold_weight_norm first"
    if not isinstance(producer.weight, torch.Tensor) or not producer.weight.is_floating_point():
        return "its weight is not a floating-point tensor"
    return None


def _out_channels(producer: nn.Module) -> int:
    if isinstance(producer, nn.Linear):
        return producer.out_features
    return producer.out_channels


#: float64 working set of one step of :func:`fold_into_output_channels` (8 MiB): the fold's extra
#: memory stays bounded by this instead of growing with the largest layer.
_CHUNK_ELEMS = 1 << 20


def _weight_blocks(producer: nn.Module, v: torch.Tensor, s: torch.Tensor) -> list[tuple[int, int, torch.Tensor | None]]:
    """(first row, end row, scale) blocks of the weight viewed as ``v`` = (rows, cols, k).

    Conv/Linear: a row is an output channel, scale ``s[row]`` (None: take it per row).
    ConvTranspose: the rows of group ``g`` share the scale ``s[g*C_out/g:(g+1)*C_out/g]`` along cols.
    """
    if isinstance(producer, nn.modules.conv._ConvTransposeNd):
        g = producer.groups
        rows_g, cols = v.shape[0] // g, v.shape[1]
        return [(gi * rows_g, (gi + 1) * rows_g, s[gi * cols:(gi + 1) * cols].view(1, cols, 1)) for gi in range(g)]
    return [(0, v.shape[0], None)]


def fold_into_output_channels(producer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> str | None:
    """Make ``producer`` compute ``scale * producer(x) + shift`` per output channel, in place.

    ``scale`` and ``shift`` are float64. Each weight is multiplied in float64
    and rounded once to its own dtype, a block of rows at a time so that the
    extra memory is one block, not a float64 copy of the layer. Returns None on
    success, or the reason the fold was refused (the module is left untouched then).
    """
    w = producer.weight
    dtype, device = w.dtype, w.device
    s = scale.to(device=device, dtype=torch.float64)
    t = shift.to(device=device, dtype=torch.float64)
    wd = w.detach()
    work = wd if wd.is_contiguous() else wd.contiguous()
    if isinstance(producer, nn.modules.conv._ConvTransposeNd):
        v = work.view(work.shape[0], work.shape[1], -1)
    else:
        v = work.view(work.shape[0], 1, -1)
    blocks = _weight_blocks(producer, v, s)
    per_row = s.view(-1, 1, 1)

    # Overflow check before touching anything. Rounding is monotonic, so the largest
    # |w * s| in float64 overflows the weight's dtype exactly when any product does; the
    # largest product is max|w| (exact in any dtype) times |s| per (row, col). amax/amin
    # propagate NaN and are several times faster than vector_norm(ord=inf) on CPU.
    row_max = torch.maximum(v.amax(dim=2), -v.amin(dim=2)).to(torch.float64)
    largest = torch.zeros((), dtype=torch.float64, device=device)  # an empty weight cannot overflow
    if v.numel() and len(blocks) == 1 and blocks[0][2] is None:  # Conv / Linear: one scale per row
        largest = (row_max.view(-1) * s.abs()).max()
    elif v.numel():
        for a, b, sc in blocks:
            prod = row_max[a:b] * sc[..., 0].abs()
            largest = torch.maximum(largest, prod.max() if prod.numel() else largest)
    b64 = producer.bias.detach().to(torch.float64) if producer.bias is not None else torch.zeros_like(s)
    new_b = b64 * s + t
    cast_b = new_b.to(dtype)
    if not bool(torch.isfinite(largest.to(dtype)) & torch.isfinite(cast_b).all()):
        if torch.isfinite(largest) and torch.isfinite(new_b).all():
            return f"the folded weights overflow {str(dtype).replace('torch.', '')}"
        return "the folded weights are not finite (running_var + eps <= 0 or inf/NaN statistics)"

    rows_per_step = max(1, _CHUNK_ELEMS // max(1, v.shape[1] * v.shape[2]))
    if len(blocks) == 1 and blocks[0][2] is None and v.shape[0] <= rows_per_step:
        blocks = []  # the whole layer is one step: no slicing (most layers; saves per-layer overhead)
        with torch.no_grad():
            buf = v.to(torch.float64)
            buf.mul_(per_row)
            v.copy_(buf)
    else:
        buf = torch.empty((min(rows_per_step, v.shape[0]), *v.shape[1:]), dtype=torch.float64, device=device)
    with torch.no_grad():
        for a, b, sc in blocks:
            for i in range(a, b, rows_per_step):
                j = min(b, i + rows_per_step)
                out = buf[: j - i]
                # widen exactly, multiply in float64, round once on the way back; three plain
                # copy/mul kernels are about twice as fast on CPU as one mixed-dtype torch.mul
                out.copy_(v[i:j])
                out.mul_(sc if sc is not None else per_row[i:j])
                v[i:j].copy_(out)
        if work is not wd:
            wd.copy_(work)
        if producer.bias is not None:
            producer.bias.copy_(cast_b)
        else:
            producer.bias = nn.Parameter(cast_b, requires_grad=w.requires_grad)
    return None


@dataclass
class _Candidate:
    bn_path: str
    producer_path: str | None
    reason: str | None


class FoldBatchNorm(Pass):
    """Fold every foldable eval-mode BatchNorm into the layer before it; see the module docstring."""

    name = "fold_batchnorm"

    def __init__(self, *, example_inputs: Any = None, infer_inputs: bool = False) -> None:
        self.example_inputs = example_inputs
        #: when no example_inputs were given, infer them from the first layer only if a step needs them
        self.infer_inputs = infer_inputs

    def call(self, module: nn.Module) -> PassResult:
        # Shapes cost a forward pass and only Linear -> BatchNorm needs them: propagate lazily.
        try:
            graph = build_graph(module, self.example_inputs, shapes=False)
        except TraceError:
            inputs = self._inferred_inputs(module)
            if inputs is None:
                raise
            graph = build_graph(module, inputs, shapes=False)
        result = PassResult(module=module)
        shared = _shared_parameters(module)
        seen_bn: set[str] = set()
        for node in list(graph.nodes):
            if node.op == "module" and is_batchnorm(graph.modules[node.target]):
                if node.target in seen_bn:
                    continue
                seen_bn.add(node.target)
                self._fold_module_bn(graph, node, shared, result)
        functional = [n for n in graph.nodes if n.op == "function" and n.target in _FUNCTIONAL_BN]
        if functional:
            if graph.graph_module is None:
                for n in functional:
                    result.skipped.append(Skip(self.name, (n.name,), "a functional batch_norm in a model torch.fx "
                                               "cannot trace: only module BatchNorms are folded there"))
            else:
                folded_any = False
                for n in functional:
                    folded_any |= self._fold_functional_bn(graph, n, shared, result)
                if folded_any:
                    gm = graph.graph_module
                    gm.graph.eliminate_dead_code()
                    gm.graph.lint()
                    gm.recompile()
                    result.module = gm
        # BatchNorms the forward never calls are reported too: nothing folds into them.
        for path, m in module.named_modules():
            if is_batchnorm(m) and path not in seen_bn and path not in graph.calls:
                if not any(path in c.paths for c in result.changes):
                    result.skipped.append(Skip(self.name, (path,), "not called in forward()"))
        result.metrics["graph_source"] = graph.source
        return result

    # -- module BatchNorm ---------------------------------------------------------------------
    def _fold_module_bn(self, graph: ModelGraph, node: GNode, shared: dict[int, list[str]], result: PassResult) -> None:
        bn_path = node.target
        bn = graph.modules[bn_path]
        skip = lambda reason, *extra: result.skipped.append(Skip(self.name, (bn_path, *extra), reason))  # noqa: E731
        affine = batchnorm_affine(bn)
        if isinstance(affine, str):
            return skip(affine)
        if graph.call_count(bn_path) > 1:
            return skip(f"called {graph.call_count(bn_path)} times in forward(); folding would change every call")
        if bn._forward_hooks or bn._forward_pre_hooks:
            return skip("has forward hooks that would be lost")
        if not node.args:
            return skip("its input could not be traced")
        src = node.args[0]
        producer_path, reason = self._check_producer(graph, src, affine, node, shared)
        if reason is not None:
            return skip(reason, *( (producer_path,) if producer_path else () ))
        producer = graph.modules[producer_path]
        reason = fold_into_output_channels(producer, affine.scale, affine.shift)
        if reason is not None:
            return skip(reason, producer_path)
        remnant = batchnorm_remnant(bn)
        set_submodule(graph.root, bn_path, remnant)
        if graph.has_graph_module:
            # The GraphModule holds its own references to the leaf modules; keep it in step in case
            # a functional fold makes it the returned module.
            set_submodule(graph.graph_module, bn_path, remnant)
        result.changes.append(Change(self.name, "fold", (bn_path, producer_path),
                                     f"folded {bn_path} ({type(bn).__name__}) into {producer_path} "
                                     f"({type(producer).__name__})",
                                     {"channels": affine.num_features}))

    def _check_producer(self, graph: ModelGraph, src: GNode, affine: BatchNormAffine, bn_node: GNode,
                        shared: dict[int, list[str]]) -> tuple[str | None, str | None]:
        if src.op != "module":
            act = _activation_name(graph, src)
            if act is not None:
                inner = src.args[0] if src.args else None
                what = describe_node(graph, inner) if inner is not None else "its input"
                return None, f"an activation ({act}) sits between {what} and the BatchNorm"
            return None, f"its input is {describe_node(graph, src)}, not a Conv, ConvTranspose or Linear"
        producer_path = src.target
        producer = graph.modules[producer_path]
        act = _activation_name(graph, src)
        if act is not None:
            inner = src.args[0] if src.args else None
            what = describe_node(graph, inner) if inner is not None else "its input"
            return producer_path, f"an activation ({act}) sits between {what} and the BatchNorm"
        problem = producer_problem(producer)
        if problem is not None:
            return producer_path, f"producer {producer_path}: {problem}"
        if graph.call_count(producer_path) > 1:
            return producer_path, (f"producer {producer_path} is called {graph.call_count(producer_path)} times; "
                                   "changing it would change every call")
        users = [u for u in src.users]
        if len(users) > 1:
            others = ", ".join(describe_node(graph, u) for u in users if u is not bn_node)
            return producer_path, f"producer {producer_path} output has {len(users)} users (also read by {others})"
        if graph.external_param_reads(producer_path):
            return producer_path, (f"the parameters of {producer_path} are read elsewhere in forward() "
                                   f"({', '.join(graph.external_param_reads(producer_path))})")
        for pname, p in producer.named_parameters(recurse=False):
            owners = shared.get(id(p), [])
            if len(owners) > 1:
                return producer_path, f"{producer_path}.{pname} is shared with {', '.join(o for o in owners if not o.startswith(producer_path + '.'))}"
        out_c = _out_channels(producer)
        if out_c != affine.num_features:
            return producer_path, (f"channel mismatch: {producer_path} has {out_c} output channels, the "
                                   f"BatchNorm {affine.num_features}")
        if isinstance(producer, nn.Linear):
            if src.shape is None:
                if not graph.example_inputs:
                    graph.example_inputs = self._inferred_inputs(graph.root)
                graph.ensure_shapes()
            shape = src.shape
            if shape is None:
                return producer_path, ("Linear -> BatchNorm needs the tensor rank to know the BN channel axis; "
                                       "pass example_inputs (or --input-shape)")
            if len(shape) != 2:
                return producer_path, (f"the BatchNorm normalizes axis 1 of a {len(shape)}-D tensor {tuple(shape)} "
                                       "but the Linear writes its features on the last axis")
        return producer_path, None

    def _inferred_inputs(self, module: nn.Module) -> tuple | None:
        if self.example_inputs is not None or not self.infer_inputs:
            return None
        return _maybe_infer_inputs(module)

    # -- functional F.batch_norm ------------------------------------------------------------------
    def _fold_functional_bn(self, graph: ModelGraph, node: GNode, shared: dict[int, list[str]],
                            result: PassResult) -> bool:
        gm = graph.graph_module
        fx_node = node.fx_node
        skip = lambda reason, *extra: result.skipped.append(Skip(self.name, (fx_node.name, *extra), reason))  # noqa: E731
        try:
            norm = fx_node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
            kw = dict(norm.kwargs) if norm is not None else None
        except Exception:
            kw = None
        if kw is None:
            names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
            kw = dict(zip(names, fx_node.args))
            kw.update(fx_node.kwargs)
        if kw.get("training", False) is not False:
            skip("functional batch_norm with training=True (or a training flag only known at run time)")
            return False
        tensors: dict[str, torch.Tensor | None] = {}
        for key in ("running_mean", "running_var", "weight", "bias"):
            v = kw.get(key)
            if v is None:
                tensors[key] = None
            elif isinstance(v, torch.fx.Node) and v.op == "get_attr":
                tensors[key] = _fetch_attr(gm, v.target)
            else:
                skip(f"functional batch_norm's {key} is computed in forward(), not a constant")
                return False
        if tensors["running_mean"] is None or tensors["running_var"] is None:
            skip("functional batch_norm without running statistics normalizes with batch statistics")
            return False
        eps = float(kw.get("eps", 1e-5))
        mean = tensors["running_mean"].detach().double()
        var = tensors["running_var"].detach().double()
        n = mean.numel()
        w = tensors["weight"].detach().double() if tensors["weight"] is not None else torch.ones_like(mean)
        b = tensors["bias"].detach().double() if tensors["bias"] is not None else torch.zeros_like(mean)
        scale = w / torch.sqrt(var + eps)
        affine = BatchNormAffine(scale=scale, shift=b - mean * scale, mean=mean, var=var, weight=w, bias=b, eps=eps)
        src = node.args[0] if node.args else None
        if src is None:
            skip("its input could not be traced")
            return False
        producer_path, reason = self._check_producer(graph, src, affine, node, shared)
        if reason is None and graph.external_param_reads(producer_path):
            reason = "producer parameters are read elsewhere"
        if reason is not None:
            skip(reason, *((producer_path,) if producer_path else ()))
            return False
        producer = graph.modules[producer_path]
        reason = fold_into_output_channels(producer, affine.scale, affine.shift)
        if reason is not None:
            skip(reason, producer_path)
            return False
        inp = fx_node.args[0] if fx_node.args else kw["input"]
        fx_node.replace_all_uses_with(inp)
        gm.graph.erase_node(fx_node)
        result.changes.append(Change(self.name, "fold", (fx_node.name, producer_path),
                                     f"folded functional batch_norm {fx_node.name} into {producer_path} "
                                     f"({type(producer).__name__}); the result is a torch.fx.GraphModule",
                                     {"channels": n}))
        return True


def _fetch_attr(root: nn.Module, target: str) -> torch.Tensor:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _shared_parameters(module: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every module path that owns it (tied weights have several)."""
    owners: dict[int, list[str]] = {}
    for mpath, m in module.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), [])
            if mpath not in owners[id(p)]:
                owners[id(p)].append(mpath)
    return owners


def fold_batchnorm(model: nn.Module, *, inplace: bool = False, example_inputs: Any = None,
                   forward: bool = True, weight_standardization: bool = True) -> PassResult:
    """Fold eval-mode BatchNorms into the Conv/ConvTranspose/Linear before them, or after them.

    ``example_inputs`` (a tensor or tuple of positional inputs) gives tensor
    ranks for Linear -> BatchNorm1d and lets torch.export trace models torch.fx
    cannot; when omitted, an input shape is inferred from the first layer if
    possible. With ``forward`` (default), BatchNorms the direct fold leaves are
    folded through channel-wise ops (reshape, permute, pools, ...) into the
    layer before them, or forward into the layer after them
    (:mod:`normfold.passes.fold_batchnorm_forward`); with
    ``weight_standardization`` (default), timm StdConv2d / ScaledStdConv2d are
    first baked into plain convs (:mod:`normfold.passes.weight_standardization`).
    Given a ``torch.export.ExportedProgram``, folds it at the ATen level
    (:mod:`normfold.passes.fold_exported`; the new program is ``result.program``).
    Returns a :class:`PassResult`; see the module docstring for the math.
    """
    if isinstance(model, torch.export.ExportedProgram):
        from normfold.passes.fold_exported import fold_exported_program

        return fold_exported_program(model, inplace=inplace, forward=forward,
                                     weight_standardization=weight_standardization)
    if forward or weight_standardization:
        from normfold.passes.fold_batchnorm_forward import FoldBatchNormAll

        return FoldBatchNormAll(example_inputs=example_inputs, forward=forward,
                                weight_standardization=weight_standardization)(model, inplace=inplace)
    return FoldBatchNorm(example_inputs=example_inputs, infer_inputs=True)(model, inplace=inplace)


def _maybe_infer_inputs(model: nn.Module) -> tuple | None:
    from normfold.inputs import infer_input_shapes, model_dtype_device, random_inputs

    try:
        inferred = infer_input_shapes(model)
    except Exception:
        return None
    dtype, device = model_dtype_device(model)
    return random_inputs(inferred.shapes, dtype=dtype, device=device, integer_high=inferred.integer_high)
