"""List every normalization layer of a model and what normfold can do to it.

:func:`inspect_model` dry-runs the passes on a copy of the model: for each
norm layer it says which rewrites apply ("fold into layer1.0.conv1", "convert
to GroupNorm", ...) and, where the fold does not apply, the reason the pass
gave. Nothing is changed on the model passed in.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from normfold.norms import is_batchnorm, norm_kind
from normfold.passes.fold_batchnorm import fold_batchnorm

__all__ = ["LayerReport", "inspect_model", "CONVERSIONS"]

#: what ``normfold convert --to`` can make of each norm kind
CONVERSIONS: dict[str, list[str]] = {
    "batchnorm": ["groupnorm", "syncbn", "frozen"],
    "syncbatchnorm": ["batchnorm", "groupnorm", "frozen"],
    "frozen_batchnorm": ["groupnorm", "batchnorm"],
    "frozen_affine": ["batchnorm"],
    "layernorm": ["rmsnorm"],
}


@dataclass
class LayerReport:
    """One normalization layer: where it is, what it is, what can be done, why not."""

    path: str
    type: str
    kind: str
    actions: list[str] = field(default_factory=list)
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "type": self.type, "kind": self.kind, "actions": self.actions, "reason": self.reason}


def inspect_model(model: nn.Module, *, example_inputs: Any = None) -> tuple[list[LayerReport], dict[str, int]]:
    """Report every normalization layer; returns the layers and totals by kind and by outcome."""
    layers = [(p, m) for p, m in model.named_modules() if norm_kind(m) is not None]
    folds: dict[str, str] = {}
    skips: dict[str, str] = {}
    if any(is_batchnorm(m) for _, m in layers):
        result = fold_batchnorm(model, example_inputs=example_inputs, inplace=False)
        for c in result.changes:
            if c.action.startswith("fold"):
                folds[c.paths[0]] = c.message
        for s in result.skipped:
            if s.paths:
                skips.setdefault(s.paths[0], s.reason)
    reports = []
    for path, m in layers:
        kind = norm_kind(m) or "other"
        r = LayerReport(path=path, type=type(m).__name__, kind=kind)
        if path in folds:
            r.actions.append(folds[path])
        elif is_batchnorm(m):
            r.reason = skips.get(path, "not reached by the fold pass")
        r.actions.extend(f"convert to {c}" for c in CONVERSIONS.get(kind, []))
        if not r.actions and r.reason is None:
            r.reason = f"normfold has no rewrite for {type(m).__name__}"
        reports.append(r)
    totals = Counter(r.kind for r in reports)
    totals_out = {f"kind:{k}": v for k, v in sorted(totals.items())}
    totals_out["foldable"] = len(folds)
    totals_out["layers"] = len(reports)
    return reports, totals_out
