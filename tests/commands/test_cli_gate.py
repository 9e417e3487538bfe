"""The CLI as a CI gate: it folds what the user means, and it never passes by accident.

Issue 9 items 3-5: a state_dict or a module saved in training mode is folded in eval; a command that
changes nothing fails unless --allow-noop; every way of ending (any exception, SystemExit, Ctrl-C) gives
one line and the right code (2 unusable input, 1 failed, 130 interrupted); reports only for a completed
check; outputs, report paths and input sizes refused before any work; no terminal escapes in files.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import normfold as nf
from normfold.demo import build_demo_model
from normfold.errors import ExportError
from normfold.testing import randomize_batchnorm
from tests.commands import _models
from tests.commands._cli import digest, run_cli

ARCH = "normfold.demo:build_demo_model"
SHAPE = "2,3,32,32"


def _one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture
def demo_sd(tmp_path: Path) -> Path:
    p = tmp_path / "model.pt"
    torch.save(build_demo_model(seed=3).state_dict(), p)
    return p


def _unwritable_dir() -> Path:
    """A folder this process cannot create files in (root can write nearly everywhere, not in /sys)."""
    for cand in (Path("/sys"), Path("/proc")):
        try:
            fd_path = cand / ".normfold-probe"
            fd_path.write_bytes(b"")
        except OSError:
            return cand
        fd_path.unlink()
    pytest.skip("no unwritable folder on this machine (/sys and /proc are writable)")


# ----------------------------------------------------------------------------------- item 3: what users mean


def test_torchvision_state_dict_is_folded_in_eval(tmp_path: Path, capsys) -> None:
    """The README's headline: a state_dict of a factory that builds models in training mode folds every BN."""
    model = randomize_batchnorm(torchvision.models.resnet18())
    src = tmp_path / "sd.pth"
    torch.save(model.state_dict(), src)
    out = tmp_path / "folded.pt"
    code, stdout, err = run_cli(["fold", str(src), "--arch", "torchvision.models:resnet18", "--input-shape",
                                 "2,3,32,32", "-o", str(out)], capsys)
    assert code == 0, err
    assert "folded 20 BatchNorm layer(s), left 0 alone" in stdout.splitlines()[-1]
    folded = nf.load(out, arch="torchvision.models:resnet18")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    v = nf.verify(model, folded, (torch.randn(2, 3, 32, 32),))
    assert v.passed, v.describe()
    # inspect counts what can be folded in eval, too
    code, stdout, err = run_cli(["inspect", str(src), "--arch", "torchvision.models:resnet18", "--input-shape",
                                 "1,3,32,32", "-q"], capsys)
    assert code == 0, err
    assert stdout.strip().endswith("20 BatchNorm(s) can be folded")


def test_module_saved_in_training_mode_is_folded_in_its_eval_form(tmp_path: Path, capsys) -> None:
    model = build_demo_model(seed=4).train()
    src = tmp_path / "whole.pt"
    torch.save(model, src)
    code, out, err = run_cli(["fold", str(src), "--trust", "--input-shape", SHAPE, "-o", str(tmp_path / "f.pt"),
                              "--pickle"], capsys)
    assert code == 0, err
    notes = [ln for ln in out.splitlines() if "saved in training mode" in ln]
    assert len(notes) == 1 and "eval form" in notes[0]
    assert "folded 5 BatchNorm layer(s)" in out.splitlines()[-1]


def test_fold_that_changes_nothing_fails_unless_allowed(tmp_path: Path, capsys) -> None:
    src = tmp_path / "plain.pt"
    torch.save(_models.nothing_to_fold(), src)
    out = tmp_path / "plain.folded.pt"
    code, stdout, err = run_cli(["fold", str(src), "--trust", "--input-shape", SHAPE, "-o", str(out)], capsys)
    assert code == 1
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("FAILED: nothing to fold: the model has no BatchNorm layer (no norm layer)"), last
    assert "--allow-noop" in last and "nothing written" in last
    assert not out.exists()
    code, stdout, err = run_cli(["fold", str(src), "--trust", "--input-shape", SHAPE, "-o", str(out),
                                 "--allow-noop", "--pickle"], capsys)
    assert code == 0, err
    assert out.exists() and "folded 0 BatchNorm layer(s)" in stdout.splitlines()[-1]


