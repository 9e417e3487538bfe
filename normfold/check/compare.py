"""Compare the outputs of two models, output by output.

Outputs may be a tensor, or any nesting of tuples, lists, dicts, namedtuples
and Hugging Face ``ModelOutput``s; they are flattened to ``name -> tensor`` in
a stable order (``out``, ``out.0``, ``out.logits`` ...). For each output the
comparison records shapes, dtypes, max/mean absolute and relative error,
NaN/Inf counts, the rule it was judged by and its margin (how many times
the error fits into the allowed bound), and the tolerance that would have
passed (the smallest ``atol`` at the given ``rtol``, the smallest ``rtol`` at
the given ``atol``, and ``scaled_error``, the smallest scale-relative
tolerance), so a failure tells the user how far off it is. ``tol`` is a
:class:`~normfold.tolerances.Tolerance` (``|a - b| <= atol + rtol * |ref| +
scaled * max|ref|``), or ``None``: normfold's policy
(:data:`normfold.tolerances.POLICY`) for each output's comparison dtype,
the lower precision of the two sides.

Relative error is ``|a - b| / max(|b|, floor)`` with ``floor`` a small
fraction of the reference's scale, so near-zero reference values do not
produce meaningless huge ratios. ``scale`` is ``max |b|`` and
``scaled_error`` is ``max |a - b| / scale``: the error as a fraction of the
output's magnitude, the number that is comparable across models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import torch

from normfold.tolerances import Tolerance, comparison_dtype, policy

__all__ = ["OutputComparison", "flatten_outputs", "compare_outputs", "compare_flat", "max_errors",
           "name_outputs"]


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
    rtol_needed: float = float("nan")
    scale: float = float("nan")
    scaled_error: float = float("nan")
    scaled: float = 0.0
    dtype: str = ""
    limit: float = float("nan")
    margin: float = float("nan")
    rule: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reference_shape"] = list(self.reference_shape)
        d["candidate_shape"] = list(self.candidate_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OutputComparison":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["reference_shape"] = tuple(kw.get("reference_shape", ()))
        kw["candidate_shape"] = tuple(kw.get("candidate_shape", ()))
        for f in fields(cls):
            if f.type == "float" and f.name in kw:
                kw[f.name] = float(kw[f.name])  # JSON writes NaN/Infinity as strings
        return cls(**kw)

    def verdict(self) -> str:
        """The error against the rule and the margin: ``max |a - b| 3.1e-06 <= 2e-05 x scale 4.87 (margin 31x)``.

        ``margin`` is the allowed bound over the error (at the element where that
        ratio is smallest): above 1 passes, below 1 fails.
        """
        if self.problem is not None and not (self.max_abs == self.max_abs):
            return self.problem
        op = "<=" if self.margin >= 1 else ">"
        margin = "inf" if self.margin == float("inf") else f"{self.margin:.3g}x"
        rule = self.rule.replace("|a - b| <= ", "") or "0"
        return f"max |a - b| {self.max_abs:.3g} {op} {rule} (margin {margin})"

    def summary(self) -> str:
        """One line: the verdict, or what is wrong and by how much."""
        if self.passed:
            return f"{self.name}: {self.verdict()}"
        return f"{self.name}: {self.problem}"


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


def name_outputs(reference_names: Sequence[str], tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give a flat list of outputs (an ONNX session's, in graph order) the reference's output names.

    The dynamo exporter flattens the output pytree in the order
    :func:`flatten_outputs` walks it; extra outputs are named ``onnx.<i>``.
    """
    named: dict[str, torch.Tensor] = {}
    for i, t in enumerate(tensors):
        named[reference_names[i] if i < len(reference_names) else f"onnx.{i}"] = t
    return named


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _compare_tensor(name: str, ref: torch.Tensor, cand: torch.Tensor, tol: Tolerance | None) -> OutputComparison:
    dtype = comparison_dtype(ref.dtype, cand.dtype)
    if tol is None:
        tol = policy(dtype)
    c = OutputComparison(name=name, passed=False, reference_shape=tuple(ref.shape), candidate_shape=tuple(cand.shape),
                         reference_dtype=_dtype_name(ref), candidate_dtype=_dtype_name(cand),
                         atol=tol.atol, rtol=tol.rtol, scaled=tol.scaled, dtype=str(dtype).replace("torch.", ""),
                         rule=tol.describe())
    if tuple(ref.shape) != tuple(cand.shape):
        c.problem = f"shape {tuple(cand.shape)} != reference {tuple(ref.shape)}"
        return c
    if ref.dtype.is_floating_point != cand.dtype.is_floating_point or (ref.dtype == torch.bool) != (cand.dtype == torch.bool):
        c.problem = f"dtype {c.candidate_dtype} != reference {c.reference_dtype}"
        return c
    r = ref.detach().to("cpu", torch.float64)
    a = cand.detach().to("cpu", torch.float64)
    c.nan_count = int(torch.isnan(a).sum())
    c.inf_count = int(torch.isinf(a).sum())
    ref_bad = int((~torch.isfinite(r)).sum())
    if r.numel() == 0:
        c.max_abs = c.mean_abs = c.max_rel = c.mean_rel = c.atol_needed = c.rtol_needed = 0.0
        c.scale = c.scaled_error = c.limit = 0.0
        c.margin = float("inf")
        c.passed = True
        return c
    diff = (a - r).abs()
    # Where both are the same non-finite value (inf == inf, nan vs nan), count the element as equal.
    same_nonfinite = (~torch.isfinite(r)) & ((a == r) | (torch.isnan(a) & torch.isnan(r)))
    diff = torch.where(same_nonfinite, torch.zeros_like(diff), diff)
    finite_r = r[torch.isfinite(r)]
    scale = finite_r.abs().max().item() if finite_r.numel() else 1.0
    floor = max(scale * 1e-6, torch.finfo(torch.float32).tiny)
    abs_r = r.abs().nan_to_num(posinf=0.0, neginf=0.0)
    rel = diff / torch.clamp(abs_r, min=floor)
    c.scale = float(scale)
    c.rule = tol.describe(scale)
    c.max_abs = float(diff.max())
    c.mean_abs = float(diff.mean())
    c.max_rel = float(rel.max())
    c.mean_rel = float(rel.mean())
    c.scaled_error = c.max_abs / scale if scale > 0 else c.max_abs
    # the smallest atol that passes |a - r| <= atol + rtol |r| at this rtol, and the smallest rtol at this atol
    c.atol_needed = float(torch.clamp(diff - tol.rtol * abs_r, min=0).max())
    over = torch.clamp(diff - tol.atol, min=0)
    need = torch.where(over > 0, over / torch.clamp(abs_r, min=torch.finfo(torch.float64).tiny), torch.zeros_like(over))
    c.rtol_needed = float(need.max())
    if c.nan_count or c.inf_count:
        if c.nan_count + c.inf_count > ref_bad or not bool(same_nonfinite.sum() >= c.nan_count + c.inf_count):
            c.problem = f"{c.nan_count} NaN and {c.inf_count} Inf values (reference has {ref_bad})"
            return c
    bound = tol.atol + tol.scaled * scale + tol.rtol * abs_r
    c.limit = float(tol.atol + tol.scaled * scale)
    finite = bool(torch.isfinite(diff).all())
    # the margin is taken where the error is closest to its bound; an element with no error has infinite margin
    ratio = torch.where(diff > 0, bound / torch.where(diff > 0, diff, torch.ones_like(diff)),
                        torch.full_like(diff, float("inf")))
    c.margin = float(ratio.min()) if finite else 0.0
    ok = bool((diff <= bound).all()) if finite else False
    c.passed = ok
    if not ok:
        c.problem = (f"{c.verdict()}: the error is {c.scaled_error:.2g} of the output's scale {scale:.3g}")
    return c


