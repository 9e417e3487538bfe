"""Compare the outputs of two models, output by output.

Outputs may be a tensor, or any nesting of tuples, lists, dicts, namedtuples
and Hugging Face ``ModelOutput``s; they are flattened to ``name -> tensor`` in
a stable order (``out``, ``out.0``, ``out.logits`` ...). For each output the
comparison records shapes, dtypes, max/mean absolute and relative error,
NaN/Inf counts, and the smallest ``atol`` (at the given ``rtol``) that would
have passed, so a failure tells the user how far off it is.

Relative error is ``|a - b| / max(|b|, floor)`` with ``floor`` a small
fraction of the reference's scale, so near-zero reference values do not
produce meaningless huge ratios.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from normfold.tolerances import Tolerance

__all__ = ["OutputComparison", "flatten_outputs", "compare_outputs", "max_errors"]


@dataclass
class OutputComparison:
    """How one output of the candidate differs from the reference's."""

    name: str
    passed: bool
    reference_shape: tuple[int, ...]
    candidate_shape: tuple[int, ...]
    reference_dtype: str
    candidate_dtype: str
    max_abs: float = float("nan")
    mean_abs: float = float("nan")
    max_rel: float = float("nan")
    mean_rel: float = float("nan")
    nan_count: int = 0
    inf_count: int = 0
    atol_needed: float = float("nan")
    atol: float = 0.0
    rtol: float = 0.0
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reference_shape"] = list(self.reference_shape)
        d["candidate_shape"] = list(self.candidate_shape)
        return d


def flatten_outputs(value: Any, prefix: str = "out") -> dict[str, torch.Tensor]:
    """Flatten a model's output into ``name -> tensor`` (non-tensor leaves are dropped)."""
    out: dict[str, torch.Tensor] = {}

    def walk(v: Any, name: str) -> None:
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif hasattr(v, "to_tuple") and hasattr(v, "keys"):  # transformers ModelOutput
            for k in v.keys():
                walk(v[k], f"{name}.{k}")
        elif isinstance(v, dict):
            for k, item in v.items():
                walk(item, f"{name}.{k}")
        elif isinstance(v, tuple) and hasattr(v, "_fields"):
            for k in v._fields:
                walk(getattr(v, k), f"{name}.{k}")
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                walk(item, f"{name}.{i}")

    walk(value, prefix)
    return out


def _compare_tensor(name: str, ref: torch.Tensor, cand: torch.Tensor, tol: Tolerance) -> OutputComparison:
    c = OutputComparison(name=name, passed=False, reference_shape=tuple(ref.shape), candidate_shape=tuple(cand.shape),
                         reference_dtype=str(ref.dtype).replace("torch.", ""),
                         candidate_dtype=str(cand.dtype).replace("torch.", ""), atol=tol.atol, rtol=tol.rtol)
    if tuple(ref.shape) != tuple(cand.shape):
        c.problem = f"shape {tuple(cand.shape)} != reference {tuple(ref.shape)}"
        return c
    r = ref.detach().to("cpu", torch.float64)
    a = cand.detach().to("cpu", torch.float64)
    c.nan_count = int(torch.isnan(a).sum())
    c.inf_count = int(torch.isinf(a).sum())
    ref_bad = int((~torch.isfinite(r)).sum())
    if r.numel() == 0:
        c.max_abs = c.mean_abs = c.max_rel = c.mean_rel = c.atol_needed = 0.0
        c.passed = True
        return c
    diff = (a - r).abs()
    # Where both are the same non-finite value (inf == inf, nan vs nan), count the element as equal.
    same_nonfinite = (~torch.isfinite(r)) & ((a == r) | (torch.isnan(a) & torch.isnan(r)))
    diff = torch.where(same_nonfinite, torch.zeros_like(diff), diff)
    scale = r[torch.isfinite(r)].abs().max().item() if (torch.isfinite(r)).any() else 1.0
    floor = max(scale * 1e-6, torch.finfo(torch.float32).tiny)
    rel = diff / torch.clamp(r.abs(), min=floor)
    c.max_abs = float(diff.max())
    c.mean_abs = float(diff.mean())
    c.max_rel = float(rel.max())
    c.mean_rel = float(rel.mean())
    # smallest atol that passes |a - r| <= atol + rtol |r|
    c.atol_needed = float(torch.clamp(diff - tol.rtol * r.abs().nan_to_num(posinf=0.0, neginf=0.0), min=0).max())
    if c.nan_count or c.inf_count:
        if c.nan_count + c.inf_count > ref_bad or not bool(same_nonfinite.sum() >= c.nan_count + c.inf_count):
            c.problem = f"{c.nan_count} NaN and {c.inf_count} Inf values (reference has {ref_bad})"
            return c
    ok = bool((diff <= tol.atol + tol.rtol * r.abs()).all()) if torch.isfinite(diff).all() else False
    c.passed = ok
    if not ok:
        c.problem = f"max abs error {c.max_abs:.3g} exceeds atol {tol.atol:g} + rtol {tol.rtol:g} * |ref|"
    return c


def compare_outputs(reference: Any, candidate: Any, tol: Tolerance) -> list[OutputComparison]:
    """Compare every output of ``candidate`` with ``reference`` under ``tol``."""
    ref = flatten_outputs(reference)
    cand = flatten_outputs(candidate)
    results: list[OutputComparison] = []
    for name, r in ref.items():
        if name not in cand:
            results.append(OutputComparison(name=name, passed=False, reference_shape=tuple(r.shape), candidate_shape=(),
                                            reference_dtype=str(r.dtype), candidate_dtype="missing",
                                            atol=tol.atol, rtol=tol.rtol, problem="output missing from the candidate"))
            continue
        results.append(_compare_tensor(name, r, cand[name], tol))
    for name in cand:
        if name not in ref:
            t = cand[name]
            results.append(OutputComparison(name=name, passed=False, reference_shape=(), candidate_shape=tuple(t.shape),
                                            reference_dtype="missing", candidate_dtype=str(t.dtype),
                                            atol=tol.atol, rtol=tol.rtol, problem="output not in the reference"))
    return results


def max_errors(comparisons: list[OutputComparison]) -> tuple[float, float]:
    """(max abs error, max relative error) over all outputs."""
    if not comparisons:
        return 0.0, 0.0
    return (max(c.max_abs for c in comparisons), max(c.max_rel for c in comparisons))
