"""Run the whole pipeline on a built-in model: fold BatchNorm, compare, report.

No arguments, no files, no network: builds normfold's demo CNN (random
weights, non-trivial BatchNorm statistics, foldable and deliberately
unfoldable BatchNorms), folds it, compares the folded model with the original
on seeded inputs and prints the report.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from normfold.commands._common import Command, final_line, print_comparison, print_pass_result, verify
from normfold.demo import DEMO_INPUT_SHAPE, build_demo_model
from normfold.inputs import random_inputs
from normfold.passes.fold_batchnorm import fold_batchnorm


class DemoCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=0, help="seed of the model and the inputs (default 0)")

    def run(self, args: argparse.Namespace, console: Console) -> int:
        model = build_demo_model(args.seed)
        inputs = random_inputs([DEMO_INPUT_SHAPE], seed=args.seed)
        console.print(f"demo model: {type(model).__name__}, input {tuple(DEMO_INPUT_SHAPE)}, seed {args.seed}")
        result = fold_batchnorm(model, example_inputs=inputs)
        print_pass_result(console, result, title="fold_batchnorm")
        v = verify(model, result.module, inputs)
        print_comparison(console, v)
        status = "PASSED" if v.passed else "FAILED"
        final_line(f"{status}: folded {len(result.changes)} BatchNorm layer(s), left {len(result.skipped)} alone; "
                   f"max abs error {v.max_abs:.3g}, max rel error {v.max_rel:.3g}")
        return 0 if v.passed else 1
