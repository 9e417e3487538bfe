"""List every normalization layer: path, type, what can be done to it, and if not, why.

The fold is dry-run on a copy; MODEL is not changed and nothing is written.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from normfold.commands._common import Command, add_model_arguments, final_line, load_from_args, resolve_inputs
from normfold.errors import UsageError
from normfold.inspect import inspect_model


class InspectCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)

    def run(self, args: argparse.Namespace, console: Console) -> int:
        loaded = load_from_args(args)
        if loaded.kind == "exported":
            raise UsageError(f"{loaded.path} is an ExportedProgram (.pt2); inspect reads nn.Modules: run "
                             f"`normfold fold {loaded.path}` to see what folds at the ATen level, and why not")
        inputs = resolve_inputs(args, loaded.module, console)
        reports, totals = inspect_model(loaded.module, example_inputs=inputs)
        t = Table(title=f"normalization layers in {loaded.path}", title_justify="left")
        for col in ("path", "type", "can be done", "why not"):
            t.add_column(col)
        for r in reports:
            t.add_row(r.path, r.type, "; ".join(r.actions) or "-", r.reason or "")
        console.print(t)
        kinds = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in totals.items() if k.startswith("kind:"))
        final_line(f"{totals['layers']} normalization layer(s) ({kinds or 'none'}); "
                   f"{totals['foldable']} BatchNorm(s) can be folded")
        return 0
