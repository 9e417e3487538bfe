"""`normfold fold`, `inspect` and `demo` from the command line: results, files, and every bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import normfold as nf
from normfold.demo import build_demo_model
from tests.commands._cli import digest as _digest, run_cli as _run

ARCH = "normfold.demo:build_demo_model"


@pytest.fixture
def state_dict_file(tmp_path: Path) -> Path:
    p = tmp_path / "model.pt"
    torch.save(build_demo_model(seed=3).state_dict(), p)
    return p


@pytest.fixture
def pickled_file(tmp_path: Path) -> Path:
    p = tmp_path / "whole.pt"
    torch.save(build_demo_model(seed=4), p)
    return p


def test_fold_state_dict_writes_folded_model_beside_input(state_dict_file: Path, capsys) -> None:
    before = _digest(state_dict_file)
    code, out, err = _run(["fold", str(state_dict_file), "--arch", ARCH, "--input-shape", "2,3,32,32"], capsys)
    assert code == 0, err
    out_path = state_dict_file.with_name("model.folded.safetensors")
    assert out_path.exists()
    assert _digest(state_dict_file) == before
    assert "folded 5 BatchNorm layer(s), left 1 alone" in out
    assert "skip_conv" in out and "output has 2 users" in out
    folded = nf.load(out_path, arch=ARCH)
    original = build_demo_model(seed=3)
    x = torch.randn(5, 3, 32, 32) * 3 + 1
    v = nf.verify(original, folded, (x,))  # the one rule (normfold.tolerances.POLICY), on inputs the CLI never saw
    assert v.passed, v.describe()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 1
    assert not any(p.name.startswith(".model") for p in state_dict_file.parent.iterdir()), "temporary file left behind"


def test_fold_infers_input_shape_and_says_so(pickled_file: Path, tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "sub.pt"
    code, out, err = _run(["fold", str(pickled_file), "--trust", "-o", str(out_file)], capsys)
    assert code == 0, err
    assert "inferred from the first layer" in out
    assert out_file.exists()


def test_fold_refuses_to_overwrite_input(state_dict_file: Path, capsys) -> None:
    before = _digest(state_dict_file)
    code, out, err = _run(["fold", str(state_dict_file), "--arch", ARCH, "-o", str(state_dict_file)], capsys)
    assert code == 2
    assert "refusing to overwrite the input" in err
    assert _digest(state_dict_file) == before


def test_inspect_lists_every_norm_layer(state_dict_file: Path, capsys) -> None:
    code, out, err = _run(["inspect", str(state_dict_file), "--arch", ARCH, "--input-shape", "2,3,32,32"], capsys)
    assert code == 0, err
    for path in ("stem.1", "block_bn", "up_bn", "skip_bn", "post_act_bn", "fc_bn"):
        assert path in out
    assert "6 normalization layer(s)" in out and "5 BatchNorm(s) can be folded" in out


def test_demo_passes(capsys) -> None:
    code, out, err = _run(["demo"], capsys)
    assert code == 0, err
    assert "PASSED" in out.splitlines()[-1]


def _bad_inputs(tmp_path: Path, state_dict_file: Path, pickled_file: Path) -> dict[str, tuple[list[str], str, Path | None]]:
    text = tmp_path / "notes.pt"
    text.write_text("this is not a model\n")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(state_dict_file.read_bytes()[:200])
    corrupt = tmp_path / "corrupt.pt"
    data = bytearray(state_dict_file.read_bytes())
    data[100:400] = bytes(300)
    corrupt.write_bytes(bytes(data))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    return {
        "missing file": (["fold", str(tmp_path / "nope.pt")], "no such file", None),
        "directory": (["fold", str(tmp_path)], "is a directory", None),
        "empty file": (["fold", str(empty)], "is empty", empty),
        "truncated": (["fold", str(truncated), "--arch", ARCH], "not a readable PyTorch file", truncated),
        "corrupt": (["fold", str(corrupt), "--arch", ARCH], "not a readable PyTorch file", corrupt),
        "text file": (["fold", str(text)], "not a readable PyTorch file", text),
        "state_dict without --arch": (["fold", str(state_dict_file)], "pass --arch", state_dict_file),
        "pickled module without --trust": (["fold", str(pickled_file)], "pass --trust", pickled_file),
        "arch does not import": (["fold", str(state_dict_file), "--arch", "no_such_pkg.models:net"], "cannot import", state_dict_file),
        "arch without colon": (["fold", str(state_dict_file), "--arch", "normfold.demo"], "pkg.module:factory", state_dict_file),
        "arch not a module": (["fold", str(state_dict_file), "--arch", "normfold.demo:DEMO_INPUT_SHAPE"], "not callable", state_dict_file),
        "arch returns non-module": (["fold", str(state_dict_file), "--arch", "builtins:dict"], "not a torch.nn.Module", state_dict_file),
        "arch does not fit weights": (["fold", str(state_dict_file), "--arch", "torch.nn:Identity"], "does not fit --arch", state_dict_file),
        "input shape does not fit": (["fold", str(state_dict_file), "--arch", ARCH, "--input-shape", "2,5,32,32"], "does not fit the model", state_dict_file),
        "input shape not numbers": (["fold", str(state_dict_file), "--arch", ARCH, "--input-shape", "a,b"], "not a list of integers", state_dict_file),
        "unknown flag": (["fold", str(state_dict_file), "--frobnicate"], "unrecognized arguments", state_dict_file),
    }


CASES = ["missing file", "directory", "empty file", "truncated", "corrupt", "text file", "state_dict without --arch",
         "pickled module without --trust", "arch does not import", "arch without colon", "arch not a module",
         "arch returns non-module", "arch does not fit weights", "input shape does not fit", "input shape not numbers",
         "unknown flag"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path, state_dict_file: Path, pickled_file: Path, capsys) -> None:
    argv, expected, touched = _bad_inputs(tmp_path, state_dict_file, pickled_file)[case]
    before = _digest(touched) if touched is not None else None
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(argv, capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert expected in lines[0]
    assert "Traceback" not in err + out
    if touched is not None:
        assert _digest(touched) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "a bad input must not leave files behind"


def test_console_script_end_to_end(state_dict_file: Path) -> None:
    """The installed entry point: a real process, exit codes and no traceback."""
    ok = subprocess.run([sys.executable, "-m", "normfold.cli", "fold", str(state_dict_file), "--arch", ARCH,
                         "--input-shape", "2,3,32,32", "-q"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().splitlines()[-1].startswith("folded 5 BatchNorm")
    bad = subprocess.run([sys.executable, "-m", "normfold.cli", "fold", str(state_dict_file)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "--arch" in bad.stderr


def test_fold_pt2_writes_pt2_without_warnings_and_inspect_says_what_to_run(tmp_path: Path, capsys) -> None:
    model = build_demo_model(seed=5)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),))
    src = tmp_path / "prog.pt2"
    torch.export.save(program, src)
    code, out, err = _run(["fold", str(src)], capsys)
    assert code == 0, err
    assert (tmp_path / "prog.folded.pt2").exists()
    assert "folded" in out.splitlines()[-1]
    code, out, err = _run(["inspect", str(src)], capsys)
    assert code == 0, err  # inspect reads a .pt2 too: its batch_norm ops and what folds
    assert "can be folded" in out.splitlines()[-1]
