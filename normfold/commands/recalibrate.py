"""Re-estimate BatchNorm statistics on data from a new domain, and write the recalibrated model.

Loads MODEL and the unlabeled data of the new domain (--data: a tensor file,
.pt/.pth read with torch.load(weights_only=True), .npy or .npz; or a folder of
images, read with Pillow, resized to --image-size and normalized with
--mean/--std), runs it through the model with every BatchNorm measuring its
input (everything else in eval), and writes the model with the new statistics
beside the input as <stem>.recalibrated<suffix> (or -o OUT), never over the
input. Prints how far each layer's statistics moved: the mean in units of the
old standard deviation, and the variance ratio. Samples are visited in a
seeded random order (--seed), so that every batch mixes the data even when
they are sorted (a folder of class subfolders) and --max-batches takes a
representative subset. Exit 0 when written; 1 when the recalibrated model
gives non-finite outputs on the data (nothing is written then); 2 on bad
input, a model without a BatchNorm to recalibrate included. The data reader is the library's :func:`normfold.data.load_data`.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from normfold.commands._common import (Command, add_model_arguments, add_output_argument, add_safety_arguments,
                                       final_line, load_from_args, output_path, print_skips,
                                       write_model)
from normfold.errors import UsageError
from normfold.io import check_output_path
from normfold.inputs import run_model
from normfold.data import IMAGE_SUFFIXES, TENSOR_SUFFIXES, load_data
from normfold.recalibrate import DEFAULT_BATCH_SIZE, ESTIMATORS, RecalibrationResult, recalibrate

__all__ = ["RecalibrateCommand", "load_data", "IMAGE_SUFFIXES", "TENSOR_SUFFIXES"]



class RecalibrateCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p, inputs=False)
        p.add_argument("--data", metavar="PATH", required=True,
                       help="the new domain's unlabeled data: a tensor file (.pt, .pth, .npy, .npz) whose dim 0 "
                            "indexes samples, or a folder of images (searched recursively)")
        p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                       help=f"samples per forward pass (default {DEFAULT_BATCH_SIZE}; larger is closer to the "
                            "population statistics)")
        p.add_argument("--max-batches", type=int, default=None, metavar="N", help="stop after N batches")
        p.add_argument("--estimator", choices=ESTIMATORS, default="population",
                       help="population (default): every value weighted alike, exact pooled variance; cumulative: "
                            "torch's momentum=None, one weight per batch; ema: the layers' own momentum, no reset")
        p.add_argument("--image-size", metavar="H[,W]", help="resize images to H x W (default: their own size, "
                                                             "which must then be the same for all)")
        p.add_argument("--mean", metavar="M[,M,...]", help="per-channel mean subtracted from images scaled to [0, 1] "
                                                           "(e.g. 0.485,0.456,0.406)")
        p.add_argument("--std", metavar="S[,S,...]", help="per-channel std images are divided by (e.g. 0.229,0.224,0.225)")
        p.add_argument("--seed", type=int, default=0, help="seed of the order samples are visited in (default 0)")
        add_output_argument(p, "recalibrated")
        add_safety_arguments(p, noop=False)  # a model with nothing to recalibrate is refused by the library (exit 2)

    def run(self, args: argparse.Namespace, console: Console) -> int:
        for flag in ("batch_size", "max_batches"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise UsageError(f"--{flag.replace('_', '-')} {value} must be a positive integer")
        if args.output:
            check_output_path(args.output, [args.model, args.data], flag="-o", folder=True)
        loaded = load_from_args(args, console)
        if loaded.kind == "exported":
            raise UsageError(f"{loaded.path} is an ExportedProgram (.pt2), whose BatchNorms are graph ops without "
                             "running buffers to update: recalibrate the nn.Module (a .pt state_dict with --arch, "
                             "or a pickled module with --trust)")
        # refuse a bad -o before a long run, not after it
        check_output_path(output_path(args, loaded, "recalibrated"), [args.model, args.data], flag="-o", folder=True)
        original = loaded.module
        data, description = load_data(args.data, model=original, image_size=args.image_size,
                                      mean=args.mean, std=args.std, batch_size=args.batch_size, seed=args.seed)
        console.print(f"[dim]data: {description}[/dim]")
        result = recalibrate(original, data, estimator=args.estimator, max_batches=args.max_batches,
                             progress=not args.quiet)
        print_shifts(console, result)
        probe = next(iter(data))[:8]
        before = run_model(original, (probe,))
        after = run_model(result.module, (probe,))
        outs = [t for t in _tensors(after)]
        if not all(torch.isfinite(t).all() for t in outs if t.is_floating_point()):
            final_line("FAILED: the recalibrated model gives non-finite outputs on the data; nothing written")
            return 1
        change = max(((a.double() - b.double()).abs().max().item() for a, b in zip(outs, _tensors(before))
                      if a.is_floating_point() and a.shape == b.shape), default=float("nan"))
        console.print(f"outputs on {probe.shape[0]} samples of the data moved by up to {change:.3g} (max abs)")
        out = write_model(args, loaded, result.module, "recalibrated")
        top = result.most_shifted(1)
        largest = f"; largest mean shift {top[0].mean_shift:.3g} sd at {top[0].path}" if top else ""
        final_line(f"recalibrated {len(result.shifts)} BatchNorm layer(s) ({result.estimator}, {result.batches} "
                   f"batch(es), {result.samples} samples), left {len(result.skipped)} alone{largest}; wrote {out}")
        return 0


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in _tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def print_shifts(console: Console, result: RecalibrationResult) -> None:
    """One row per recalibrated layer: how far its statistics moved; then what was left alone and why."""
    t = Table(title=f"recalibrated: {len(result.shifts)} BatchNorm layer(s), {result.estimator} estimator",
              title_justify="left")
    for col, justify in (("layer", "left"), ("kind", "left"), ("values/ch", "right"),
                         ("mean shift (old sd)", "right"), ("max", "right"), ("variance ratio", "right")):
        t.add_column(col, justify=justify)
    for s in result.shifts:
        t.add_row(s.path, s.kind, str(s.count), f"{s.mean_shift:.3g}", f"{s.max_mean_shift:.3g}", f"x{s.var_ratio:.3g}")
    console.print(t)
    print_skips(console, result.skipped)
