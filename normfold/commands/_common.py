"""What every subcommand shares: argument groups, loading, inputs, verification, reports, writing.

Subcommands stay thin: they call the library and use these helpers to print
and to write files by the same rules (docs/architecture.md, "Model files").
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import inspect
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from normfold.errors import InputError, UsageError
from normfold.hf import is_hf_model, traceable
from normfold.inputs import hf_example_inputs, infer_input_shapes, model_dtype_device, parse_shape, random_inputs, run_model
from normfold.io import LoadedModel, default_output_path, load_model, save_model
from normfold.passes.base import PassResult, copy_module
from normfold.tolerances import POLICY, Tolerance
from normfold.verify import Verification
from normfold.verify import verify as nf_verify

__all__ = ["Command", "make_console", "add_model_arguments", "add_output_argument", "load_from_args",
           "resolve_inputs", "keyword_calls", "verify", "print_pass_result", "print_comparison", "write_model", "final_line",
           "Verification"]


class Command:
    """A subcommand: its class docstring is the help text."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the subcommand's arguments."""

    def run(self, args: argparse.Namespace, console: Console) -> int:  # pragma: no cover - abstract
        raise NotImplementedError


class StdoutClosed(BrokenPipeError):
    """stdout's reader went away (``normfold ... | head``): not an error of the command, nothing more to show."""


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's default raises SystemExit(1), which the CLI could not tell from model code calling sys.exit
        self.quiet = True
        raise StdoutClosed(errno.EPIPE, "stdout was closed by its reader")


def make_console(*, quiet: bool = False) -> Console:
    """The console commands print to (nothing but the final line when ``quiet``)."""
    return _Console(quiet=quiet, highlight=False, soft_wrap=True)


def final_line(text: str) -> None:
    """The one line every command ends with; printed even with -q."""
    try:
        print(text, flush=True)
    except BrokenPipeError as exc:
        raise StdoutClosed(errno.EPIPE, "stdout was closed by its reader") from exc


def add_model_arguments(p: argparse.ArgumentParser, *, inputs: bool = True) -> None:
    """MODEL, --arch, --trust and (optionally) --input-shape / --seed."""
    p.add_argument("model", metavar="MODEL", help="model file: .safetensors or .pt/.pth (a state_dict; or, with --trust, "
                                                  "a pickled module), a Hugging Face save_pretrained folder, or .pt2")
    p.add_argument("--arch", metavar="PKG.MODULE:FACTORY",
                   help="how to build the model for a weights file: pkg.module:factory, pkg.module:factory(k=v) "
                        "(literal arguments), timm:NAME or ./file.py:factory")
    p.add_argument("--trust", action="store_true",
                   help="allow unpickling a whole nn.Module (this runs code from the file: only for files you trust)")
    if inputs:
        p.add_argument("--input-shape", metavar="SHAPE", action="append", default=None,
                       help="shape of one model input, e.g. 2,3,224,224 (repeat for several inputs); "
                            "inferred from the first layer when omitted")
        p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")


def add_output_argument(p: argparse.ArgumentParser, step: str) -> None:
    p.add_argument("-o", "--output", metavar="OUT",
                   help=f"where to write the result (default: <stem>.{step}.safetensors beside the input, a folder for "
                        "a Hugging Face folder, .pt2 for a .pt2; never the input). .safetensors/.pt hold the weights and "
                        "normfold's recorded edits (no pickled code); .pt2 re-exports the model")
    p.add_argument("--pickle", action="store_true",
                   help="write a pickled whole module (.pt) instead; reading it back needs --trust")


def load_from_args(args: argparse.Namespace, console: Console | None = None, *, path: str | None = None,
                   what: str = "MODEL", as_is: bool = False) -> LoadedModel:
    """Load MODEL (or ``path``) and turn it into its eval form (:func:`normfold.pipeline.eval_form`).

    A state_dict has no mode and a pickled module saved in training mode is
    meant for eval: the command rewrites, checks and writes the eval form,
    saying so in one line when the file itself was in training mode. A .pt2's
    module is wrapped so that it runs (and compares) in eval; ``loaded.module``
    is the eval form afterwards. Model code that calls ``sys.exit`` while the
    model is built is unusable input (exit 2), not a silent exit 0. ``as_is``
    keeps the model as it was saved (a .pt2 only wrapped so that it runs).
    """
    from normfold.errors import ModelLoadError
    from normfold.pipeline import eval_form

    target = path if path is not None else args.model
    try:
        loaded = load_model(target, trust=args.trust, arch=args.arch)
    except SystemExit as exc:
        how = f" with --arch {args.arch}" if args.arch else ""
        raise ModelLoadError(f"building {what} {target}{how} called sys.exit({exc.code!r}); name a factory that "
                             "returns the model") from None
    if as_is:  # a candidate under check: its training-mode layers are for the check to find
        from normfold.pipeline import as_module

        loaded.module = as_module(loaded)
        return loaded
    module, note = eval_form(loaded)
    loaded.module = module
    if note and console is not None:
        console.print(note, markup=False, highlight=False)
    return loaded


