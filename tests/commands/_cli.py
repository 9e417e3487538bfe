"""Helpers shared by the command-line tests: run `normfold` in-process, hash files to prove they are untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

from normfold.cli import main

#: the demo model's factory, for state_dict files built in the tests
DEMO_ARCH = "normfold.demo:build_demo_model"


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run `normfold ARGV` in this process; return (exit code, stdout, stderr). argparse errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code)
    out, err = capsys.readouterr()
    return code, out, err
