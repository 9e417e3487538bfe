"""Probes no output comparison runs: batch independence, training mode, a fixed batch, the ONNX norm ops.

* **Batch independence.** In eval, a sample's output must not depend on the
  other samples in its batch, nor on the batch size. The probe runs one
  sample alone, then in a batch of 2 (at position 0) and a batch of 8 (at the
  last position), each time with different seeded batch-mates, and compares
  the sample's rows. A BatchNorm left in training mode normalizes with batch
  statistics and fails this; so does a graph whose batch is fixed, or a
  reshape that mixes the batch into other axes.
* **Training mode, eager.** Every module whose ``training`` flag is set, the
  mode-sensitive ones (BatchNorm, Dropout, ...) named first.
* **Training mode, ONNX.** A ``BatchNormalization`` with ``training_mode=1`` (or
  the running-statistics outputs of opset < 14), a ``Dropout`` whose
  ``training_mode`` input is true or computed, random-number ops.
* **Batch dimension.** The first dimension of every graph input must be
  symbolic: a fixed 1 means every batch but 1 fails.
* **Norm-op lint.** Opset semantics (``GroupNormalization`` before opset 21
  had per-group scale and bias, unlike PyTorch; ``RMSNormalization`` needs 23),
  and ``BatchNormalization`` nodes left in the graph (a fold that did not
  happen, or BatchNorms a fold had to leave: each costs a pass over its input).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from normfold.check.compare import OutputComparison, compare_flat
from normfold.inputs import INPUT_MEAN, INPUT_STD
from normfold.tolerances import Tolerance

__all__ = ["Finding", "training_modules", "onnx_training_findings", "batch_dim_findings", "norm_op_lint",
           "BatchIndependence", "batch_independence", "node_scope", "iter_nodes", "DEFAULT_BATCH_SIZES"]

#: batch sizes of the batch-independence probe: alone, with one batch-mate, in a larger batch
DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 2, 8)

_RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial"}
_MODE_SENSITIVE = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.MultiheadAttention)


@dataclass
class Finding:
    """One thing a probe found: ``severity`` is ``"error"`` (fails the check) or ``"warning"`` (reported only)."""

    severity: str
    message: str
    where: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "message": self.message, "where": self.where}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Finding":
        return cls(severity=d["severity"], message=d["message"], where=d.get("where", ""))

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


# -------------------------------------------------------------------------------------------------
# training mode


def _mode_sensitive(m: nn.Module) -> bool:
    if isinstance(m, _MODE_SENSITIVE):
        return True
    name = type(m).__name__
    return name in {"DropPath", "StochasticDepth", "DropBlock2d", "FrozenBatchNorm2d"} or "Dropout" in name


def training_modules(model: nn.Module) -> list[Finding]:
    """Every module left in training mode: an error each, mode-sensitive layers first."""
    sensitive, other = [], []
    for name, m in model.named_modules():
        if not m.training:
            continue
        path = name or "<model>"
        if _mode_sensitive(m):
            what = ("normalizes with the batch's statistics and updates its running statistics"
                    if isinstance(m, nn.modules.batchnorm._NormBase) else "drops activations at random")
            sensitive.append(Finding("error", f"{type(m).__name__} in training mode: {what}", path))
        else:
            other.append(path)
    findings = list(sensitive)
    if other:
        shown = ", ".join(other[:6]) + (f" and {len(other) - 6} more" if len(other) > 6 else "")
        findings.append(Finding("error", f"{len(other)} other module(s) in training mode ({shown}); a forward() may "
                                         "branch on self.training", "training flags"))
    return findings


# -------------------------------------------------------------------------------------------------
# ONNX graph walking


def iter_nodes(proto: Any) -> Iterable[Any]:
    """Every node of the main graph, its subgraphs (If/Loop/Scan) and the model's local functions."""
    def walk(graph: Any) -> Iterable[Any]:
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == attr.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == attr.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)
    yield from walk(proto.graph)
    for fn in getattr(proto, "functions", []):
        yield from fn.node