def test_convert_that_converts_nothing_fails(demo_sd: Path, capsys) -> None:
    code, out, err = run_cli(["convert", str(demo_sd), "--arch", ARCH, "--input-shape", SHAPE, "--to", "groupnorm",
                              "--groups", "5"], capsys)
    assert code == 1
    assert out.strip().splitlines()[-1].startswith("FAILED: nothing converted to groupnorm")
    assert not list(demo_sd.parent.glob("model.groupnorm*"))


def test_convert_counts_replaced_layers_not_the_edits_that_make_them_exact() -> None:
    from normfold.commands.convert import converted_count

    changes = [nf.Change("layernorm_to_rmsnorm", "to_rmsnorm", (f"ln{i}",), "m") for i in range(2)]
    changes += [nf.Change("layernorm_to_rmsnorm", a, ("w",), "m") for a in ("centre", "centre", "untie", "fold_scale")]
    assert converted_count(nf.PassResult(module=nn.Identity(), changes=changes)) == 2


def test_convert_calibration_folder_names_flags_convert_has(demo_sd: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(32, 32), (40, 36), (32, 32)]):
        Image.fromarray((torch.rand(*size, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    code, out, err = run_cli(["convert", str(demo_sd), "--arch", ARCH, "--input-shape", SHAPE, "--to", "groupnorm",
                              "--calibration-data", str(folder)], capsys)
    assert code == 2 and _one_line(err)
    assert "--calibration-data" in err and "--image-size" in err and "--data " not in err
    code, out, err = run_cli(["convert", str(demo_sd), "--arch", ARCH, "--input-shape", SHAPE, "--to", "groupnorm",
                              "--calibration-data", str(folder), "--image-size", "32", "--mean", "0.5",
                              "--std", "0.25"], capsys)
    assert code == 0, err
    assert "3 image(s)" in out


# --------------------------------------------------------------------------------- item 5: never a false pass


def test_factory_calling_sys_exit_is_unusable_input_and_writes_no_report(demo_sd: Path, tmp_path: Path,
                                                                         capsys) -> None:
    r_json, r_xml = tmp_path / "r.json", tmp_path / "r.xml"
    code, out, err = run_cli(["check", str(demo_sd), "--arch", "sys:exit", "--json", str(r_json), "--junit-xml",
                              str(r_xml)], capsys)
    assert code == 2 and _one_line(err) and "sys.exit" in err
    assert not r_json.exists() and not r_xml.exists()


def test_ctrl_c_in_the_factory_exits_130(demo_sd: Path, capsys) -> None:
    code, out, err = run_cli(["fold", str(demo_sd), "--arch", "tests.commands._models:interrupts"], capsys)
    assert code == 130 and _one_line(err) and "interrupted" in err


def test_sys_exit_in_the_forward_fails_with_one_line(tmp_path: Path, capsys) -> None:
    src = tmp_path / "m.pt"
    torch.save(_models.ExitsInForward(), src)
    code, out, err = run_cli(["fold", str(src), "--trust", "--input-shape", "7,3,8,8"], capsys)
    assert code == 1 and _one_line(err) and "sys.exit(1)" in err


def test_an_unexpected_error_is_one_line_exit_1(demo_sd: Path, capsys, monkeypatch) -> None:
    from normfold import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("something normfold did not expect\nsecond line")

    monkeypatch.setattr(pipeline, "fold", broken)
    code, out, err = run_cli(["fold", str(demo_sd), "--arch", ARCH, "--input-shape", SHAPE], capsys)
    assert code == 1 and _one_line(err) and "RuntimeError: something normfold did not expect" in err


@pytest.mark.parametrize("how", ["raised", "wrapped"])
def test_ctrl_c_during_export_is_an_interruption_not_a_failed_check(demo_sd: Path, tmp_path: Path, capsys,
                                                                    monkeypatch, how: str) -> None:
    import normfold.export

    def interrupted(*args, **kwargs):
        if how == "raised":
            raise KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:  # a tracer that turns the interrupt into its own error
            raise ExportError("torch.onnx.export (dynamo) failed") from ki

    monkeypatch.setattr(normfold.export, "export_onnx", interrupted)
    r_json, r_xml = tmp_path / "r.json", tmp_path / "r.xml"
    code, out, err = run_cli(["check", str(demo_sd), "--arch", ARCH, "--input-shape", SHAPE, "--json", str(r_json),
                              "--junit-xml", str(r_xml)], capsys)
    assert code == 130 and _one_line(err) and "interrupted" in err
    assert "[FAIL]" not in out and "FAILED" not in out
    assert not r_json.exists() and not r_xml.exists()


def test_ctrl_c_wrapped_by_the_exporter_in_export_exits_130(demo_sd: Path, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    import normfold.commands.export as export_cmd

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:
            raise ExportError("torch.onnx.export (dynamo) failed; make forward() traceable") from ki

    monkeypatch.setattr(export_cmd, "export_onnx", interrupted)
    out_path = tmp_path / "m.onnx"
    code, out, err = run_cli(["export", str(demo_sd), "--arch", ARCH, "--input-shape", SHAPE, "-o", str(out_path)],
                             capsys)
    assert code == 130 and _one_line(err) and "interrupted" in err and not out_path.exists()


def test_recalibrate_without_batchnorm_is_refused(tmp_path: Path, capsys) -> None:
    src = tmp_path / "plain.pt"
    torch.save(_models.nothing_to_fold(), src)
    torch.save(torch.randn(8, 3, 16, 16), tmp_path / "x.pt")
    code, out, err = run_cli(["recalibrate", str(src), "--trust", "--data", str(tmp_path / "x.pt"), "-o",
                              str(tmp_path / "r.pt")], capsys)
    assert code == 2 and _one_line(err) and "no BatchNorm" in err
    assert not (tmp_path / "r.pt").exists()


def test_outputs_are_refused_before_the_work_naming_the_flag(demo_sd: Path, tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    from normfold import pipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("the fold ran although its output could not be written")

    monkeypatch.setattr(pipeline, "fold", must_not_run)
    base = ["fold", str(demo_sd), "--arch", ARCH, "--input-shape", SHAPE]
    code, out, err = run_cli(base + ["-o", str(tmp_path / "missing" / "m.pt")], capsys)
    assert code == 2 and _one_line(err) and "-o " in err and "does not exist" in err
    code, out, err = run_cli(base + ["--json", str(tmp_path / "nodir" / "r.json"), "--check"], capsys)
    assert code == 2 and _one_line(err) and "--json " in err and "-o " not in err
    code, out, err = run_cli(base + ["--onnx", str(tmp_path / "nodir" / "m.onnx")], capsys)
    assert code == 2 and _one_line(err) and "--onnx " in err
    bad = _unwritable_dir()
    code, out, err = run_cli(base + ["-o", str(bad / "out.pt")], capsys)
    assert code == 2 and _one_line(err) and "cannot write" in err
    code, out, err = run_cli(["check", str(demo_sd), "--arch", ARCH, "--json", str(bad / "r.json")], capsys)
    assert code == 2 and _one_line(err) and "--json" in err and "cannot write" in err
    code, out, err = run_cli(["export", str(demo_sd), "--arch", ARCH, "-o", str(bad / "x.onnx")], capsys)
    assert code == 2 and _one_line(err) and "cannot write" in err


def test_input_size_is_checked_before_allocating(demo_sd: Path, capsys) -> None:
    code, out, err = run_cli(["fold", str(demo_sd), "--arch", ARCH, "--input-shape", "100000,3,224,224"], capsys)
    assert code == 2 and _one_line(err)
    assert "--max-input-bytes" in err and "bytes" in err and "GiB" in err
    code, out, err = run_cli(["check", str(demo_sd), "--arch", ARCH, "--input-shape", "100000,3,224,224"], capsys)
    assert code == 2 and _one_line(err) and "--max-input-bytes" in err


def test_report_files_carry_no_terminal_escapes(demo_sd: Path, tmp_path: Path, capsys) -> None:
    cand = tmp_path / "cand.pt"
    torch.save(_models.RaisesWithColour(), cand)
    r_json, r_xml = tmp_path / "r.json", tmp_path / "r.xml"
    code, out, err = run_cli(["check", str(demo_sd), "--arch", ARCH, "--candidate", str(cand), "--trust",
                              "--input-shape", SHAPE, "--no-export", "--no-probes", "--json", str(r_json),
                              "--junit-xml", str(r_xml)], capsys)
    assert code == 1, err
    for report in (r_json, r_xml):
        text = report.read_text()
        assert "This is step 1/3" in text and "\x1b" not in text


# ------------------------------------------------------------------------- item 4: trace part by part, .pt2


def test_model_that_does_not_trace_whole_is_folded_part_by_part(tmp_path: Path, capsys) -> None:
    src = tmp_path / "branchy.pt"
    torch.save(_models.branchy().state_dict(), src)
    out = tmp_path / "branchy.folded.pt"
    code, stdout, err = run_cli(["fold", str(src), "--arch", "tests.commands._models:branchy", "--input-shape",
                                 "2,3,16,16", "-q", "-o", str(out)], capsys)
    assert code == 0, err
    assert err == ""  # -q: no FX graph dump of the failed trace
    assert stdout.count("\n") == 1 and "folded 2 BatchNorm layer(s)" in stdout
    code, stdout, err = run_cli(["fold", str(src), "--arch", "tests.commands._models:branchy", "--input-shape",
                                 "2,3,16,16", "-o", str(out)], capsys)
    assert "the whole model does not trace" in stdout and "not run by the model's forward" in stdout


def test_piecewise_folds_are_exact_on_both_branches() -> None:
    from normfold.passes.piecewise import piecewise

    model = _models.branchy().eval()
    x = torch.randn(2, 3, 16, 16)
    r = piecewise(nf.fold_batchnorm, model, example_inputs=(x,))
    assert r.metrics["piecewise"] == ["stem", "a"]
    assert sorted(p for c in r.changes for p in c.paths if p.endswith("bn") or p == "stem.1") == ["a.bn", "stem.1"]
    skipped = {s.paths[0]: s.reason for s in r.skipped}
    assert "does not trace" in skipped["<model>"] and "not run" in skipped["b"]
    for shift in (5.0, -5.0):  # one input takes branch a, the other branch b
        v = nf.verify(model, r.module, (torch.randn(2, 3, 16, 16) + shift,))
        assert v.passed, v.describe()


@pytest.fixture
def programs(tmp_path: Path) -> dict[str, Path]:
    x = torch.randn(2, 3, 32, 32)
    model = build_demo_model(seed=5)
    paths = {"module": tmp_path / "module.pt", "prog": tmp_path / "prog.pt2", "train": tmp_path / "train.pt2"}
    torch.save(model, paths["module"])
    torch.export.save(torch.export.export(model, (x,)), paths["prog"])
    torch.export.save(torch.export.export(build_demo_model(seed=5).train(), (x,)), paths["train"])
    return paths


def test_pt2_in_check_export_and_inspect(programs: dict[str, Path], tmp_path: Path, capsys) -> None:
    folded = tmp_path / "prog.folded.pt2"
    code, out, err = run_cli(["fold", str(programs["prog"]), "-q", "-o", str(folded)], capsys)
    assert code == 0, err
    code, out, err = run_cli(["check", str(programs["prog"]), "--candidate", str(folded), "-q"], capsys)
    assert code == 0, err
    assert out.startswith("PASSED")
    # a module reference with a .pt2 candidate: what both compute, in eval (8-sample batches run in chunks of 2)
    code, out, err = run_cli(["check", str(programs["module"]), "--trust", "--candidate", str(folded),
                              "--input-shape", SHAPE], capsys)
    assert code == 0, err
    assert "[ok  ] batch_independence[eager]" in out and "[ok  ] training_mode[eager]" in out
    # a candidate exported in training mode is checked as it is, and fails
    code, out, err = run_cli(["check", str(programs["module"]), "--trust", "--candidate", str(programs["train"]),
                              "--input-shape", SHAPE, "-q"], capsys)
    assert code == 1 and out.startswith("FAILED")
    # the same program as MODEL is the reference in its eval form
    code, out, err = run_cli(["check", str(programs["train"]), "--candidate", str(folded), "-q"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["export", str(programs["prog"]), "-o", str(tmp_path / "prog.onnx"), "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "prog.onnx").exists()
    code, out, err = run_cli(["inspect", str(programs["prog"]), "-q"], capsys)
    assert code == 0 and "5 can be folded" in out
    # a program exported in training mode is folded in its eval form, which one line says
    code, out, err = run_cli(["fold", str(programs["train"]), "-o", str(tmp_path / "train.folded.pt2")], capsys)
    assert code == 0, err
    assert sum("exported in training mode" in ln for ln in out.splitlines()) == 1
    assert "folded 5 BatchNorm layer(s)" in out.splitlines()[-1]


# ---------------------------------------------------------------------------------------- library corners


def test_the_fold_pipeline_is_reachable_from_python() -> None:
    from normfold import pipeline

    model = randomize_batchnorm(torchvision.models.resnet18()).train()  # as a factory builds it
    x = torch.randn(2, 3, 32, 32)
    outcome = pipeline.fold(model, (x,))
    assert outcome.may_write() and not outcome.noop and outcome.verification.passed
    assert model.training  # the caller's model is not touched
    noop = pipeline.fold(_models.nothing_to_fold(), (x,))
    assert noop.noop and not noop.may_write() and noop.may_write(allow_noop=True)


def test_pass_manager_runs_the_public_pass_functions() -> None:
    model = build_demo_model(seed=1)
    x = torch.randn(2, 3, 32, 32)
    r = nf.PassManager([functools.partial(nf.fold_batchnorm, example_inputs=(x,)), nf.freeze_batchnorm])(model)
    assert [c.pass_name for c in r.changes].count("freeze_batchnorm") == 1  # the BN fold left alone
    v = nf.verify(model, r.module, (x,))
    assert v.passed, v.describe()


def test_export_result_repr_is_one_short_line() -> None:
    res = nf.ExportResult(path=None, opset=18, opset_reason="r", input_names=["x"], output_names=["y"],
                          batch_dims=["batch"], dynamic_batch=True, external_data=False, size_bytes=10**6,
                          seconds=1.0, model_proto=object(), model_bytes=b"\0" * 10**6)
    text = repr(res)
    assert len(text) < 200 and "\n" not in text and "opset 18" in text


def test_data_loading_is_in_the_library(tmp_path: Path) -> None:
    from normfold.data import load_data

    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.random.rand(10, 3, 8, 8).astype("float32"), y=np.arange(10))
    batches, description = load_data(tmp_path / "d.npz", model=build_demo_model(), batch_size=4)
    assert [b.shape[0] for b in batches] == [4, 4, 2] and "(10, 3, 8, 8)" in description
    with pytest.raises(nf.NormfoldError, match="--calibration-data"):
        load_data(tmp_path / "missing.npz", model=build_demo_model(), flag="--calibration-data")


def test_outputs_are_left_untouched_on_failure(demo_sd: Path, capsys) -> None:
    before = digest(demo_sd)
    code, out, err = run_cli(["fold", str(demo_sd), "--arch", ARCH, "--input-shape", "0,3"], capsys)
    assert code == 2 and _one_line(err)
    assert digest(demo_sd) == before and sorted(os.listdir(demo_sd.parent)) == ["model.pt"]