def add_safety_arguments(p: argparse.ArgumentParser, *, noop: bool = True) -> None:
    """--max-input-bytes and (for commands that rewrite) --allow-noop."""
    from normfold.pipeline import DEFAULT_MAX_INPUT_BYTES

    p.add_argument("--max-input-bytes", type=int, default=DEFAULT_MAX_INPUT_BYTES, metavar="N",
                   help=f"refuse random inputs that take more than N bytes to create (default {DEFAULT_MAX_INPUT_BYTES}"
                        ", 2 GiB)")
    if noop:
        p.add_argument("--allow-noop", action="store_true",
                       help="exit 0 even when nothing was rewritten (by default that is a failure, exit 1, so that a "
                            "CI step that folds nothing does not pass)")


def resolve_inputs(args: argparse.Namespace, model: nn.Module, console: Console, *, keywords: bool = False
                   ) -> Any:
    """Seeded inputs from --input-shape, or from a shape inferred from the first layer (said on one line).

    With ``keywords``, a Hugging Face model gets the keyword inputs its config describes
    (:func:`normfold.inputs.hf_example_inputs`; --input-shape gives their shape) as a dict: run the
    model on them inside :func:`keyword_calls`.
    """
    from normfold.pipeline import DEFAULT_MAX_INPUT_BYTES, check_input_size

    dtype, device = model_dtype_device(model)
    if keywords and is_hf_model(model):
        shape = parse_shape(args.input_shape[0]) if args.input_shape else None
        if args.input_shape and len(args.input_shape) > 1:
            raise UsageError("a Hugging Face model takes one --input-shape (batch,sequence for token ids, the "
                             "pixel_values or input_features shape otherwise)")
        if shape:
            check_input_size([shape], dtype, limit=getattr(args, "max_input_bytes", DEFAULT_MAX_INPUT_BYTES))
        kw, what = hf_example_inputs(model, shape, seed=args.seed)
        try:
            with keyword_calls(kw, model) as values:
                run_model(model, values)
        except Exception as exc:
            head = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(f"inputs {what} do not fit {type(model).__name__} ({type(exc).__name__}: {head}); "
                             "pass --input-shape") from exc
        how = "--input-shape" if shape else "the model's config"
        console.print(f"[dim]inputs from {how}: {what}{'' if shape else ' (pass --input-shape to choose)'}[/dim]")
        # -o x.pt2 re-exports with positional example inputs: only right when the keywords are forward's first
        # parameters in order (pixel_values; not input_ids + attention_mask, which GPT-2 takes third)
        leading = [n for n in inspect.signature(type(model).forward).parameters if n != "self"][: len(kw)]
        args.example_inputs = tuple(kw.values()) if list(kw) == leading else None
        return kw
    if args.input_shape:
        shapes = [parse_shape(s) for s in args.input_shape]
        check_input_size(shapes, dtype, limit=getattr(args, "max_input_bytes", DEFAULT_MAX_INPUT_BYTES))
        inputs = random_inputs(shapes, seed=args.seed, dtype=dtype, device=device)
        try:
            run_model(model, inputs)
        except Exception as exc:
            head = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            shown = " ".join(f"--input-shape {s}" for s in args.input_shape)
            raise InputError(f"{shown} does not fit the model ({type(exc).__name__}: {head}); "
                             "pass the shape its forward() expects") from exc
        args.example_inputs = inputs  # for writing a .pt2 (-o x.pt2 re-exports with them)
        return inputs
    from normfold.pipeline import ExportedModel

    if isinstance(model, ExportedModel):
        like = model.example_inputs(seed=args.seed)
        if like is None:
            raise InputError(f"{args.model}: the program does not record its example inputs; pass --input-shape")
        console.print(f"[dim]inputs shaped like the program's example inputs: "
                      f"{', '.join(','.join(map(str, x.shape)) for x in like)} (pass --input-shape to choose)[/dim]")
        args.example_inputs = like
        return like
    inferred = infer_input_shapes(model)
    console.print(f"[dim]{inferred.reason}[/dim]")
    inputs = random_inputs(inferred.shapes, seed=args.seed, dtype=dtype, device=device,
                           integer_high=inferred.integer_high)
    args.example_inputs = inputs  # for writing a .pt2 (-o x.pt2 re-exports with them)
    return inputs