def node_scope(node: Any) -> str:
    """The innermost module path a node came from, or ``""``.

    The dynamo exporter records it in the ``pkg.torch.onnx.name_scopes``
    metadata; the TorchScript exporter (``dynamo=False``) in the node's name,
    ``/layer1/layer1.0/conv1/Conv``.
    """
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return ""
            # [root, module paths from outer to inner..., op name]: the innermost module is the one before the op
            mods = [s for s in scopes[:-1] if s]
            return mods[-1] if mods else ""
    name = node.name or ""
    if name.startswith("/") and name.count("/") >= 2:
        path = ""
        for comp in name.strip("/").split("/")[:-1]:
            if path and comp.startswith(path + "."):
                path = comp  # the exporter repeats the full path of list/sequential children: layer1/layer1.0
            else:
                path = f"{path}.{comp}" if path else comp
        return path
    return ""


def _where(node: Any) -> str:
    scope = node_scope(node)
    label = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"
    return f"{label} (from {scope})" if scope else label


def _constants(proto: Any) -> dict[str, Any]:
    """Values of initializers and Constant nodes by name (scalars and small tensors only)."""
    from onnx import numpy_helper

    values: dict[str, Any] = {}
    for init in proto.graph.initializer:
        if _numel(init.dims) <= 16 and not init.data_location:
            try:
                values[init.name] = numpy_helper.to_array(init)
            except Exception:  # an external or unusual tensor: not a flag
                pass
    for node in iter_nodes(proto):
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and _numel(a.t.dims) <= 16:
                    try:
                        values[node.output[0]] = numpy_helper.to_array(a.t)
                    except Exception:
                        pass
                elif a.name in ("value_int", "value_float"):
                    values[node.output[0]] = a.i if a.name == "value_int" else a.f
    return values


