"""One verification: does a rewritten model compute what the original computes?

:func:`verify` runs the reference and the candidate in eval on the same
inputs and compares every output (:mod:`normfold.check.compare`) under one
rule, :data:`normfold.tolerances.POLICY`::

    max |a - b| <= POLICY[dtype].scaled * max |ref|        per output tensor

``max |ref|`` is the output's *scale*; ``dtype`` is the comparison dtype, the
lower precision of the two outputs' dtypes (an fp16 model checked against
its fp32 original is judged by the float16 rule). Each number is measured;
its basis is written in :mod:`normfold.tolerances`. ``fold``, ``convert``,
``recalibrate``, ``normfold.check`` (every stage and probe),
:mod:`normfold.testing` and the project's tests all judge through this rule;
:func:`compare` is the same judgement for outputs already computed (an ONNX
session's, an ExportedProgram's).

An explicit :class:`~normfold.tolerances.Tolerance` (``--atol``, ``--rtol``,
``--scale-tol`` on the command line, :func:`tolerance_from_args`) replaces
the policy for every output.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from normfold.check.compare import OutputComparison, compare_flat, flatten_outputs
from normfold.errors import UsageError
from normfold.tolerances import Tolerance, resolve_tolerance

__all__ = ["Verification", "verify", "compare", "resolve_tolerance", "tolerance_from_args", "preserved_modes"]


@dataclass
class Verification:
    """The comparison of a candidate's outputs with the reference's, output by output.

    ``tolerance`` is the explicit rule every output was held to, or ``None``
    when each output was judged by the policy of its comparison dtype (each
    :class:`~normfold.check.compare.OutputComparison` records its own rule,
    bound and margin).
    """

    comparisons: list[OutputComparison]
    tolerance: Tolerance | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every output matches (and there is at least one)."""
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def max_abs(self) -> float:
        """The largest ``|a - b|`` over all outputs."""
        return max((c.max_abs for c in self.comparisons), default=0.0)

    @property
    def max_rel(self) -> float:
        """The largest elementwise relative error over all outputs."""
        return max((c.max_rel for c in self.comparisons), default=0.0)

    @property
    def scaled_error(self) -> float:
        """The largest ``max |a - b| / max |ref|`` over all outputs."""
        return max((c.scaled_error for c in self.comparisons), default=0.0)

    @property
    def margin(self) -> float:
        """The smallest margin (bound over error) over all outputs: >= 1 passes."""
        return min((c.margin for c in self.comparisons), default=float("inf"))

    def worst(self) -> OutputComparison | None:
        """The first failing output, or the one closest to its bound."""
        bad = [c for c in self.comparisons if not c.passed]
        if bad:
            return bad[0]
        return min(self.comparisons, key=lambda c: c.margin, default=None)

    def describe(self) -> str:
        """One line for the user: the worst output against its rule, with the margin.

        ``3 output(s) match: max |a - b| 3.1e-06 <= 2e-05 x scale 4.87 (margin 6.4x)``, or
        ``1 of 3 output(s) differ: out.1: max |a - b| ...``.
        """
        w = self.worst()
        if w is None:
            return "no tensor outputs to compare"
        n = len(self.comparisons)
        name = f"{w.name}: " if n > 1 else ""
        if self.passed:
            return f"{n} output(s) match: {name}{w.verdict()}"
        bad = sum(1 for c in self.comparisons if not c.passed)
        return f"{bad} of {n} output(s) differ: {w.name}: {w.problem}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the verdict and every comparison."""
        return {"passed": self.passed, "margin": self.margin, "max_abs": self.max_abs,
                "scaled_error": self.scaled_error,
                "tolerance": None if self.tolerance is None else {"atol": self.tolerance.atol,
                                                                  "rtol": self.tolerance.rtol,
                                                                  "scale_tol": self.tolerance.scaled},
                "comparisons": [c.to_dict() for c in self.comparisons]}


@contextlib.contextmanager
def preserved_modes(*models: Any) -> Iterator[None]:
    """Put every module of ``models`` in eval for the block, then give each back its own training flag.

    The flags are set on each submodule directly (what ``Module.eval()`` does),
    so a module whose ``train()`` is overridden or refused (the module of an
    ExportedProgram raises on ``eval()``) is handled too; non-modules are ignored.
    """
    saved: list[tuple[nn.Module, bool]] = []
    for m in models:
        if isinstance(m, nn.Module):
            for sub in m.modules():
                saved.append((sub, sub.training))
    try:
        for sub, _ in saved:
            sub.training = False
        yield
    finally:
        for sub, flag in saved:
            sub.training = flag


def _as_inputs(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs)
    raise UsageError(f"inputs must be a tensor or a tuple of tensors, not {type(inputs).__name__}")


def _run(model: Callable[..., Any], inputs: tuple[Any, ...]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in flatten_outputs(model(*inputs)).items()}


def tolerance_from_args(args: argparse.Namespace) -> Tolerance | None:
    """The tolerance the command-line flags ``--atol``, ``--rtol``, ``--scale-tol`` ask for (``None``: the policy).

    Every command that compares models reads its flags through this, so they
    mean the same everywhere. A bad value is a :class:`~normfold.errors.UsageError`
    naming the flag.
    """
    values = {name: getattr(args, name, None) for name in ("atol", "rtol", "scale_tol")}
    for name, value in values.items():
        if value is not None and (not (value >= 0) or value == float("inf")):
            raise UsageError(f"--{name.replace('_', '-')} {value} must be a finite number >= 0")
    return resolve_tolerance(**values)


def compare(reference_outputs: Any, candidate_outputs: Any, *, tolerance: Tolerance | None = None) -> Verification:
    """Judge outputs already computed: any nesting of tensors (flattened by name), or ``name -> tensor`` dicts.

    ``tolerance=None`` holds each output to :data:`normfold.tolerances.POLICY`
    of its comparison dtype.
    """
    ref = flatten_outputs(reference_outputs)
    cand = flatten_outputs(candidate_outputs)
    return Verification(compare_flat(ref, cand, tolerance), tolerance)


def verify(reference: Callable[..., Any], candidate: Callable[..., Any], inputs: Any, *,
           tolerance: Tolerance | None = None) -> Verification:
    """Run ``reference`` and ``candidate`` in eval on ``inputs`` and compare every output.

    ``reference`` and ``candidate`` are ``nn.Module`` s (or any callables,
    such as ``ExportedProgram.module()``); each is put in eval for the run and
    given back its own training flags afterwards, so the caller's models are
    left as they were. ``inputs`` is a tensor or a tuple of model inputs.
    ``tolerance=None`` (the default) holds each output to
    :data:`normfold.tolerances.POLICY` of its comparison dtype (the lower
    precision of the two sides); an explicit
    :class:`~normfold.tolerances.Tolerance` replaces it for every output.

    Returns a :class:`Verification`: ``passed``, the per-output comparisons
    (max abs / rel error, scale, the rule, the bound and the margin) and
    :meth:`Verification.describe` for one line of text. Raises
    :class:`~normfold.errors.UsageError` for inputs that are not tensors; an
    exception raised by either model's forward propagates.
    """
    x = _as_inputs(inputs)
    with preserved_modes(reference, candidate), torch.no_grad():
        ref_out = _run(reference, x)
        cand_out = _run(candidate, x)
    return Verification(compare_flat(ref_out, cand_out, tolerance), tolerance)
