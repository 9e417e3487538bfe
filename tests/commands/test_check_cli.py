"""`normfold check`, `normfold export`, `fold --onnx --check` and `demo` from the command line.

Exit codes (0 passed, 1 failed, 2 bad usage), the files written (reports even
on failure, models only on success, inputs never touched), and one line
naming the fix for every bad input.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import normfold as nf
from normfold.demo import build_demo_model
from tests.commands._cli import digest as _digest, run_cli as _run

ARCH = "normfold.demo:build_demo_model"
SHAPE = "2,3,16,16"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A state_dict, its folded model (pickled), a perturbed folded model, and the folded model's ONNX export."""
    d = tmp_path_factory.mktemp("check_cli")
    model = build_demo_model(seed=3)
    torch.save(model.state_dict(), d / "model.pt")
    x = torch.randn(2, 3, 16, 16)
    folded = nf.fold_batchnorm(model, example_inputs=x).module
    torch.save(folded, d / "model.folded.pt")
    bad = nf.fold_batchnorm(model, example_inputs=x).module
    with torch.no_grad():
        bad.block_conv.weight.mul_(1.01)
    torch.save(bad, d / "model.bad.pt")
    nf.export_onnx(folded, x, d / "model.folded.onnx")
    np.save(d / "x.npy", (torch.randn(3, 3, 16, 16) * 2 + 0.5).numpy())
    return {"dir": d, "model": d / "model.pt", "folded": d / "model.folded.pt", "bad": d / "model.bad.pt",
            "onnx": d / "model.folded.onnx", "npy": d / "x.npy"}


def test_check_candidate_and_onnx_passes_and_writes_reports(files, tmp_path, capsys) -> None:
    before = {k: _digest(p) for k, p in files.items() if k != "dir"}
    js, xml = tmp_path / "r.json", tmp_path / "r.xml"
    code, out, err = _run(["check", str(files["model"]), "--arch", ARCH, "--trust", "--candidate", str(files["folded"]),
                           "--onnx", str(files["onnx"]), "--input-shape", SHAPE, "--json", str(js),
                           "--junit-xml", str(xml)], capsys)
    assert code == 0, out + err
    last = out.strip().splitlines()[-1]
    assert last.startswith("PASSED: ") and "CPUExecutionProvider" in last
    assert "did not start" in out  # the CUDA fallback is reported, with onnxruntime's reason
    report = nf.CheckReport.from_json(js.read_text())
    assert report.passed and report.check("outputs[onnx]").status == "passed"
    assert all(c.name != "export" for c in report.checks)  # --onnx given: nothing was exported
    suite = ET.parse(xml).getroot().find("testsuite")
    assert int(suite.get("tests")) == len(report.checks) and suite.get("failures") == "0"
    assert {k: _digest(p) for k, p in files.items() if k != "dir"} == before  # inputs untouched


def test_check_failure_exits_1_names_stage_and_layer_and_still_writes_reports(files, tmp_path, capsys) -> None:
    xml = tmp_path / "fail.xml"
    code, out, err = _run(["check", str(files["model"]), "--arch", ARCH, "--trust", "--candidate", str(files["bad"]),
                           "--no-export", "--input-shape", SHAPE, "--junit-xml", str(xml)], capsys)
    assert code == 1, out + err
    last = out.strip().splitlines()[-1]
    assert last.startswith("FAILED: ") and "stage candidate" in last and "block_conv" in last
    failures = [c for c in ET.parse(xml).getroot().iter("testcase") if c.find("failure") is not None]
    assert [c.get("name") for c in failures] == ["outputs[candidate]"]


def test_check_exports_when_no_onnx_given_and_reads_real_inputs(files, tmp_path, capsys) -> None:
    keep = tmp_path / "kept.onnx"
    code, out, err = _run(["check", str(files["model"]), "--arch", ARCH, "--inputs", str(files["npy"]),
                           "--save-onnx", str(keep), "--batch-sizes", "1,3", "-q"], capsys)
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("PASSED: ")  # -q: only the verdict
    assert keep.exists()
    r = nf.check(build_demo_model(seed=3), onnx=keep, inputs=str(files["npy"]), probes=False)
    assert r.passed and r.inputs[0]["shape"] == [3, 3, 16, 16]


