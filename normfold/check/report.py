"""The checker's report: terminal text, JSON and JUnit XML from one record.

A :class:`CheckReport` is a list of :class:`CheckResult` (one per check: each
becomes one JUnit testcase) plus the context a reader needs to trust or
reproduce it: the inputs and their seed, the tolerance, the stages that ran,
the onnxruntime provider that actually ran, and, on a mismatch, the stage
blamed and the first diverging layer.

``to_text()`` is the terminal summary; its last line is ``PASSED: ...`` or
``FAILED: ...``. ``to_json()`` round-trips through :meth:`CheckReport.from_json`.
``to_junit_xml()`` is a ``<testsuites>`` document with one ``<testsuite
name="normfold.check">``; failed checks carry a ``<failure>`` with the
reason, checks that could not run a ``<skipped>``.
"""

from __future__ import annotations

import json
import platform
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from normfold.check.compare import OutputComparison
from normfold.check.localize import Divergence
from normfold.check.probes import BatchIndependence, Finding
from normfold.tolerances import Tolerance

__all__ = ["CheckResult", "StageInfo", "CheckReport", "PASSED", "FAILED", "SKIPPED"]

PASSED = "passed"
FAILED = "failed"
SKIPPED = "skipped"


@dataclass
class CheckResult:
    """One check: its name (``outputs[onnx]``, ``batch_independence[eager]`` ...), status, and why."""

    name: str
    status: str
    message: str
    seconds: float = 0.0
    comparisons: list[OutputComparison] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    batch: BatchIndependence | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status != FAILED

    @property
    def group(self) -> str:
        """``outputs[onnx]`` -> ``outputs``."""
        return self.name.split("[", 1)[0]

    def detail_lines(self) -> list[str]:
        """Lines under the check in the terminal report and in JUnit's failure text."""
        lines = []
        for c in self.comparisons:
            state = "ok" if c.passed else "MISMATCH"
            lines.append(f"{c.name}: {state}; shape {'x'.join(map(str, c.candidate_shape)) or '-'} "
                         f"{c.candidate_dtype}; max abs {c.max_abs:.3g}, mean abs {c.mean_abs:.3g}, "
                         f"max rel {c.max_rel:.3g}, mean rel {c.mean_rel:.3g}; NaN {c.nan_count}, Inf {c.inf_count}; "
                         f"would pass at scale_tol {c.scaled_error:.3g}, atol {c.atol_needed:.3g} (rtol {c.rtol:g}) "
                         f"or rtol {c.rtol_needed:.3g} (atol {c.atol:g})" + ("" if c.passed else f" -- {c.problem}"))
        for f in self.findings:
            if len(self.findings) == 1 and str(f) == self.message:
                continue  # the message already says it
            lines.append(f"{f.severity}: {f}")
        if self.batch is not None:
            lines.extend(self.batch.failures())
            if self.batch.note:
                lines.append(self.batch.note)
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "message": self.message, "seconds": round(self.seconds, 4),
                "comparisons": [c.to_dict() for c in self.comparisons],
                "findings": [f.to_dict() for f in self.findings],
                "batch": self.batch.to_dict() if self.batch is not None else None,
                "details": self.details}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckResult":
        return cls(name=d["name"], status=d["status"], message=d["message"], seconds=d.get("seconds", 0.0),
                   comparisons=[OutputComparison.from_dict(c) for c in d.get("comparisons", [])],
                   findings=[Finding.from_dict(f) for f in d.get("findings", [])],
                   batch=BatchIndependence.from_dict(d["batch"]) if d.get("batch") else None,
                   details=dict(d.get("details", {})))


@dataclass
class StageInfo:
    """A stage of the pipeline: ``original`` (eager, eval), ``candidate`` (eager) or ``onnx`` (onnxruntime)."""

    name: str
    description: str
    ran: bool
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "ran": self.ran,
                "seconds": round(self.seconds, 4), "error": self.error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageInfo":
        return cls(name=d["name"], description=d["description"], ran=d["ran"], seconds=d.get("seconds", 0.0),
                   error=d.get("error"))


