"""The ``normfold`` command: parse, call the library, print, return an exit code.

Each subcommand is a class in ``normfold/commands/<name>.py`` whose docstring
is its help text. A user mistake (any NormfoldError) prints one line naming
the fix and exits 2 (1 for a failed check); ``-v`` shows the traceback. See
:func:`main` for how every other way of ending maps to an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from typing import Sequence

from normfold.errors import NormfoldError

__all__ = ["main", "COMMANDS"]

#: subcommand name -> "module:Class"; the order is the order of ``normfold --help``
COMMANDS: dict[str, str] = {
    "demo": "normfold.commands.demo:DemoCommand",
    "inspect": "normfold.commands.inspect:InspectCommand",
    "fold": "normfold.commands.fold:FoldCommand",
    "convert": "normfold.commands.convert:ConvertCommand",
    "recalibrate": "normfold.commands.recalibrate:RecalibrateCommand",
    "export": "normfold.commands.export:ExportCommand",
    "check": "normfold.commands.check:CheckCommand",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that points at --help, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _load_command(spec: str):
    mod_name, _, cls_name = spec.partition(":")
    return getattr(importlib.import_module(mod_name), cls_name)()


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(prog="normfold", description=__doc__.splitlines()[0] if __doc__ else None)
    from normfold import __version__

    parser.add_argument("--version", action="version", version=f"normfold {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands = {}
    for name, spec in COMMANDS.items():
        cmd = _load_command(spec)
        doc = (type(cmd).__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logs")
        p.add_argument("-q", "--quiet", action="store_true", help="print only the final result line")
        cmd.add_arguments(p)
        commands[name] = cmd
    return parser, commands


def _one_line(exc: BaseException) -> str:
    head = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {head[:300]}" if head else type(exc).__name__


def _stdout_closed() -> bool:
    """Is stdout a pipe whose reader has gone? (Linux and macOS flag its write end with POLLERR.)"""
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or stdout is not a file (a test's capture)
        return False


def _stdout_gone() -> int:
    """End quietly after stdout's reader closed the pipe (``normfold ... | head``).

    Python's recommended handling (the ``signal`` module's "Note on
    SIGPIPE"): point stdout's descriptor at /dev/null, so the interpreter's
    last flush does not raise again, and exit non-zero: 141, which is 128 +
    SIGPIPE, the code a shell shows for any other program a closed pipe ends,
    and distinct from a failed check (1). Nothing is printed: the reader
    asked for no more.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass
    return 141


def _is_closed_stdout(exc: BaseException) -> bool:
    from normfold.commands._common import StdoutClosed

    return isinstance(exc, StdoutClosed) or (isinstance(exc, BrokenPipeError) and _stdout_closed())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normfold`` console script; returns the exit code.

    Every way a command can end maps to one line and one code: 0 success,
    1 a failed check or an unexpected error, 2 unusable input (any
    NormfoldError, and model code calling ``sys.exit`` while it is loaded),
    130 interrupted (Ctrl-C), 141 stdout closed by its reader (``| head``:
    no line, see :func:`_stdout_gone`). Nothing is left to end the process
    with a traceback or a silent exit 0; ``-v`` prints the traceback as well.
    """
    try:
        return _main(argv)
    except BrokenPipeError as exc:  # --help or the usage text into a closed pipe
        if _is_closed_stdout(exc):
            return _stdout_gone()
        raise


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser, commands = build_parser()
    except KeyboardInterrupt:
        print("normfold: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)  # --help / --version / usage errors exit here, through argparse
    if not args.command:
        parser.print_help()
        return 2
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from normfold.commands._checking import strip_ansi
    from normfold.pipeline import interrupted_by
    from normfold.commands._common import make_console, quiet_tracing

    console = make_console(quiet=getattr(args, "quiet", False))
    prefix = f"normfold {args.command}"

    def traceback_if_verbose() -> None:
        if verbose:
            import traceback

            traceback.print_exc()

    try:
        # -q: nothing but the final line on stdout, and nothing from torch's tracers on stderr (the error
        # lines below are printed after the redirection ends)
        with warnings.catch_warnings(), quiet_tracing(enabled=not verbose, stderr=getattr(args, "quiet", False)):
            if not verbose:
                # torch's tracing and export warnings are for library authors, not for this command's user
                warnings.simplefilter("ignore")
            return int(commands[args.command].run(args, console))
    except (KeyboardInterrupt, Exception) as exc:
        if _is_closed_stdout(exc):
            return _stdout_gone()
        traceback_if_verbose()
        if isinstance(exc, KeyboardInterrupt) or interrupted_by(exc):  # a tracer may wrap Ctrl-C in its own error
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130
        if isinstance(exc, NormfoldError):
            print(f"{prefix}: error: {strip_ansi(str(exc))}", file=sys.stderr)
            return exc.exit_code
        # a bug here or in the model's code: still one line and a failing code
        print(f"{prefix}: failed: {strip_ansi(_one_line(exc))} (-v shows the traceback)", file=sys.stderr)
        return 1
    except SystemExit as exc:
        # not argparse (that exits before run): the model's own code called sys.exit mid-command
        traceback_if_verbose()
        print(f"{prefix}: failed: code run by the command called sys.exit({exc.code!r})", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