def test_require_provider_cuda_fails_with_the_reason(files, capsys) -> None:
    code, out, err = _run(["check", str(files["model"]), "--arch", ARCH, "--onnx", str(files["onnx"]),
                           "--input-shape", SHAPE, "--require-provider", "cuda", "--no-probes"], capsys)
    if "ran on CUDAExecutionProvider" in out:
        pytest.skip("CUDA starts on this machine")
    assert code == 1, out + err
    assert "cuda was required but onnxruntime ran on CPUExecutionProvider: " in out
    assert out.strip().splitlines()[-1].startswith("FAILED: ") and "provider" in out.strip().splitlines()[-1]


def test_export_command_writes_a_checked_onnx_file(files, tmp_path, capsys) -> None:
    out_path = tmp_path / "m.onnx"
    code, out, err = _run(["export", str(files["model"]), "--arch", ARCH, "--input-shape", SHAPE, "-o", str(out_path)],
                          capsys)
    assert code == 0, out + err
    assert out.strip().splitlines()[-1].startswith(f"wrote {out_path}") and "matches the model" in out
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary files left
    import onnx

    dims = nf.export.batch_dims(onnx.load(str(out_path)))
    assert dims == ["batch"]
    code, out, err = _run(["export", str(files["model"]), "--arch", ARCH, "--input-shape", SHAPE, "-o",
                           str(tmp_path / "s.onnx"), "--static-batch", "-q"], capsys)
    assert code == 0 and nf.export.batch_dims(onnx.load(str(tmp_path / "s.onnx"))) == [2]