@dataclass
class CheckReport:
    """Everything :func:`normfold.check` found; ``passed`` is True when no check failed."""

    checks: list[CheckResult]
    stages: list[StageInfo]
    seed: int | None
    inputs: list[dict[str, Any]]
    input_source: str
    atol: float
    rtol: float
    scale_tol: float = 0.0
    provider: str | None = None
    provider_note: str = ""
    providers_requested: list[str] = field(default_factory=list)
    blamed_stage: str | None = None
    divergence: Divergence | None = None
    onnx: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    # -- verdict -------------------------------------------------------------------------------------
    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == FAILED]

    def check(self, name: str) -> CheckResult:
        """The check called ``name`` (KeyError if it is not in the report)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r} in the report (checks: {', '.join(c.name for c in self.checks)})")

    def final_line(self) -> str:
        """``PASSED: ...`` or ``FAILED: ...``: one line, the last of the terminal report."""
        prov = f"onnxruntime provider {self.provider}" if self.provider else "no onnxruntime run"
        n = len(self.checks)
        skipped = sum(c.status == SKIPPED for c in self.checks)
        if self.passed:
            ran = n - skipped
            return (f"PASSED: {ran} check(s) passed" + (f", {skipped} skipped" if skipped else "")
                    + f"; max abs error {self.max_abs_error():.3g}; seed {self.seed}; {prov}")
        failed = self.failed_checks
        where = f"; first mismatch at stage {self.blamed_stage}" if self.blamed_stage else ""
        layer = f" ({self.divergence.path})" if self.divergence is not None and self.divergence.found else ""
        return (f"FAILED: {len(failed)} of {n} check(s) failed: {', '.join(c.name for c in failed)}{where}{layer}; "
                f"seed {self.seed}; {prov}")

    def tolerance(self) -> Tolerance:
        """The tolerance every output comparison used."""
        return Tolerance(atol=self.atol, rtol=self.rtol, scaled=self.scale_tol)

    def max_abs_error(self) -> float:
        vals = [c.max_abs for r in self.checks if r.group == "outputs" for c in r.comparisons if c.max_abs == c.max_abs]
        return max(vals) if vals else 0.0

    # -- text ----------------------------------------------------------------------------------------
    def to_text(self, *, verbose: bool = False) -> str:
        """The terminal report: context, one line per check (details under failures), the final line."""
        lines = ["normfold check"]
        shapes = ", ".join(f"{'x'.join(map(str, i['shape']))} {i['dtype']}" for i in self.inputs)
        lines.append(f"  inputs: {shapes} ({self.input_source}" + (f", seed {self.seed})" if self.seed is not None else ")"))
        lines.append(f"  tolerance: {self.tolerance().describe()}")
        for s in self.stages:
            state = f"{s.seconds:.2f}s" if s.ran else "not run"
            if s.error:
                state += f", error: {s.error}"
            lines.append(f"  stage {s.name}: {s.description} ({state})")
        if self.provider:
            lines.append(f"  provider: {self.provider_note or self.provider}")
        if self.onnx:
            o = self.onnx
            lines.append(f"  onnx: {o.get('path') or 'in memory'}, opset {o.get('opset')}, "
                         f"batch dims {o.get('batch_dims')}" + (f", exported in {o['export_seconds']:.1f}s"
                                                                 if o.get("export_seconds") else ""))
        width = max((len(c.name) for c in self.checks), default=10)
        for c in self.checks:
            mark = {PASSED: "ok  ", FAILED: "FAIL", SKIPPED: "skip"}.get(c.status, c.status)
            lines.append(f"  [{mark}] {c.name.ljust(width)}  {c.message}")
            if c.status == FAILED or verbose:
                for d in c.detail_lines():
                    lines.append(f"           {d}")
            elif c.findings:
                for f in c.findings:
                    if f.severity == "warning":
                        lines.append(f"           warning: {f}")
        if self.blamed_stage:
            lines.append(f"  blame: the outputs first differ at stage {self.blamed_stage}")
        if self.divergence is not None:
            lines.append(f"  {self.divergence.describe()}")
        lines.append(self.final_line())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    # -- JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "checks": [c.to_dict() for c in self.checks],
            "stages": [s.to_dict() for s in self.stages], "seed": self.seed, "inputs": self.inputs,
            "input_source": self.input_source, "atol": self.atol, "rtol": self.rtol, "scale_tol": self.scale_tol,
            "provider": self.provider,
            "provider_note": self.provider_note, "providers_requested": self.providers_requested,
            "blamed_stage": self.blamed_stage,
            "divergence": self.divergence.to_dict() if self.divergence is not None else None,
            "onnx": self.onnx, "environment": self.environment, "seconds": round(self.seconds, 4),
            "created": self.created, "final_line": self.final_line(),
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        """Strict JSON (non-finite numbers as the strings "NaN", "Infinity", "-Infinity"); :meth:`from_json` reads it back."""
        return json.dumps(_strict(self.to_dict()), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckReport":
        return cls(checks=[CheckResult.from_dict(c) for c in d["checks"]],
                   stages=[StageInfo.from_dict(s) for s in d["stages"]], seed=d.get("seed"),
                   inputs=list(d.get("inputs", [])), input_source=d.get("input_source", ""), atol=d["atol"],
                   rtol=d["rtol"], scale_tol=d.get("scale_tol", 0.0), provider=d.get("provider"), provider_note=d.get("provider_note", ""),
                   providers_requested=list(d.get("providers_requested", [])), blamed_stage=d.get("blamed_stage"),
                   divergence=Divergence.from_dict(d["divergence"]) if d.get("divergence") else None,
                   onnx=dict(d.get("onnx", {})), environment=dict(d.get("environment", {})),
                   seconds=d.get("seconds", 0.0), created=d.get("created", ""))

    @classmethod
    def from_json(cls, text: str) -> "CheckReport":
        return cls.from_dict(json.loads(text))

    # -- JUnit ---------------------------------------------------------------------------------------
    def to_junit_xml(self, *, suite_name: str = "normfold.check") -> str:
        """A JUnit XML document: one testcase per check, failures and skips marked as CI systems expect."""
        failures = sum(c.status == FAILED for c in self.checks)
        skipped = sum(c.status == SKIPPED for c in self.checks)
        root = ET.Element("testsuites", name=suite_name, tests=str(len(self.checks)), failures=str(failures),
                          errors="0", skipped=str(skipped), time=f"{self.seconds:.3f}")
        suite = ET.SubElement(root, "testsuite", name=suite_name, tests=str(len(self.checks)),
                              failures=str(failures), errors="0", skipped=str(skipped), time=f"{self.seconds:.3f}",
                              timestamp=self.created[:19], hostname=platform.node() or "localhost")
        props = ET.SubElement(suite, "properties")
        for k, v in [("seed", self.seed), ("provider", self.provider), ("provider_note", self.provider_note),
                     ("atol", self.atol), ("rtol", self.rtol), ("scale_tol", self.scale_tol), ("input_source", self.input_source),
                     ("blamed_stage", self.blamed_stage),
                     ("divergence", self.divergence.describe() if self.divergence else None),
                     *[(f"onnx.{k2}", v2) for k2, v2 in self.onnx.items()],
                     *[(f"env.{k2}", v2) for k2, v2 in self.environment.items()]]:
            if v is not None:
                ET.SubElement(props, "property", name=str(k), value=str(v))
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", classname=f"{suite_name}.{c.group}", name=c.name,
                                 time=f"{c.seconds:.3f}")
            detail = "\n".join(c.detail_lines())
            if c.status == FAILED:
                fail = ET.SubElement(case, "failure", message=c.message, type="CheckFailed")
                fail.text = detail or c.message
            elif c.status == SKIPPED:
                ET.SubElement(case, "skipped", message=c.message)
            if detail and c.status != FAILED:
                out = ET.SubElement(case, "system-out")
                out.text = detail
        ET.indent(root)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _strict(value: Any) -> Any:
    """Replace non-finite floats by the strings Python's float() reads back, so the JSON is standard."""
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def environment() -> dict[str, str]:
    """Versions that decide the numbers: python, torch, onnx, onnxruntime, normfold."""
    env = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for mod in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # not installed: say so rather than fail the report
            env[mod] = "not installed"
    from normfold import __version__

    env["normfold"] = __version__
    return env