def _numel(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def onnx_opset(proto: Any) -> int:
    """The model's default-domain opset."""
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def onnx_training_findings(proto: Any) -> list[Finding]:
    """Training-mode leftovers in an ONNX graph (see the module docstring)."""
    consts = _constants(proto)
    opset = onnx_opset(proto)
    findings: list[Finding] = []
    for node in iter_nodes(proto):
        op = node.op_type
        if op == "BatchNormalization":
            mode = next((a.i for a in node.attribute if a.name == "training_mode"), 0)
            if mode:
                findings.append(Finding("error", "training_mode=1: it normalizes with each batch's statistics "
                                                 "(the model was exported in training mode)", _where(node)))
            elif opset < 14 and len([o for o in node.output if o]) > 1:
                findings.append(Finding("error", "computes running statistics (training outputs of opset < 14)",
                                        _where(node)))
        elif op == "Dropout":
            flag_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if flag_name is None:
                findings.append(Finding("warning", "Dropout left in the graph (inert without training_mode, "
                                                   "but a sign the model was exported in training mode)", _where(node)))
            elif flag_name in consts:
                if bool(consts[flag_name]):
                    findings.append(Finding("error", "Dropout with training_mode=true: a runtime that honours it "
                                                     "drops activations at random (onnxruntime's inference build "
                                                     "removes it, others may not)", _where(node)))
                else:
                    findings.append(Finding("warning", "Dropout left in the graph with training_mode=false (inert)",
                                            _where(node)))
            else:
                findings.append(Finding("error", "Dropout whose training_mode is computed at run time",
                                        _where(node)))
        elif op in _RANDOM_OPS:
            findings.append(Finding("error", f"random-number op {op} in an inference graph (a dropout or "
                                             "stochastic depth traced in training mode?)", _where(node)))
    return findings


def batch_dim_findings(proto: Any) -> list[Finding]:
    """Graph inputs whose first dimension is fixed (errors), or without a shape (warnings)."""
    from normfold.export import batch_dims, onnx_input_names

    findings: list[Finding] = []
    for name, d in zip(onnx_input_names(proto), batch_dims(proto)):
        if isinstance(d, int):
            findings.append(Finding("error", f"the batch dimension is fixed to {d}: any other batch size fails; "
                                             "export with a dynamic batch (normfold export does by default)",
                                    f"input {name!r}"))
        elif d is None:
            findings.append(Finding("warning", "no shape or rank 0: no batch dimension to check", f"input {name!r}"))
    return findings


def norm_op_lint(proto: Any, candidate: nn.Module | None = None) -> list[Finding]:
    """Lint the graph's normalization ops: opset semantics and BatchNormalization left behind."""
    opset = onnx_opset(proto)
    findings: list[Finding] = []
    bns: list[Any] = []
    for node in iter_nodes(proto):
        if node.domain not in ("", "ai.onnx"):
            continue
        op = node.op_type
        if op == "GroupNormalization" and opset < 21:
            findings.append(Finding("error", f"GroupNormalization at opset {opset}: before opset 21 its scale and "
                                             "bias are per group, PyTorch's GroupNorm is per channel; export at "
                                             "opset 21 or later", _where(node)))
        elif op == "RMSNormalization" and opset < 23:
            findings.append(Finding("error", f"RMSNormalization at opset {opset}: the op exists from opset 23",
                                    _where(node)))
        elif op == "LayerNormalization" and opset < 17:
            findings.append(Finding("error", f"LayerNormalization at opset {opset}: the op exists from opset 17",
                                    _where(node)))
        elif op == "BatchNormalization":
            bns.append(node)
    if bns:
        scopes = sorted({node_scope(n) or n.name for n in bns})
        shown = ", ".join(scopes[:6]) + (f" and {len(scopes) - 6} more" if len(scopes) > 6 else "")
        if candidate is not None:
            known = {n for n, m in candidate.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
            unexplained = [s for s in scopes if s and s not in known]
        else:
            unexplained = []
        msg = (f"{len(bns)} BatchNormalization node(s) left after export ({shown}): each is an extra pass over its "
               "input at inference; `normfold fold` folds the ones that can be folded and says why it left the others")
        if unexplained:
            msg += f"; not a BatchNorm module of the candidate: {', '.join(unexplained[:6])}"
        findings.append(Finding("warning", msg, "BatchNormalization"))
    if candidate is not None:
        gn = any(isinstance(m, nn.GroupNorm) for m in candidate.modules())
        if gn and opset < 21:
            findings.append(Finding("warning", f"GroupNorm exported at opset {opset} as InstanceNormalization + "
                                               "Reshape/Mul/Add; opset 21 has a native GroupNormalization",
                                    "GroupNorm"))
        rms = hasattr(nn, "RMSNorm") and any(isinstance(m, nn.RMSNorm) for m in candidate.modules())
        if rms and opset < 23:
            findings.append(Finding("warning", f"RMSNorm exported at opset {opset} as elementwise ops; opset 23 has "
                                               "a native RMSNormalization", "RMSNorm"))
    return findings


# -------------------------------------------------------------------------------------------------
# batch independence


@dataclass
class BatchIndependence:
    """The batch-independence probe's result for one stage (eager or onnx)."""

    passed: bool
    batch_sizes: list[int]
    comparisons: dict[int, list[OutputComparison]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    note: str = ""

    @property
    def max_abs(self) -> float:
        vals = [c.max_abs for cs in self.comparisons.values() for c in cs]
        return max(vals) if vals else 0.0

    def failures(self) -> list[str]:
        out = [f"batch {b}: {e}" for b, e in self.errors.items()]
        for b, cs in self.comparisons.items():
            for c in cs:
                if not c.passed:
                    out.append(f"batch {b}: {c.name}: the sample's output changed (max abs {c.max_abs:.3g}; "
                               f"{c.problem})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "batch_sizes": self.batch_sizes,
                "comparisons": {str(b): [c.to_dict() for c in cs] for b, cs in self.comparisons.items()},
                "errors": {str(b): e for b, e in self.errors.items()}, "note": self.note}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BatchIndependence":
        return cls(passed=d["passed"], batch_sizes=list(d["batch_sizes"]),
                   comparisons={int(b): [OutputComparison.from_dict(c) for c in cs]
                                for b, cs in d.get("comparisons", {}).items()},
                   errors={int(b): e for b, e in d.get("errors", {}).items()}, note=d.get("note", ""))


def _batch_axis_inputs(inputs: Sequence[Any]) -> tuple[int, list[bool]]:
    batch = next((int(t.shape[0]) for t in inputs if isinstance(t, torch.Tensor) and t.dim() >= 1), 0)
    return batch, [isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch for t in inputs]


def _mates(sample: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` batch-mates like ``sample`` (1, ...): the seeded input distribution, or token ids in its range."""
    shape = (n,) + tuple(sample.shape[1:])
    if sample.dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float64) * INPUT_STD + INPUT_MEAN
        return t.to(dtype=sample.dtype, device=sample.device)
    if sample.dtype == torch.bool:
        return (torch.rand(shape, generator=g) < 0.5).to(sample.device)
    high = int(sample.max().item()) + 1 if sample.numel() else 2
    low = min(0, int(sample.min().item())) if sample.numel() else 0
    return torch.randint(low, max(high, low + 1), shape, generator=g).to(dtype=sample.dtype, device=sample.device)


def batch_independence(run: Callable[[tuple], Mapping[str, torch.Tensor]], inputs: Sequence[Any], *, seed: int,
                       tol: Tolerance | None, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                       known: Mapping[str, torch.Tensor] | None = None) -> BatchIndependence:
    """Run sample 0 of ``inputs`` alone and among seeded batch-mates; its outputs must not change.

    ``run`` maps a tuple of positional inputs to the stage's flattened outputs.
    ``known`` is the stage's outputs on ``inputs`` themselves, already
    computed: when their batch is one of ``batch_sizes``, that run stands for
    it (sample 0 among the real batch-mates), which saves a forward pass.
    Outputs whose first dimension is not the batch are not compared (noted).
    ``tol=None`` holds each output to the policy of its dtype (:data:`normfold.tolerances.POLICY`).
    """
    sizes = sorted({int(b) for b in batch_sizes if int(b) >= 1})
    res = BatchIndependence(passed=True, batch_sizes=sizes)
    batch, batched = _batch_axis_inputs(inputs)
    if batch == 0 or not any(batched):
        res.note = "no input has a batch dimension: nothing to probe"
        return res
    sample = [t[:1] if b else t for t, b in zip(inputs, batched)]
    rows: dict[int, dict[str, torch.Tensor]] = {}
    for bs in sizes:
        g = torch.Generator().manual_seed(seed * 7919 + bs)
        pos = 0 if bs <= 2 else bs - 1
        if known is not None and bs == batch:
            rows[bs] = {name: t[:1] for name, t in known.items() if t.dim() >= 1 and t.shape[0] == bs}
            continue
        feed = []
        for t, b in zip(sample, batched):
            if not b:
                feed.append(t)
                continue
            mates = _mates(t, bs - 1, g)
            feed.append(torch.cat([mates[:pos], t, mates[pos:]], dim=0) if bs > 1 else t)
        try:
            out = run(tuple(feed))
        except Exception as exc:  # a stage that cannot run this batch size has failed the probe
            head = (str(exc).splitlines() or [type(exc).__name__])[0][:240]
            res.errors[bs] = f"{type(exc).__name__}: {head}"
            res.passed = False
            continue
        picked: dict[str, torch.Tensor] = {}
        skipped = []
        for name, t in out.items():
            if t.dim() >= 1 and t.shape[0] == bs:
                picked[name] = t[pos:pos + 1]
            else:
                skipped.append(name)
        if skipped and not res.note:
            res.note = f"outputs without a batch dimension not compared: {', '.join(skipped[:4])}"
        rows[bs] = picked
    base_bs = sizes[0] if sizes and sizes[0] in rows else next(iter(rows), None)
    if base_bs is None:
        return res
    for bs, picked in rows.items():
        if bs == base_bs:
            continue
        cs = compare_flat(rows[base_bs], picked, tol)
        res.comparisons[bs] = cs
        if not all(c.passed for c in cs):
            res.passed = False
    return res
