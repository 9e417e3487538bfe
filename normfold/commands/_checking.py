"""What `check`, `fold --check` and `demo` share: checker options, running it with a spinner, printing, reports.

The report's text is printed through the console (silenced by -q) except its
last line, PASSED or FAILED, which every command ends with. --json and
--junit-xml are written whether the check passed or not (a CI job needs the
report most when it failed), atomically.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from rich.console import Console

from normfold.check.checker import check
from normfold.check.probes import DEFAULT_BATCH_SIZES
from normfold.check.report import CheckReport
from normfold.commands._common import final_line
from normfold.errors import UsageError
from normfold.io import atomic_write

__all__ = ["add_check_arguments", "add_report_arguments", "run_check", "print_report", "write_reports",
           "parse_batch_sizes", "finish", "check_report_paths", "strip_ansi",
           "add_tolerance_arguments"]


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """--json FILE and --junit-xml FILE."""
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--junit-xml", metavar="FILE", help="write a JUnit XML report (one testcase per check) for CI")


def add_tolerance_arguments(g: Any) -> None:
    """--scale-tol, --atol, --rtol: the same flags, read by :func:`normfold.verify.tolerance_from_args`, on every
    command that compares a rewritten model with the original."""
    g.add_argument("--scale-tol", type=float, default=None, metavar="S",
                   help="pass when |a - b| <= S * max|ref| per output (default: by the output's dtype, 2e-5 for "
                        "float32, measured; see normfold/tolerances.py)")
    g.add_argument("--atol", type=float, default=None, help="absolute tolerance; --atol/--rtol/--scale-tol given "
                                                              "replace the default rule (the ones not given are 0)")
    g.add_argument("--rtol", type=float, default=None, help="relative tolerance, elementwise: |a - b| <= rtol * |ref|")


def add_check_arguments(p: argparse.ArgumentParser, *, reports: bool = True) -> None:
    """The checker's options (tolerances, providers, probes) and, with ``reports``, --json / --junit-xml."""
    g = p.add_argument_group("checker")
    g.add_argument("--provider", metavar="LIST", default="cuda,cpu",
                   help="onnxruntime providers in order of preference (default cuda,cpu); the one that actually "
                        "ran is reported")
    g.add_argument("--require-provider", metavar="NAME",
                   help="fail unless this provider (e.g. cuda) actually ran the ONNX model")
    add_tolerance_arguments(g)
    g.add_argument("--batch-sizes", metavar="LIST", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                   help="batch sizes of the batch-independence probe (default 1,2,8)")
    g.add_argument("--no-probes", action="store_true",
                   help="compare outputs only (no batch-independence, training-mode, batch-dimension or norm-op checks)")
    g.add_argument("--threads", type=int, default=None, metavar="N", help="onnxruntime intra-op threads")
    if reports:
        add_report_arguments(p)


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r} must be positive integers like 1,2,8") from None
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"--batch-sizes {text!r} must be positive integers like 1,2,8")
    return sizes


def check_report_paths(args: argparse.Namespace) -> None:
    """Refuse unwritable --json / --junit-xml paths (and input files) before any work, naming the flag."""
    from normfold.io import check_output_path

    inputs = [getattr(args, "model", ""), getattr(args, "candidate", "") or "", getattr(args, "onnx", "") or ""]
    for flag in ("json", "junit_xml"):
        value = getattr(args, flag, None)
        if value:
            check_output_path(value, inputs, flag=f"--{flag.replace('_', '-')}")


def run_check(args: argparse.Namespace, console: Console, reference: Any, **kwargs: Any) -> CheckReport:
    """Run :func:`normfold.check` with the options in ``args``, showing progress on the console."""
    if getattr(args, "atol", None) is not None and args.atol < 0:
        raise UsageError(f"--atol {args.atol} must be >= 0")
    if getattr(args, "rtol", None) is not None and args.rtol < 0:
        raise UsageError(f"--rtol {args.rtol} must be >= 0")
    if getattr(args, "scale_tol", None) is not None and args.scale_tol < 0:
        raise UsageError(f"--scale-tol {args.scale_tol} must be >= 0")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads} must be a positive integer")
    check_report_paths(args)
    with console.status("checking") as status:
        def progress(msg: str) -> None:
            status.update(msg)

        return check(reference, providers=args.provider, require_provider=args.require_provider, atol=args.atol,
                     rtol=args.rtol, scale_tol=args.scale_tol, probes=not args.no_probes, batch_sizes=parse_batch_sizes(args.batch_sizes),
                     threads=args.threads, progress=progress, **kwargs)


def print_report(console: Console, report: CheckReport, *, verbose: bool = False) -> None:
    """The report's text on the console, then its PASSED/FAILED line via :func:`final_line`."""
    lines = report.to_text(verbose=verbose).splitlines()
    for line in lines[:-1]:
        style = None
        if "[FAIL]" in line:
            style = "bold red"
        elif "[skip]" in line:
            style = "dim"
        console.print(line, style=style, markup=False, highlight=False)


def write_reports(args: argparse.Namespace, report: CheckReport, console: Console) -> None:
    """--json and --junit-xml, atomically, for a check that completed (pass or fail); never terminal escapes."""
    for flag, text in (("json", report.to_json), ("junit_xml", report.to_junit_xml)):
        value = getattr(args, flag, None)
        if not value:
            continue
        out = Path(value)
        body = strip_ansi(text())
        atomic_write(out, lambda tmp, body=body: Path(tmp).write_text(body, encoding="utf-8"))
        console.print(f"wrote {out}", markup=False, highlight=False)


#: ANSI/VT100 escape sequences (colour, cursor movement) that tracers and exporters put in error messages
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences: report files are read by CI tools, not terminals."""
    return _ANSI.sub("", text)


def finish(args: argparse.Namespace, console: Console, report: CheckReport) -> int:
    """Print, write the reports, print the final line; the exit code (0 passed, 1 failed)."""
    print_report(console, report, verbose=getattr(args, "verbose", False))
    write_reports(args, report, console)
    final_line(report.final_line())
    return 0 if report.passed else 1