def compare_flat(reference: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor],
                 tol: Tolerance | None = None) -> list[OutputComparison]:
    """Compare two already flattened ``name -> tensor`` outputs under ``tol`` (``None``: the policy, per output)."""
    results: list[OutputComparison] = []
    for name, r in reference.items():
        if name not in candidate:
            results.append(OutputComparison(name=name, passed=False, reference_shape=tuple(r.shape), candidate_shape=(),
                                            reference_dtype=_dtype_name(r), candidate_dtype="missing",
                                            problem="output missing from the candidate"))
            continue
        results.append(_compare_tensor(name, r, candidate[name], tol))
    for name, t in candidate.items():
        if name not in reference:
            results.append(OutputComparison(name=name, passed=False, reference_shape=(), candidate_shape=tuple(t.shape),
                                            reference_dtype="missing", candidate_dtype=_dtype_name(t),
                                            problem="output not in the reference"))
    return results


def compare_outputs(reference: Any, candidate: Any, tol: Tolerance | None = None) -> list[OutputComparison]:
    """Compare every output of ``candidate`` with ``reference`` under ``tol`` (``None``: the policy, per output)."""
    return compare_flat(flatten_outputs(reference), flatten_outputs(candidate), tol)


def max_errors(comparisons: list[OutputComparison]) -> tuple[float, float]:
    """(max abs error, max relative error) over all outputs."""
    if not comparisons:
        return 0.0, 0.0
    return (max(c.max_abs for c in comparisons), max(c.max_rel for c in comparisons))
