"""Export MODEL to ONNX with the dynamo exporter, check it in onnxruntime, write it.

The batch dimension is dynamic (--static-batch to fix it to the example's);
the opset is the lowest at which the model's LayerNorm, GroupNorm and RMSNorm
export as native ONNX ops (--opset to choose). onnx.checker validates the
result; models over 2 GB are written with external data (OUT.onnx.data).
Before it is written, the ONNX model's outputs are compared in onnxruntime
with MODEL's in eval on seeded inputs (--input-shape, default inferred);
nothing is written when they differ. Writes <stem>.onnx beside MODEL, or -o
OUT.onnx. Run `normfold check` for the probes and CI reports. Exit 0
written, 1 export failed or outputs differ, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

from normfold.commands._checking import add_tolerance_arguments, print_report
from normfold.commands._common import (Command, add_model_arguments, add_safety_arguments, final_line,
                                       keyword_calls, load_from_args, resolve_inputs)
from normfold.check.checker import check
from normfold.errors import UsageError
from normfold.io import check_output_path
from normfold.export import export_onnx, move_onnx
from normfold.verify import tolerance_from_args


class ExportCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)
        p.add_argument("-o", "--output", metavar="OUT.onnx", help="where to write (default <stem>.onnx beside MODEL)")
        p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: chosen from the norm layers)")
        p.add_argument("--static-batch", action="store_true", help="fix the batch dimension to the example's")
        p.add_argument("--provider", metavar="LIST", default="cuda,cpu",
                       help="onnxruntime providers for the output check (default cuda,cpu)")
        add_safety_arguments(p, noop=False)
        add_tolerance_arguments(p.add_argument_group("comparison with MODEL in onnxruntime"))

    def run(self, args: argparse.Namespace, console: Console) -> int:
        out = Path(args.output) if args.output else Path(args.model).with_name(Path(args.model).stem + ".onnx")
        if args.opset is not None and args.opset < 7:
            raise UsageError(f"--opset {args.opset} is not an ONNX opset onnxruntime runs; use 18 or later")
        check_output_path(out, args.model, flag="-o", suffix=".onnx", what="ONNX file")
        loaded = load_from_args(args, console)
        model = loaded.module
        inputs = resolve_inputs(args, model, console, keywords=True)
        fixed = getattr(model, "fixed_batch", None)  # a .pt2 exported with a static batch
        if fixed is not None and not args.static_batch:
            console.print(f"{args.model} was exported with a fixed batch of {fixed}: the ONNX model gets the same "
                          "fixed batch (re-export the program with a dynamic batch for a dynamic one)",
                          markup=False, highlight=False)
            args.static_batch = True
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        # keyword inputs (a Hugging Face model): exported and compared with them as positional inputs
        # token ids (2-D integer inputs) get a symbolic sequence length too, as normfold.hf.export_onnx gives them
        sequence = isinstance(inputs, dict) and any(t.dim() == 2 and not t.is_floating_point() for t in inputs.values())
        with keyword_calls(inputs, model) as inputs:
            try:
                with console.status("exporting (torch.onnx.export, dynamo)"):
                    res = export_onnx(model, inputs, tmpdir / out.name, opset=args.opset,
                                      dynamic_batch=not args.static_batch, dynamic_sequence=sequence)
                for w in res.warnings:
                    console.print(f"warning: {w}", markup=False, highlight=False)
                console.print(f"exported {type(model).__name__} at opset {res.opset} ({res.opset_reason}) in "
                              f"{res.seconds:.1f}s; batch dimension {res.batch_dims}", markup=False, highlight=False)
                with console.status("comparing in onnxruntime"):
                    tol = tolerance_from_args(args)  # the flags' rule, or None: the per-dtype policy
                    report = check(model, onnx=res.path, inputs=inputs, providers=args.provider, probes=False,
                                   seed=args.seed, atol=tol.atol if tol else None, rtol=tol.rtol if tol else None,
                                   scale_tol=tol.scaled if tol else None)
                if not report.passed:
                    print_report(console, report, verbose=args.verbose)
                    final_line(f"FAILED: the ONNX model differs from {args.model} in onnxruntime; nothing written "
                               f"({report.final_line()[len('FAILED: '):]})")
                    return 1
                move_onnx(res.path, out)
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)
        size = res.size_bytes / 2**20
        final_line(f"wrote {out} ({size:.1f} MiB{', external data' if res.external_data else ''}, opset {res.opset}); "
                   f"onnxruntime ({report.provider}) matches the model: max abs error {report.max_abs_error():.3g}")
        return 0
