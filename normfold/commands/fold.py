"""Fold BatchNorm into the Conv/ConvTranspose/Linear before it, check, write.

Loads MODEL, folds every BatchNorm that can be folded exactly, compares the
folded model with the original on seeded inputs, and writes it beside the
input (or -o OUT), never over the input. Prints what was folded, what was
left alone and why, and the max abs and relative error.

The model folded is the one you deploy: its eval form. A state_dict has no
mode (torchvision and timm factories build models in training mode) and is
folded in eval; a pickled module saved in training mode is folded in its eval
form, which one line says. A model that does not trace whole (data-dependent
control flow in its forward) is folded part by part: every submodule that
traces is folded, and the code that does not is listed with the reason.

Exit 0 when the folded model matches; 1 when it does not, or when nothing
could be folded (a CI step must not pass on a no-op: --allow-noop accepts
it); nothing is written then; 2 on bad input.

--onnx OUT.onnx also exports the folded model (dynamo exporter, dynamic batch)
and compares it in onnxruntime with the original; --check runs the full
checker on the way (the stages, every probe, the report of `normfold check`,
--json/--junit-xml), with or without --onnx. Nothing is written unless every
comparison passes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from rich.console import Console

import torch

from normfold.commands._common import (Command, add_model_arguments, add_output_argument,
                                       add_safety_arguments, final_line, keyword_calls, load_from_args, output_path,
                                       print_comparison, print_pass_result, quiet_tracing, resolve_inputs,
                                       write_model)
from normfold.commands._checking import add_check_arguments, check_report_paths, print_report, run_check, \
    write_reports
from normfold.errors import InputError, UsageError
from normfold.export import move_onnx
from normfold.inputs import parse_shape, random_inputs
from normfold.io import LoadedModel, check_output_path
from normfold.norms import is_batchnorm, norm_kind
from normfold.verify import compare, tolerance_from_args
from normfold import pipeline


class FoldCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)
        add_output_argument(p, "folded")
        p.add_argument("--onnx", metavar="OUT.onnx", help="also export the folded model to ONNX, checked in onnxruntime")
        p.add_argument("--check", action="store_true", help="run the full checker (probes, report) before writing")
        p.add_argument("--opset", type=int, default=None, help="ONNX opset of --onnx (default: from the norm layers)")
        p.add_argument("--merge-branches", action="store_true",
                       help="also merge the parallel branches of re-parameterizable blocks (RepVGG, MobileOne, "
                            "FastViT, ...) into one conv each, on a module or a .pt2; a merged block becomes "
                            "nn.Sequential(merged_conv, ...) where it is a chain (any output format), else a "
                            "GraphModule (write -o OUT.pt2 or --pickle)")
        add_check_arguments(p)
        add_safety_arguments(p)

    def run(self, args: argparse.Namespace, console: Console) -> int:
        # every output is refused before the work, not after it
        if args.onnx is not None:
            check_output_path(args.onnx, args.model, flag="--onnx", suffix=".onnx", what="ONNX file")
        if args.output:
            check_output_path(args.output, args.model, flag="-o", folder=True)
        check_report_paths(args)
        loaded = load_from_args(args, console)
        if not args.output:
            check_output_path(output_path(args, loaded, "folded"), args.model, flag="-o", folder=True)
        if loaded.kind == "exported":
            if args.onnx or args.check:
                raise UsageError("--onnx and --check work on nn.Module models; fold the .pt2, then run "
                                 "`normfold check` on the result")
            return _fold_exported(args, console, loaded)
        original = loaded.module
        # a Hugging Face model gets the keyword inputs its config describes (pipeline.fold takes the dict)
        inputs = resolve_inputs(args, original, console, keywords=True)
        with quiet_tracing(enabled=not args.verbose):  # a failed trace prints its partial graph on stderr
            outcome = pipeline.fold(original, inputs, tolerance=tolerance_from_args(args),
                                    merge_branches=args.merge_branches)
        result, v = outcome.result, outcome.verification
        print_pass_result(console, result, title="fold_batchnorm", verbose=args.verbose)
        if _refuse_noop(args, result, original):
            return 1
        print_comparison(console, v)
        if not v.passed:
            final_line(f"FAILED: the folded model differs from the original (max abs error {v.max_abs:.3g}, "
                       f"max rel error {v.max_rel:.3g}); nothing written")
            return 1
        if args.onnx is None and not args.check:
            out = write_model(args, loaded, result.module, "folded")
            final_line(f"{fold_summary(result)}; max abs error {v.max_abs:.3g}, max rel error {v.max_rel:.3g}; "
                       f"wrote {out}")
            return 0
        return _export_and_check(args, console, loaded, original, result.module, inputs, fold_summary(result))


def _refuse_noop(args: argparse.Namespace, result, model: torch.nn.Module | None = None) -> bool:
    """A fold that folded nothing is not a success (a CI step must not pass on it) unless --allow-noop.

    The line says why: the BatchNorms left alone (the table above gives each reason), or, for ``model``
    without any BatchNorm, that there is nothing to fold and which norm layers it has instead.
    """
    if folded_count(result) or args.allow_noop:
        return False
    if model is not None and not result.skipped and not any(is_batchnorm(m) for m in model.modules()):
        kinds = Counter(k for k in map(norm_kind, model.modules()) if k is not None)
        has = "norm layers: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) if kinds else "no norm layer"
        hint = "; `normfold convert --to rmsnorm` rewrites LayerNorm" if "layernorm" in kinds else ""
        final_line(f"FAILED: nothing to fold: the model has no BatchNorm layer ({has}{hint}); nothing written; "
                   "pass --allow-noop to accept a model with nothing to fold")
        return True
    final_line(f"FAILED: nothing folded ({fold_summary(result)}; the reasons are listed above); nothing written; "
               "pass --allow-noop to accept a model with nothing to fold")
    return True


def _export_and_check(args: argparse.Namespace, console: Console, loaded: LoadedModel, original: torch.nn.Module,
                      folded_model: torch.nn.Module, inputs: tuple, summary: str) -> int:
    """--onnx / --check: export to a temporary file, check, then write the model (and the ONNX file) if it passed."""
    tmpdir = Path(tempfile.mkdtemp(prefix=".normfold-fold-", dir=Path(args.onnx).parent if args.onnx else None))
    try:
        onnx_tmp = tmpdir / (Path(args.onnx).name if args.onnx else "folded.onnx")
        if not args.check:
            args.no_probes = True  # --onnx alone: compare the outputs; --check adds the probes
        # keyword inputs (a Hugging Face model): both models and the export take them positionally
        with keyword_calls(inputs, original, folded_model) as x:
            report = run_check(args, console, original, candidate=folded_model, inputs=x, seed=args.seed,
                               opset=args.opset, save_onnx=onnx_tmp)
        if args.check or not report.passed:
            print_report(console, report, verbose=args.verbose)
        if args.onnx:  # where the checked file ends up (or, when the check fails, that it is not written)
            report.onnx["path"] = str(args.onnx) if report.passed else None
        write_reports(args, report, console)
        if not report.passed:
            final_line(f"{report.final_line()}; nothing written")
            return 1
        wrote = [str(write_model(args, loaded, folded_model, "folded"))]
        if args.onnx:
            wrote.append(str(move_onnx(onnx_tmp, args.onnx)))
        final_line(f"{report.final_line()}; {summary}; wrote {', '.join(wrote)}")
        return 0
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _fold_exported(args: argparse.Namespace, console: Console, loaded: LoadedModel) -> int:
    """The .pt2 path: fold the ExportedProgram at the ATen level, compare, write a .pt2."""
    from normfold.passes.fold import fold_batchnorm
    from normfold.passes.fold_exported import program_inputs

    out = output_path(args, loaded, "folded")
    if out.suffix != ".pt2":
        raise UsageError(f"-o {out}: folding a .pt2 writes an ExportedProgram; give the output a .pt2 suffix")
    program = loaded.program
    if args.input_shape:
        shapes = [parse_shape(s) for s in args.input_shape]
        dtype = next((p.dtype for p in program.state_dict.values() if p.is_floating_point()), torch.float32)
        inputs = random_inputs(shapes, seed=args.seed, dtype=dtype)
    else:
        inputs = program_inputs(program, seed=args.seed)
        if inputs is None:
            raise UsageError(f"{loaded.path}: cannot tell the program's input shapes; pass --input-shape")
        console.print(f"[dim]inputs shaped like the program's example inputs: "
                      f"{', '.join(','.join(map(str, x.shape)) for x in inputs)} (pass --input-shape to choose)[/dim]")
    reference = program.module()
    try:
        with torch.no_grad():
            ref_out = reference(*inputs)
    except Exception as exc:
        head = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"the inputs do not fit the program ({type(exc).__name__}: {head}); "
                         "pass --input-shape with a shape it was exported for") from exc
    result = fold_batchnorm(program, merge_branches=args.merge_branches)
    print_pass_result(console, result, title="fold_batchnorm (ATen, .pt2)", verbose=args.verbose)
    if _refuse_noop(args, result):
        return 1
    with torch.no_grad():
        cand_out = result.program.module()(*inputs)
    v = compare(ref_out, cand_out, tolerance=tolerance_from_args(args))
    print_comparison(console, v)
    if not v.passed:
        final_line(f"FAILED: the folded program differs from the original (max abs error {v.max_abs:.3g}, "
                   f"max rel error {v.max_rel:.3g}); nothing written")
        return 1
    written = write_model(args, loaded, result.module, "folded", program=result.program)
    final_line(f"{fold_summary(result)}; max abs error {v.max_abs:.3g}, max rel error {v.max_rel:.3g}; "
               f"wrote {written}")
    return 0


def folded_count(result) -> int:
    """BatchNorm layers folded (bakes of weight standardization and branch merges are not folds)."""
    return sum(1 for c in result.changes if c.action.startswith("fold"))


def fold_summary(result) -> str:
    """"folded N BatchNorm layer(s)[, baked M weight standardization(s)][, merged K block(s)], left L alone"."""
    folds = folded_count(result)
    merges = sum(1 for c in result.changes if c.action == "merge_branches")
    bakes = len(result.changes) - folds - merges
    baked = f", baked {bakes} weight standardization(s)" if bakes else ""
    merged = f", merged the branches of {merges} block(s)" if merges else ""
    return f"folded {folds} BatchNorm layer(s){baked}{merged}, left {len(result.skipped)} alone"