@contextlib.contextmanager
def keyword_calls(inputs: Any, *models: nn.Module) -> Iterator[Any]:
    """Within the block, each model takes ``inputs`` positionally: yields the positional inputs.

    Keyword (dict) inputs put every model in :func:`normfold.hf.traceable` (forward takes the dict's
    values in order, caches off, a flat tuple of tensors out); other inputs pass through unchanged.
    """
    if not isinstance(inputs, dict):
        yield inputs
        return
    with contextlib.ExitStack() as stack:
        values = tuple(inputs.values())
        for m in models:
            values = stack.enter_context(traceable(m, inputs))
        yield values


def verify(reference: nn.Module, candidate: nn.Module, inputs: Sequence[torch.Tensor],
           tolerance: Tolerance | None = None) -> Verification:
    """Run both models in eval on ``inputs`` and compare every output: :func:`normfold.verify`, the one rule."""
    return nf_verify(reference, candidate, inputs, tolerance=tolerance)


def print_pass_result(console: Console, result: PassResult, *, title: str, verbose: bool = False) -> None:
    """Two tables: what changed, what was skipped and why."""
    if result.changes:
        t = Table(title=f"{title}: {len(result.changes)} change(s)", title_justify="left", show_lines=False)
        t.add_column("#", justify="right", style="dim")
        t.add_column("change")
        for i, c in enumerate(result.changes, 1):
            t.add_row(str(i), c.message)
        console.print(t)
    else:
        console.print(f"{title}: nothing changed")
    print_skips(console, result.skipped)


def print_skips(console: Console, skipped: list) -> None:
    """The "left alone" table: every Skip's layer paths and reason."""
    if skipped:
        t = Table(title=f"left alone: {len(skipped)}", title_justify="left")
        t.add_column("layer")
        t.add_column("reason")
        for s in skipped:
            t.add_row(", ".join(s.paths) or "<model>", s.reason)
        console.print(t)


def print_comparison(console: Console, v: Verification) -> None:
    """One row per output: its error, the rule it was held to and the margin (``normfold.verify``'s verdict)."""
    given = v.tolerance is not None and v.tolerance not in POLICY.values()  # the policy passed explicitly is no choice
    title = "outputs vs the original" + (f" ({v.tolerance.describe()}, given)" if given else "")
    t = Table(title=title, title_justify="left")
    for col in ("output", "shape", "dtype", "verdict", "ok"):
        t.add_column(col)
    for c in v.comparisons:
        t.add_row(c.name, "x".join(map(str, c.candidate_shape)), c.dtype, c.verdict(),
                  "yes" if c.passed else f"NO: {c.problem}")
    console.print(t)


def output_path(args: argparse.Namespace, loaded: LoadedModel, step: str) -> Path:
    return Path(args.output) if args.output else default_output_path(loaded, step, pickle=getattr(args, "pickle", False))


def write_model(args: argparse.Namespace, loaded: LoadedModel, module: nn.Module, step: str,
                program: Any = None) -> Path:
    """Write atomically beside the input (or to -o), never over the input."""
    out = output_path(args, loaded, step)
    return save_model(module, out, source=loaded, program=program, pickle=getattr(args, "pickle", False),
                      example_inputs=getattr(args, "example_inputs", None))


def working_copy(module: nn.Module) -> nn.Module:
    """A deep copy for the rewrite, so the loaded original stays the reference."""
    return copy_module(module)


@contextlib.contextmanager
def quiet_tracing(*, enabled: bool = True, stderr: bool = True) -> Iterator[None]:
    """Silence what torch.fx / torch.export print while normfold traces a model (graph dumps, guard logs).

    Those messages are written for torch developers: through the ``torch``
    loggers, ``warnings``, and (torch.export's partial graph on a failed
    trace) a bare ``print(..., file=sys.stderr)``, which only redirecting
    ``sys.stderr`` (``stderr=True``) stops. A command's user acts on
    normfold's own lines (a Skip with its reason); ``-v`` (``enabled=False``)
    shows everything.
    """
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in _TORCH_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


#: the loggers torch.fx, torch.export and the ONNX exporter report tracing problems on
_TORCH_LOGGERS = ("torch", "torch.fx", "torch.export", "torch._export", "torch._dynamo", "torch.onnx",
                  "torch.fx.experimental.symbolic_shapes", "onnxscript")
