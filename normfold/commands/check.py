"""Check that a transformed model and/or its ONNX export compute what MODEL computes in eval.

MODEL is the trained PyTorch model (the reference: a copy of it forced to
eval). --candidate is a transformed model file (for example the output of
`normfold fold`), run as it is; --onnx an ONNX file, run in onnxruntime.
Without --onnx, the candidate (or MODEL) is exported with the dynamo
exporter and that export is checked (--no-export to skip; --save-onnx to
keep it). Stages are compared one by one and a mismatch is blamed on the
first stage where it appears, with the first diverging layer named.

Probes: batch independence (a sample alone and in batches of 2 and 8, in
PyTorch and onnxruntime), modules or ONNX ops left in training mode, a fixed
batch dimension, and a lint of the ONNX normalization ops. The onnxruntime
provider that actually ran is reported; --require-provider cuda fails when
CUDA did not start.

Inputs: seeded random inputs of --input-shape (default: inferred from the
first layer), drawn from N(0.5, 2^2), or real inputs from --inputs FILE
(.pt, .npy, .npz). Reports: the summary ends in one PASSED or FAILED line;
--json FILE and --junit-xml FILE for CI. Exit 0 passed, 1 failed, 2 bad usage
or unusable input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

import torch

from normfold.commands._checking import add_check_arguments, check_report_paths, finish, run_check
from normfold.commands._common import (Command, add_model_arguments, add_safety_arguments, keyword_calls,
                                       load_from_args, resolve_inputs)
from normfold.hf import is_hf_model
from normfold.errors import UsageError
from normfold.io import check_output_path
from normfold.inputs import parse_shape


class CheckCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)
        p.add_argument("--candidate", metavar="FILE", help="the transformed model to check (.pt/.pth/.pt2; read with "
                                                           "the same --trust/--arch rules as MODEL)")
        p.add_argument("--onnx", metavar="FILE", help="the ONNX model to check in onnxruntime")
        p.add_argument("--inputs", metavar="FILE", help="real inputs: a .pt (tensor, tuple or dict of tensors), "
                                                        ".npy or .npz file; dim 0 is the batch")
        p.add_argument("--no-export", action="store_true", help="without --onnx, do not export: check PyTorch only")
        p.add_argument("--save-onnx", metavar="FILE", help="keep the ONNX file the check exported")
        p.add_argument("--opset", type=int, default=None, help="opset of the export (default: chosen from the "
                                                               "model's norm layers)")
        add_check_arguments(p)
        add_safety_arguments(p, noop=False)

    def run(self, args: argparse.Namespace, console: Console) -> int:
        if Path(args.model).suffix == ".onnx":
            raise UsageError(f"MODEL {args.model} is an ONNX file; MODEL is the PyTorch reference: pass the ONNX "
                             "file with --onnx")
        if args.inputs and args.input_shape:
            raise UsageError("pass either --inputs FILE or --input-shape, not both")
        if args.onnx and args.save_onnx:
            raise UsageError("--save-onnx keeps the ONNX file the check exports; with --onnx nothing is exported")
        if args.onnx and Path(args.onnx).suffix != ".onnx":
            raise UsageError(f"--onnx {args.onnx}: expected a .onnx file")
        if args.opset is not None and args.opset < 7:
            raise UsageError(f"--opset {args.opset} is not an ONNX opset onnxruntime runs; use 18 or later")
        if args.candidate and Path(args.candidate).exists() and Path(args.candidate).resolve() == \
                Path(args.model).resolve():
            raise UsageError("--candidate is MODEL itself; pass the transformed model file")
        if args.save_onnx:
            check_output_path(args.save_onnx, [args.model, args.candidate], flag="--save-onnx", suffix=".onnx",
                              what="ONNX file")
        check_report_paths(args)
        if args.input_shape:
            from normfold.pipeline import DEFAULT_MAX_INPUT_BYTES, check_input_size

            check_input_size([parse_shape(s) for s in args.input_shape], torch.float32,
                             limit=getattr(args, "max_input_bytes", DEFAULT_MAX_INPUT_BYTES))
        loaded = load_from_args(args, console)
        candidate = None
        if args.candidate:
            candidate = load_from_args(args, console, path=args.candidate, what="--candidate", as_is=True).module
        exported_from = candidate if candidate is not None else loaded.module
        fixed = getattr(exported_from, "fixed_batch", None)
        if fixed is not None and not args.onnx and not args.no_export:
            console.print(f"{args.candidate or args.model} was exported with a fixed batch of {fixed}, which its ONNX "
                          "export cannot make dynamic: checked in PyTorch only (pass --onnx FILE to check an ONNX "
                          "file too)", markup=False, highlight=False)
            args.no_export = True
        if loaded.kind == "exported" and not args.input_shape and not args.inputs:
            args.inputs = None
            like = loaded.module.example_inputs(seed=args.seed)
            if like is None:
                raise UsageError(f"{args.model}: the program does not record its example inputs; pass --input-shape")
            report = run_check(args, console, loaded.module, candidate=candidate, onnx=args.onnx, inputs=like,
                               seed=args.seed, export=not args.no_export, opset=args.opset, save_onnx=args.save_onnx)
            return finish(args, console, report)
        if is_hf_model(loaded.module) and not args.inputs:
            # the keyword inputs its config describes; both models (and the ONNX export) take them positionally
            kw = resolve_inputs(args, loaded.module, console, keywords=True)
            models = [m for m in (loaded.module, candidate) if isinstance(m, torch.nn.Module)]
            with keyword_calls(kw, *models) as x:
                report = run_check(args, console, loaded.module, candidate=candidate, onnx=args.onnx, inputs=x,
                                   seed=args.seed, export=not args.no_export, opset=args.opset,
                                   save_onnx=args.save_onnx)
            return finish(args, console, report)
        shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape else None
        report = run_check(args, console, loaded.module, candidate=candidate, onnx=args.onnx, inputs=args.inputs,
                           input_shapes=shapes, seed=args.seed, export=not args.no_export, opset=args.opset,
                           save_onnx=args.save_onnx)
        return finish(args, console, report)
