"""Run the whole pipeline on a built-in model: fold BatchNorm, export to ONNX, check, report.

No arguments, no files, no network: builds normfold's demo CNN (random
weights, non-trivial BatchNorm statistics, foldable and deliberately
unfoldable BatchNorms), folds it, exports the folded model with the dynamo
exporter, and checks original (PyTorch, eval), folded (PyTorch) and ONNX
(onnxruntime, CUDA if it really starts, CPU otherwise) stage by stage on
seeded inputs, with every probe. Prints what was folded and the checker's
report; the last line is PASSED or FAILED. --save-onnx keeps the ONNX file.
"""

from __future__ import annotations

import argparse

from rich.console import Console

from normfold.commands._checking import add_report_arguments, check_report_paths, print_report, write_reports
from normfold.commands._common import Command, final_line, print_pass_result
from normfold.check.checker import check
from normfold.demo import DEMO_INPUT_SHAPE, build_demo_model
from normfold.io import check_output_path
from normfold.inputs import random_inputs
from normfold.passes.fold_batchnorm import fold_batchnorm


class DemoCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=0, help="seed of the model and the inputs (default 0)")
        p.add_argument("--save-onnx", metavar="FILE", help="keep the exported ONNX file")
        add_report_arguments(p)

    def run(self, args: argparse.Namespace, console: Console) -> int:
        # every output is refused before the work, not after it
        if args.save_onnx:
            check_output_path(args.save_onnx, flag="--save-onnx", suffix=".onnx", what="ONNX file")
        check_report_paths(args)
        model = build_demo_model(args.seed)
        inputs = random_inputs([DEMO_INPUT_SHAPE], seed=args.seed)
        console.print(f"demo model: {type(model).__name__}, input {tuple(DEMO_INPUT_SHAPE)}, seed {args.seed}")
        result = fold_batchnorm(model, example_inputs=inputs)
        print_pass_result(console, result, title="fold_batchnorm")
        with console.status("checking") as status:
            report = check(model, candidate=result.module, inputs=inputs, seed=args.seed, save_onnx=args.save_onnx,
                           progress=status.update)
        print_report(console, report, verbose=getattr(args, "verbose", False))
        write_reports(args, report, console)
        final_line(f"{report.final_line()}; folded {len(result.changes)} BatchNorm layer(s), "
                   f"left {len(result.skipped)} alone")
        return 0 if report.passed else 1
