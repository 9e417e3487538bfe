"""Name the first layer where two stages diverge.

On a mismatch the checker records the outputs of the normalization, conv,
linear and identity layers of both models (forward hooks; for an ONNX model,
the values its nodes computed for those modules, exposed as extra graph
outputs through the exporter's ``name_scopes`` metadata) and walks the
reference's layers in execution order. A layer matches when the candidate's
value at the same path is close to the reference's. A transformation may move
a value legitimately: after a fold, the conv computes what the reference's
BatchNorm after it computed (and the BatchNorm became an Identity). So a conv
or linear layer whose value instead matches the reference's *next* layer,
when that is a normalization, matches too. The first layer that matches
neither is where the stages diverge.

Closeness is relative to each tensor's scale (``max |a - b| <= tol * max |ref|``,
:data:`normfold.tolerances.LOCALIZE`): absolute errors of intermediate
activations are not comparable between layers.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from normfold.graph import is_norm_module

__all__ = ["Divergence", "checkpoint_modules", "record", "preserved_buffers", "first_divergence", "onnx_checkpoint_values",
           "onnx_record"]

_COMPUTE = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class Divergence:
    """Where two stages part: the layer, its kind, and the error there as a fraction of its output's scale."""

    path: str
    kind: str
    scaled_error: float
    max_abs: float
    checked: int
    note: str = ""

    @property
    def found(self) -> bool:
        """False when no layer could be named (``note`` says why)."""
        return bool(self.path)

    def describe(self) -> str:
        if not self.found:
            return f"no layer named: {self.note}"
        text = (f"first diverging layer: {self.path} ({self.kind}): max abs error {self.max_abs:.3g}, "
                f"{self.scaled_error:.2g} of its output's scale")
        return text + (f"; {self.note}" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "scaled_error": self.scaled_error, "max_abs": self.max_abs,
                "checked": self.checked, "note": self.note}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Divergence":
        return cls(path=d["path"], kind=d["kind"], scaled_error=float(d["scaled_error"]), max_abs=float(d["max_abs"]),
                   checked=int(d["checked"]), note=d.get("note", ""))


def _kind(m: nn.Module) -> str | None:
    if is_norm_module(m) or type(m).__name__ in {"FrozenAffine", "RMSNormWithBias"}:
        return "norm"
    if isinstance(m, _COMPUTE):
        return "compute"
    if isinstance(m, nn.Identity):
        return "identity"
    return None


def checkpoint_modules(model: nn.Module) -> dict[str, tuple[str, str]]:
    """``path -> (role, class name)`` of the layers localization looks at."""
    out: dict[str, tuple[str, str]] = {}
    for name, m in model.named_modules():
        k = _kind(m)
        if k is not None and name:
            out[name] = (k, type(m).__name__)
    return out


def _first_tensor(v: Any) -> torch.Tensor | None:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (list, tuple)):
        for x in v:
            t = _first_tensor(x)
            if t is not None:
                return t
    return None


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Put every buffer back as it was after the block (a forward in training mode updates BatchNorm statistics)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def record(model: nn.Module, inputs: Sequence[Any], *, as_is: bool = False) -> tuple[list[tuple[str, int]], dict[tuple[str, int], torch.Tensor]]:
    """Run ``model`` (in eval, or as it is with ``as_is``) and keep every checkpoint's output.

    Returns the execution order of ``(path, call index)`` and the outputs. The
    model's flags and buffers are as they were afterwards.
    """
    from normfold.graph import eval_mode

    work = model
    order: list[tuple[str, int]] = []
    values: dict[tuple[str, int], torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for path in checkpoint_modules(work):
        mod = work.get_submodule(path)

        def hook(_m: nn.Module, _inp: Any, out: Any, path: str = path) -> None:
            t = _first_tensor(out)
            if t is None:
                return
            i = counts.get(path, 0)
            counts[path] = i + 1
            order.append((path, i))
            values[(path, i)] = t.detach().to("cpu").clone()

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad(), preserved_buffers(work):
            if as_is:
                work(*inputs)
            else:
                with eval_mode(work):
                    work(*inputs)
    finally:
        for h in handles:
            h.remove()
    return order, values


def _close(a: torch.Tensor, r: torch.Tensor, tol: float) -> tuple[bool, float, float]:
    if a.shape != r.shape:
        return False, float("inf"), float("inf")
    a64, r64 = a.double(), r.double()
    if not torch.isfinite(a64).all() and not torch.equal(torch.isfinite(a64), torch.isfinite(r64)):
        return False, float("inf"), float("inf")
    diff = (a64 - r64).abs().nan_to_num(0.0)
    scale = r64.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0).max().item() if r64.numel() else 0.0
    max_abs = diff.max().item() if diff.numel() else 0.0
    scaled = max_abs / scale if scale > 0 else max_abs
    return scaled <= tol, scaled, max_abs


