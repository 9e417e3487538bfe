"""`normfold ... | head`: a reader that closes stdout early ends the command quietly (exit 141), not as a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normfold.demo import build_demo_model
from tests.commands._cli import DEMO_ARCH

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipe") / "demo.pt"
    torch.save(build_demo_model(0).state_dict(), path)
    return path


@pytest.mark.parametrize("quiet", [False, True], ids=["console lines", "-q final line"])
def test_closed_stdout_ends_quietly(demo_file: Path, quiet: bool) -> None:
    """The reader is gone before the first line: rich's console (or the final line's print) hits EPIPE."""
    argv = [sys.executable, "-m", "normfold.cli", "inspect", str(demo_file), "--arch", DEMO_ARCH] + (["-q"] if quiet else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.close()  # `| head -0`: the pipe's only reader closes it at once
    _, err = proc.communicate(timeout=300)
    text = err.decode()
    assert proc.returncode == 141, text
    assert text == "", text  # no "failed", no "called sys.exit(1)", no "Exception ignored ... BrokenPipeError"
