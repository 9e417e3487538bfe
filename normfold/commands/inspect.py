"""List every normalization layer: path, type, what can be done to it, and if not, why.

The fold is dry-run on a copy of the model's eval form (what `fold` folds: a
state_dict has no mode, a module saved in training mode is folded in eval);
MODEL is not changed and nothing is written. A .pt2 lists its batch_norm ops
and what the ATen-level fold does to each.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from normfold.commands._common import (Command, add_model_arguments, add_safety_arguments, final_line, keyword_calls,
                                       load_from_args, print_pass_result, resolve_inputs)
from normfold.inspect import inspect_model


class InspectCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p)
        add_safety_arguments(p, noop=False)

    def run(self, args: argparse.Namespace, console: Console) -> int:
        loaded = load_from_args(args, console)
        if loaded.kind == "exported":
            return _inspect_exported(console, loaded)
        # a Hugging Face model gets the keyword inputs its config describes, taken positionally for the dry run
        inputs = resolve_inputs(args, loaded.module, console, keywords=True)
        with keyword_calls(inputs, loaded.module) as x:
            reports, totals = inspect_model(loaded.module, example_inputs=x)
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


def _inspect_exported(console: Console, loaded) -> int:
    """A .pt2: its batch_norm ops, what the ATen-level fold would do to each (dry run on a copy), and why not."""
    from normfold.passes.fold_exported import fold_exported_program

    result = fold_exported_program(loaded.program, inplace=False)
    print_pass_result(console, result, title=f"batch_norm ops of {loaded.path} that fold (ATen level, dry run)")
    folds = sum(1 for c in result.changes if c.action.startswith("fold"))
    final_line(f"{folds + len(result.skipped)} BatchNorm op(s) in the program; {folds} can be folded "
               f"(`normfold fold {loaded.path}` writes the folded .pt2), {len(result.skipped)} cannot")
    return 0
