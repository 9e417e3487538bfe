"""Fold BatchNorm into the Conv/ConvTranspose/Linear before it, check, write.

Loads MODEL, folds every BatchNorm that can be folded exactly, compares the
folded model with the original on seeded inputs, and writes it beside the
input as <stem>.folded<suffix> (or -o OUT), never over the input. Prints what
was folded, what was left alone and why, and the max abs and relative error.
Exit 0 when the folded model matches, 1 when it does not (nothing is written
then), 2 on bad input.
"""

from __future__ import annotations

import argparse
import logging

from rich.console import Console

import torch

from normfold.check.compare import compare_outputs
from normfold.commands._common import (Command, Verification, add_model_arguments, add_output_argument, final_line,
                                       load_from_args, output_path, print_comparison, print_pass_result,
                                       resolve_inputs, verify, working_copy, write_model)
from normfold.errors import InputError, UsageError
from normfold.inputs import parse_shape, random_inputs
from normfold.io import LoadedModel
from normfold.tolerances import for_dtype
from normfold.passes.fold_batchnorm import fold_batchnorm


class FoldCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)
        add_output_argument(p, "folded")

    def run(self, args: argparse.Namespace, console: Console) -> int:
        loaded = load_from_args(args)
        if loaded.kind == "exported":
            return _fold_exported(args, console, loaded)
        original = loaded.module
        inputs = resolve_inputs(args, original, console)
        result = fold_batchnorm(working_copy(original), inplace=True, example_inputs=inputs)
        print_pass_result(console, result, title="fold_batchnorm", verbose=args.verbose)
        v = verify(original, result.module, inputs)
        print_comparison(console, v)
        folded = len(result.changes)
        if not v.passed:
            final_line(f"FAILED: the folded model differs from the original (max abs error {v.max_abs:.3g}, "
                       f"max rel error {v.max_rel:.3g}); nothing written")
            return 1
        out = write_model(args, loaded, result.module, "folded")
        final_line(f"folded {folded} BatchNorm layer(s), left {len(result.skipped)} alone; max abs error "
                   f"{v.max_abs:.3g}, max rel error {v.max_rel:.3g}; wrote {out}")
        return 0


def _fold_exported(args: argparse.Namespace, console: Console, loaded: LoadedModel) -> int:
    """The .pt2 path: fold the ExportedProgram at the ATen level, compare, write a .pt2."""
    from normfold.passes.fold_exported import fold_exported_program, program_inputs

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
    result = fold_exported_program(program)
    print_pass_result(console, result, title="fold_batchnorm (ATen, .pt2)", verbose=args.verbose)
    with torch.no_grad():
        cand_out = result.program.module()(*inputs)
    floating = [x for x in inputs if x.is_floating_point()]
    tol = for_dtype(floating[0].dtype if floating else torch.float32)
    v = Verification(compare_outputs(ref_out, cand_out, tol), tol)
    print_comparison(console, v)
    if not v.passed:
        final_line(f"FAILED: the folded program differs from the original (max abs error {v.max_abs:.3g}, "
                   f"max rel error {v.max_rel:.3g}); nothing written")
        return 1
    # torch.export.save warns about the temporary file's name (not *.pt2) of the atomic write: not the user's business
    pkg_log = logging.getLogger("torch.export.pt2_archive._package")
    level = pkg_log.level
    pkg_log.setLevel(logging.ERROR)
    try:
        written = write_model(args, loaded, result.module, "folded", program=result.program)
    finally:
        pkg_log.setLevel(level)
    folds = sum(1 for c in result.changes if c.action.startswith("fold"))
    bakes = len(result.changes) - folds
    baked = f", baked {bakes} weight standardization(s)" if bakes else ""
    final_line(f"folded {folds} BatchNorm layer(s){baked}, left {len(result.skipped)} alone; max abs error "
               f"{v.max_abs:.3g}, max rel error {v.max_rel:.3g}; wrote {written}")
    return 0
