"""Convert the normalization layers of a model, check, write.

--to groupnorm   every BatchNorm to GroupNorm (--groups N, default the largest
                 divisor of C up to 32); --calibration-data PATH warm-starts
                 each channel's scale and shift by least squares on those
                 data (--sequential: layer by layer). Not exact: the output
                 error is reported, not checked.
--to syncbn      every BatchNorm to SyncBatchNorm (for multi-GPU training).
--to batchnorm   SyncBatchNorm and frozen BatchNorms back to BatchNorm1d/2d/3d.
--to frozen      every BatchNorm to a frozen per-channel affine (FrozenAffine).
--to rmsnorm     every LayerNorm to RMSNorm (--mode exact|approx|auto).

Loads MODEL, converts, compares the result with the original on seeded
inputs, and writes it beside the input as <stem>.<target><suffix> (or -o OUT),
never over the input. A state_dict (no mode) and a pickled module saved in
training mode are converted in their eval form. Exit 0 when written; 1 when
an exact conversion does not match the original, an approximate one gives
non-finite outputs, or nothing was converted (--allow-noop accepts that);
nothing is written then; 2 on bad input. --calibration-data FOLDER reads
images as `recalibrate --data` does (--image-size, --mean, --std).
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from normfold.commands._common import (Command, add_model_arguments, add_output_argument, add_safety_arguments,
                                       final_line, keyword_calls, load_from_args, output_path, print_comparison,
                                       print_pass_result, resolve_inputs, verify, working_copy, write_model)
from normfold.errors import UsageError
from normfold.io import check_output_path
from normfold.commands._checking import add_tolerance_arguments
from normfold.pipeline import RewriteOutcome
from normfold.verify import tolerance_from_args
from normfold.passes.base import PassResult

__all__ = ["ConvertCommand", "TARGETS"]

#: --to choice -> the step name in the default output file name
TARGETS = ("groupnorm", "syncbn", "batchnorm", "frozen", "rmsnorm")
RMS_MODES = ("exact", "approx", "auto")


class ConvertCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)
        p.add_argument("--to", required=True, choices=TARGETS, help="what to convert the norm layers to")
        p.add_argument("--groups", type=int, metavar="N", help="--to groupnorm: groups per layer (must divide "
                                                               "every converted layer's channels)")
        p.add_argument("--calibration-data", metavar="PATH",
                       help="--to groupnorm: inputs to warm-start the GroupNorms on: a tensor file (.pt, .pth, "
                            ".npy, .npz; dim 0 indexes samples) or a folder of images")
        p.add_argument("--sequential", action="store_true",
                       help="--to groupnorm with --calibration-data: fit the layers one after the other, each on "
                            "the inputs the converted layers before it produce (better; one pass per layer)")
        p.add_argument("--image-size", metavar="H[,W]", help="--calibration-data FOLDER: resize images to H x W "
                                                             "(default: their own size, the same for all)")
        p.add_argument("--mean", metavar="M[,M,...]", help="--calibration-data FOLDER: per-channel mean subtracted "
                                                           "from images scaled to [0, 1]")
        p.add_argument("--std", metavar="S[,S,...]", help="--calibration-data FOLDER: per-channel std images are "
                                                          "divided by")
        p.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="--calibration-data: samples per forward pass (default 32)")
        p.add_argument("--mode", choices=RMS_MODES, help="--to rmsnorm: exact (centre the residual streams, skip "
                                                         "where impossible), approx, or auto (default)")
        add_output_argument(p, "<target>")
        add_safety_arguments(p)
        add_tolerance_arguments(p.add_argument_group("comparison with the original (exact conversions)"))

    def run(self, args: argparse.Namespace, console: Console) -> int:
        self._check_flags(args)
        step = args.to
        if args.output:
            check_output_path(args.output, [args.model, args.calibration_data], flag="-o", folder=True)
        loaded = load_from_args(args, console)
        if loaded.kind == "exported":
            raise UsageError(f"{loaded.path} is an ExportedProgram (.pt2): its norm layers are graph ops, not "
                             "modules to replace; convert the nn.Module (a .pt state_dict with --arch, or a "
                             "pickled module with --trust)")
        # a bad -o fails before the work
        check_output_path(output_path(args, loaded, step), [args.model, args.calibration_data], flag="-o", folder=True)
        original = loaded.module
        inputs = resolve_inputs(args, original, console, keywords=True)
        model = working_copy(original)
        # keyword inputs (a Hugging Face model): both models take them positionally until the comparison is done
        with keyword_calls(inputs, original, model) as inputs:
            result, exact = self._convert(args, original, model, inputs, console)
            print_pass_result(console, result, title=f"convert --to {step}", verbose=args.verbose)
            n = converted_count(result)
            others = len(result.changes) - n
            edits = f", with {others} other edit(s) that make it so: centring, untying, folded scales" if others else ""
            if n == 0 and not args.allow_noop:
                final_line(f"FAILED: nothing converted to {step} (left {len(result.skipped)} alone; the reasons are "
                           "listed above); nothing written; pass --allow-noop to accept")
                return 1
            outcome = RewriteOutcome(result=result, verification=verify(original, result.module, inputs,
                                                                                 tolerance_from_args(args)), exact=exact)
            v = outcome.verification
            if exact:
                print_comparison(console, v)
            else:
                _print_error(console, v)
            if not outcome.passed:
                if exact:
                    final_line(f"FAILED: the converted model differs from the original (max abs error {v.max_abs:.3g}, "
                               f"max rel error {v.max_rel:.3g}); nothing written")
                else:
                    broken = outcome.broken_outputs()[0]
                    final_line(f"FAILED: the converted model's output {broken.name} is unusable ({broken.nan_count} NaN, "
                               f"{broken.inf_count} Inf, shape {'x'.join(map(str, broken.candidate_shape))} for "
                               f"{'x'.join(map(str, broken.reference_shape))}); nothing written")
                return 1
        out = write_model(args, loaded, result.module, step)
        how = "exact" if exact else "approximate"
        final_line(f"converted {n} layer(s) to {step} ({how}{edits}), left {len(result.skipped)} alone; max abs "
                   f"error {v.max_abs:.3g}, max rel error {v.max_rel:.3g}; wrote {out}")
        return 0

    @staticmethod
    def _check_flags(args: argparse.Namespace) -> None:
        gn_only = [f for f, v in (("--groups", args.groups), ("--calibration-data", args.calibration_data),
                                  ("--sequential", args.sequential or None), ("--image-size", args.image_size),
                                  ("--mean", args.mean), ("--std", args.std)) if v is not None]
        if args.to != "groupnorm" and gn_only:
            verb, obj = ("applies", "it") if len(gn_only) == 1 else ("apply", "them")
            raise UsageError(f"{', '.join(gn_only)} only {verb} to --to groupnorm; drop {obj} for --to {args.to}")
        if args.to != "rmsnorm" and args.mode is not None:
            raise UsageError(f"--mode only applies to --to rmsnorm; drop it for --to {args.to}")
        if args.groups is not None and args.groups < 1:
            raise UsageError(f"--groups {args.groups} must be a positive integer")
        if args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size} must be a positive integer")
        image_flags = [f for f, v in (("--image-size", args.image_size), ("--mean", args.mean), ("--std", args.std))
                       if v is not None]
        if image_flags and args.calibration_data is None:
            raise UsageError(f"{', '.join(image_flags)} describe(s) the images of --calibration-data FOLDER: pass it too")
        if args.sequential and args.calibration_data is None:
            raise UsageError("--sequential refines the warm start: pass --calibration-data PATH too")

    @staticmethod
    def _convert(args: argparse.Namespace, original: nn.Module, model: nn.Module, inputs: tuple, console: Console
                 ) -> tuple[PassResult, bool]:
        """(result, whether the conversion of ``model``, a working copy of ``original``, is exact)."""
        if args.to == "groupnorm":
            from normfold.passes.batchnorm_to_groupnorm import batchnorm_to_groupnorm

            data: Any = None
            if args.calibration_data is not None:
                from normfold.data import load_data

                data, description = load_data(args.calibration_data, model=original, batch_size=args.batch_size,
                                              image_size=args.image_size, mean=args.mean, std=args.std,
                                              seed=args.seed, flag="--calibration-data")
                console.print(f"[dim]calibration data: {description}[/dim]")
                if hasattr(data, "shape"):  # a tensor: batch it here, the pass takes it in slices
                    data = list(data.split(args.batch_size))
            return batchnorm_to_groupnorm(model, num_groups=args.groups, calibration_data=data,
                                          sequential=args.sequential, example_inputs=inputs, inplace=True), False
        if args.to == "syncbn":
            from normfold.passes.syncbn import to_syncbn

            return to_syncbn(model, inplace=True), True
        if args.to == "batchnorm":
            from normfold.passes.base import PassManager
            from normfold.passes.freeze_batchnorm import UnfreezeBatchNorm
            from normfold.passes.syncbn import FromSyncBatchNorm

            pm = PassManager([FromSyncBatchNorm(example_inputs=inputs), UnfreezeBatchNorm(example_inputs=inputs)])
            return pm(model, inplace=True), True
        if args.to == "frozen":
            from normfold.passes.freeze_batchnorm import freeze_batchnorm

            return freeze_batchnorm(model, inplace=True), True
        # rmsnorm: another engineer's pass, imported only when asked for
        from normfold.passes.layernorm_to_rmsnorm import layernorm_to_rmsnorm

        result = layernorm_to_rmsnorm(model, mode=args.mode or "auto", example_inputs=inputs, inplace=True)
        return result, not result.metrics.get("layers_approx")


#: Change actions that replace a norm layer (the other changes of a conversion, such as centring the residual
#: stream for an exact RMSNorm, are edits that make the replacement exact, not converted layers)
CONVERSIONS = ("replace", "to_syncbn", "from_syncbn", "freeze", "unfreeze", "to_rmsnorm")


def converted_count(result: PassResult) -> int:
    """Norm layers the conversion replaced."""
    return sum(1 for c in result.changes if c.action in CONVERSIONS)


def _print_error(console: Console, v: Any) -> None:
    """The output error of an approximate conversion: measured and shown, not held to a tolerance."""
    t = Table(title="outputs vs the original (approximate conversion: measured, not checked)", title_justify="left")
    for col in ("output", "shape", "max abs err", "max rel err", "mean abs err"):
        t.add_column(col)
    for c in v.comparisons:
        t.add_row(c.name, "x".join(map(str, c.candidate_shape)), f"{c.max_abs:.3g}", f"{c.max_rel:.3g}",
                  f"{c.mean_abs:.3g}" if not (c.nan_count or c.inf_count) else c.problem or "non-finite")
    console.print(t)