def first_divergence(ref_order: Sequence[tuple[str, int]], ref_values: Mapping[tuple[str, int], torch.Tensor],
                     ref_kinds: Mapping[str, tuple[str, str]], cand_values: Mapping[tuple[str, int], torch.Tensor],
                     tol: float) -> Divergence | None:
    """Walk the reference's checkpoints in order; return the first the candidate matches neither at nor one after."""
    checked = 0
    for i, key in enumerate(ref_order):
        path, _ = key
        if key not in cand_values:
            continue  # the candidate has no such layer (replaced, or not exposed by the ONNX graph)
        role, cls = ref_kinds.get(path, ("?", "?"))
        ok, scaled, max_abs = _close(cand_values[key], ref_values[key], tol)
        checked += 1
        if ok:
            continue
        # a fold moves the next normalization's output into this layer
        nxt = ref_order[i + 1] if i + 1 < len(ref_order) else None
        if role == "compute" and nxt is not None and ref_kinds.get(nxt[0], ("",))[0] == "norm":
            ok2, scaled2, max_abs2 = _close(cand_values[key], ref_values[nxt], tol)
            if ok2:
                continue
            if scaled2 < scaled:
                return Divergence(path, cls, scaled2, max_abs2, checked,
                                  note=f"compared with the output of {nxt[0]} (folded into it)")
        return Divergence(path, cls, scaled, max_abs, checked)
    return None


def onnx_checkpoint_values(proto: Any, paths: Sequence[str]) -> dict[str, list[str]]:
    """``module path -> ONNX value names`` holding that module's output, one per call, from the scope metadata.

    A module call's output is a value produced inside its scope and read
    outside it (or a graph output); values are listed in node order.
    """
    from normfold.check.probes import node_scope

    wanted = set(paths)
    nodes = list(proto.graph.node)
    scopes = [node_scope(n) for n in nodes]
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    graph_outputs = {o.name for o in proto.graph.output}

    def inside(scope: str, path: str) -> bool:
        return scope == path or scope.startswith(path + ".")

    found: dict[str, list[str]] = {}
    for i, n in enumerate(nodes):
        s = scopes[i]
        if not s:
            continue
        parts = s.split(".")
        for k in range(len(parts), 0, -1):
            path = ".".join(parts[:k])
            if path not in wanted:
                continue
            for out in n.output:
                if out and (out in graph_outputs or any(not inside(scopes[j], path) for j in consumers.get(out, []))):
                    found.setdefault(path, []).append(out)
    return found


def onnx_record(proto: Any, inputs: Sequence[Any], calls: Mapping[str, int], providers: Sequence[str] = ("cpu",),
                threads: int | None = None) -> dict[tuple[str, int], torch.Tensor]:
    """Run ``proto`` with the checkpoints' values as extra outputs; ``(path, call) -> tensor``.

    ``calls`` is how often each path ran in eager; a path whose number of
    outputs in the graph differs (fused away, or ambiguous) is left out.
    """
    import onnx

    from normfold.check.runtime import create_session

    found = onnx_checkpoint_values(proto, list(calls))
    mapping = {(path, i): v for path, vs in found.items() if len(vs) == calls.get(path) for i, v in enumerate(vs)}
    if not mapping:
        return {}
    model = copy.deepcopy(proto)
    existing = {o.name for o in model.graph.output}
    names = list(dict.fromkeys(mapping.values()))
    for v in names:
        if v not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(v))
    rt = create_session(model, providers, threads=threads)
    outs = rt.run(inputs, output_names=names)
    by_name = dict(zip(names, outs))
    return {key: by_name[v] for key, v in mapping.items()}
