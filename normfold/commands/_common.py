"""What every subcommand shares: argument groups, loading, inputs, verification, reports, writing.

Subcommands stay thin: they call the library and use these helpers to print
and to write files by the same rules (DESIGN.md, "Model files").
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from normfold.check.compare import OutputComparison, compare_outputs, max_errors
from normfold.errors import InputError, UsageError
from normfold.inputs import infer_input_shapes, model_dtype_device, parse_shape, random_inputs, run_model
from normfold.io import LoadedModel, default_output_path, load_model, save_model
from normfold.passes.base import PassResult, copy_module
from normfold.tolerances import Tolerance, for_dtype

__all__ = ["Command", "make_console", "add_model_arguments", "add_output_argument", "load_from_args",
           "resolve_inputs", "verify", "print_pass_result", "print_comparison", "write_model", "final_line",
           "Verification"]


class Command:
    """A subcommand: its class docstring is the help text."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the subcommand's arguments."""

    def run(self, args: argparse.Namespace, console: Console) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


def make_console(*, quiet: bool = False) -> Console:
    """The console commands print to (nothing but the final line when ``quiet``)."""
    return Console(quiet=quiet, highlight=False, soft_wrap=True)


def final_line(text: str) -> None:
    """The one line every command ends with; printed even with -q."""
    print(text, flush=True)


def add_model_arguments(p: argparse.ArgumentParser, *, inputs: bool = True) -> None:
    """MODEL, --arch, --trust and (optionally) --input-shape / --seed."""
    p.add_argument("model", metavar="MODEL", help="model file: .pt/.pth (state_dict or, with --trust, a pickled module) or .pt2")
    p.add_argument("--arch", metavar="PKG.MODULE:FACTORY", help="factory that builds the model, for a state_dict file")
    p.add_argument("--trust", action="store_true",
                   help="allow unpickling a whole nn.Module (this runs code from the file: only for files you trust)")
    if inputs:
        p.add_argument("--input-shape", metavar="SHAPE", action="append", default=None,
                       help="shape of one model input, e.g. 2,3,224,224 (repeat for several inputs); "
                            "inferred from the first layer when omitted")
        p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")


def add_output_argument(p: argparse.ArgumentParser, step: str) -> None:
    p.add_argument("-o", "--output", metavar="OUT",
                   help=f"where to write the result (default: <stem>.{step}<suffix> beside the input; never the input)")


def load_from_args(args: argparse.Namespace) -> LoadedModel:
    return load_model(args.model, trust=args.trust, arch=args.arch)


def resolve_inputs(args: argparse.Namespace, model: nn.Module, console: Console) -> tuple[torch.Tensor, ...]:
    """Seeded inputs from --input-shape, or from a shape inferred from the first layer (said on one line)."""
    dtype, device = model_dtype_device(model)
    if args.input_shape:
        shapes = [parse_shape(s) for s in args.input_shape]
        inputs = random_inputs(shapes, seed=args.seed, dtype=dtype, device=device)
        try:
            run_model(model, inputs)
        except Exception as exc:
            head = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            shown = " ".join(f"--input-shape {s}" for s in args.input_shape)
            raise InputError(f"{shown} does not fit the model ({type(exc).__name__}: {head}); "
                             "pass the shape its forward() expects") from exc
        return inputs
    inferred = infer_input_shapes(model)
    console.print(f"[dim]{inferred.reason}[/dim]")
    return random_inputs(inferred.shapes, seed=args.seed, dtype=dtype, device=device, integer_high=inferred.integer_high)


@dataclass
class Verification:
    """The comparison of a rewritten model with the original on seeded inputs."""

    comparisons: list[OutputComparison]
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def max_abs(self) -> float:
        return max_errors(self.comparisons)[0]

    @property
    def max_rel(self) -> float:
        return max_errors(self.comparisons)[1]


def verify(reference: nn.Module, candidate: nn.Module, inputs: Sequence[torch.Tensor],
           tolerance: Tolerance | None = None) -> Verification:
    """Run both models in eval on ``inputs`` and compare every output."""
    dtype, _ = model_dtype_device(reference)
    tol = tolerance or for_dtype(dtype)
    ref_out = run_model(reference, inputs)
    cand_out = run_model(candidate, inputs)
    return Verification(compare_outputs(ref_out, cand_out, tol), tol)


def print_pass_result(console: Console, result: PassResult, *, title: str, verbose: bool = False) -> None:
    """Two tables: what changed, what was skipped and why."""
    if result.changes:
        t = Table(title=f"{title}: {len(result.changes)} change(s)", title_justify="left", show_lines=False)
        t.add_column("#", justify="right", style="dim")
        t.add_column("change")
        for i, c in enumerate(result.changes, 1):
            t.add_row(str(i), c.message)
        console.print(t)
    else:
        console.print(f"{title}: nothing changed")
    print_skips(console, result.skipped)


def print_skips(console: Console, skipped: list) -> None:
    """The "left alone" table: every Skip's layer paths and reason."""
    if skipped:
        t = Table(title=f"left alone: {len(skipped)}", title_justify="left")
        t.add_column("layer")
        t.add_column("reason")
        for s in skipped:
            t.add_row(", ".join(s.paths) or "<model>", s.reason)
        console.print(t)


def print_comparison(console: Console, v: Verification) -> None:
    t = Table(title=f"outputs vs the original (atol {v.tolerance.atol:g}, rtol {v.tolerance.rtol:g})", title_justify="left")
    for col in ("output", "shape", "max abs err", "max rel err", "ok"):
        t.add_column(col)
    for c in v.comparisons:
        t.add_row(c.name, "x".join(map(str, c.candidate_shape)), f"{c.max_abs:.3g}", f"{c.max_rel:.3g}",
                  "yes" if c.passed else f"NO: {c.problem}")
    console.print(t)


def output_path(args: argparse.Namespace, loaded: LoadedModel, step: str) -> Path:
    return Path(args.output) if args.output else default_output_path(loaded.path, step)


def write_model(args: argparse.Namespace, loaded: LoadedModel, module: nn.Module, step: str,
                program: Any = None) -> Path:
    """Write atomically beside the input (or to -o), never over the input."""
    out = output_path(args, loaded, step)
    if out.suffix == ".pt2" and program is None:
        raise UsageError(f"-o {out}: .pt2 holds an ExportedProgram; write the rewritten nn.Module to a .pt file")
    return save_model(module, out, input_path=loaded.path, program=program)


def working_copy(module: nn.Module) -> nn.Module:
    """A deep copy for the rewrite, so the loaded original stays the reference."""
    return copy_module(module)
