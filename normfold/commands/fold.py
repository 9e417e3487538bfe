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

from rich.console import Console

from normfold.commands._common import (Command, add_model_arguments, add_output_argument, final_line,
                                       load_from_args, print_comparison, print_pass_result, resolve_inputs, verify,
                                       working_copy, write_model)
from normfold.errors import UsageError
from normfold.passes.fold_batchnorm import fold_batchnorm


class FoldCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)
        add_output_argument(p, "folded")

    def run(self, args: argparse.Namespace, console: Console) -> int:
        loaded = load_from_args(args)
        if loaded.kind == "exported":
            raise UsageError(f"{loaded.path} is an ExportedProgram (.pt2); folding .pt2 files is not supported yet: "
                             "fold the nn.Module (a .pt state_dict with --arch, or a pickled module with --trust)")
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