def test_fold_onnx_check_folds_exports_checks_and_writes_everything(files, tmp_path, capsys) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(files["model"].read_bytes())
    onnx_out = tmp_path / "model.onnx"
    code, out, err = _run(["fold", str(src), "--arch", ARCH, "--input-shape", SHAPE, "--onnx", str(onnx_out), "--check",
                           "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, out + err
    assert "batch_independence[onnx]" in out  # the full checker ran
    last = out.strip().splitlines()[-1]
    assert last.startswith("PASSED: ") and "wrote" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.folded.safetensors", "model.onnx", "model.pt", "r.json"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["onnx"]["path"] == str(onnx_out)


def test_fold_check_failure_writes_no_model(files, tmp_path, capsys) -> None:
    src = tmp_path / "model.pt"
    src.write_bytes(files["model"].read_bytes())
    code, out, err = _run(["fold", str(src), "--arch", ARCH, "--input-shape", SHAPE, "--onnx", str(tmp_path / "m.onnx"),
                           "--check", "--require-provider", "cuda"], capsys)
    if code == 0 and "CUDAExecutionProvider" in out:
        pytest.skip("CUDA starts on this machine")
    assert code == 1, out + err
    assert out.strip().splitlines()[-1].endswith("nothing written")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_demo_folds_exports_checks(capsys) -> None:
    code, out, err = _run(["demo"], capsys)
    assert code == 0, out + err
    for name in ("outputs[candidate]", "outputs[onnx]", "batch_independence[onnx]", "provider"):
        assert name in out
    assert out.strip().splitlines()[-1].startswith("PASSED: 10 check(s) passed")


def _bad(files: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    m = str(files["model"])
    junk = tmp / "junk.npy"
    junk.write_bytes(b"not numpy")
    return {
        "onnx as MODEL": (["check", str(files["onnx"])], "pass the ONNX file with --onnx"),
        "inputs and shape": (["check", m, "--arch", ARCH, "--inputs", str(files["npy"]), "--input-shape", SHAPE],
                             "not both"),
        "unknown provider": (["check", m, "--arch", ARCH, "--input-shape", SHAPE, "--provider", "cdua", "--no-export"],
                             "unknown onnxruntime provider"),
        "bad batch sizes": (["check", m, "--arch", ARCH, "--input-shape", SHAPE, "--batch-sizes", "0,2"],
                            "--batch-sizes"),
        "missing onnx": (["check", m, "--arch", ARCH, "--input-shape", SHAPE, "--onnx", str(tmp / "none.onnx")],
                         "no such ONNX file"),
        "json into missing folder": (["check", m, "--arch", ARCH, "--input-shape", SHAPE, "--no-export",
                                      "--json", str(tmp / "no" / "r.json")], "does not exist"),
        "negative atol": (["check", m, "--arch", ARCH, "--input-shape", SHAPE, "--no-export", "--atol", "-1"],
                          "--atol"),
        "unreadable inputs": (["check", m, "--arch", ARCH, "--inputs", str(junk), "--no-export"],
                              "not a readable input file"),
        "inputs do not fit": (["check", m, "--arch", ARCH, "--input-shape", "2,5,16,16", "--no-export"],
                              "do not fit"),
        "candidate is model": (["check", m, "--arch", ARCH, "--candidate", m], "MODEL itself"),
        "export wrong suffix": (["export", m, "--arch", ARCH, "-o", str(tmp / "m.pt")], ".onnx suffix"),
        "export over input": (["export", m, "--arch", ARCH, "-o", m], "give the ONNX file a .onnx suffix"),
        "fold onnx wrong suffix": (["fold", m, "--arch", ARCH, "--onnx", str(tmp / "m.txt")], ".onnx suffix"),
    }


CASES = ["onnx as MODEL", "inputs and shape", "unknown provider", "bad batch sizes", "missing onnx",
         "json into missing folder", "negative atol", "unreadable inputs", "inputs do not fit", "candidate is model",
         "export wrong suffix", "export over input", "fold onnx wrong suffix"]


@pytest.mark.parametrize("case", CASES)
def test_bad_usage_is_one_line_exit_2(case: str, files, tmp_path: Path, capsys) -> None:
    argv, expected = _bad(files, tmp_path)[case]
    before = {k: _digest(p) for k, p in files.items() if k != "dir"}
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(argv, capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err + out
    assert {k: _digest(p) for k, p in files.items() if k != "dir"} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_console_script_exit_codes(files) -> None:
    ok = subprocess.run([sys.executable, "-m", "normfold.cli", "check", str(files["model"]), "--arch", ARCH,
                         "--onnx", str(files["onnx"]), "--input-shape", SHAPE, "-q", "--no-probes"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().splitlines()[-1].startswith("PASSED")
    assert "libcuda" not in ok.stderr  # onnxruntime's provider noise is captured into the report, not spilled


def test_inputs_and_data_files_are_read_by_one_reader(tmp_path: Path) -> None:
    """check --inputs and recalibrate --data read files with normfold.data.read_tensor_file; each says what it
    makes of the contents: one input per array for check, one array of samples for recalibrate."""
    from normfold.check.inputs import load_inputs
    from normfold.data import load_data, visiting_order
    from normfold.errors import InputError

    a, b = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype("float32"), np.zeros((4, 2), "int64")
    np.savez(tmp_path / "ab.npz", x=a, y=b)
    got = load_inputs(tmp_path / "ab.npz")
    assert len(got) == 2 and np.array_equal(got[0].numpy(), a) and np.array_equal(got[1].numpy(), b)
    data, _ = load_data(tmp_path / "ab.npz", model=build_demo_model(), batch_size=4)  # the array named x
    assert np.array_equal(next(iter(data)).numpy(), a[visiting_order(4, 0).numpy()])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for read, words in ((lambda p: load_inputs(p), "--inputs"), (lambda p: load_data(p, model=build_demo_model()),
                                                                 "--data")):
        with pytest.raises(InputError, match=f"^{words} .*junk.npz is not a readable .* file .*numpy.save"):
            read(tmp_path / "junk.npz")
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))  # no torch dtype: one line, not a TypeError
    with pytest.raises(InputError, match="is a <U1 array; save numeric arrays"):
        load_inputs(tmp_path / "words.npy")
