"""`normfold convert`: every target, the file rules, the report, exit codes 0/1/2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import normfold as nf
from normfold.demo import build_demo_model
from normfold.passes.freeze_batchnorm import FrozenAffine
from tests.conftest import assert_models_close, assert_state_equal, run_eval, state_snapshot
from tests.commands._cli import digest as _digest, run_cli as _run

ARCH = "normfold.demo:build_demo_model"
SHAPE = "2,3,32,32"


@pytest.fixture
def state_dict_file(tmp_path: Path) -> Path:
    p = tmp_path / "model.pt"
    torch.save(build_demo_model(seed=3).state_dict(), p)
    return p


def _args(path: Path, *more: str) -> list[str]:
    return ["convert", str(path), "--arch", ARCH, "--input-shape", SHAPE, *more]


def test_groupnorm_naive_and_warm_started(state_dict_file: Path, tmp_path: Path, capsys) -> None:
    before = _digest(state_dict_file)
    code, out, err = _run(_args(state_dict_file, "--to", "groupnorm"), capsys)
    assert code == 0, err
    assert _digest(state_dict_file) == before
    naive_path = state_dict_file.with_name("model.groupnorm.safetensors")
    assert "converted 6 layer(s) to groupnorm (approximate), left 0 alone" in out
    assert "measured, not checked" in out
    naive = nf.load(naive_path, arch=ARCH)
    assert sum(isinstance(m, nn.GroupNorm) for m in naive.modules()) == 6
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in naive.modules())

    data = tmp_path / "calib.pt"
    torch.save(torch.randn(24, 3, 32, 32) * 2 + 0.5, data)
    code, out, err = _run(_args(state_dict_file, "--to", "groupnorm", "--calibration-data", str(data),
                                "--sequential", "-o", str(tmp_path / "warm.pt")), capsys)
    assert code == 0, err
    assert "warm-started by least squares" in out
    warm = nf.load(tmp_path / "warm.pt", arch=ARCH)
    original = build_demo_model(seed=3)
    x = torch.randn(16, 3, 32, 32) * 2 + 0.5
    ref = run_eval(original, (x,))
    assert (run_eval(warm, (x,)) - ref).norm() < (run_eval(naive, (x,)) - ref).norm()


def test_syncbn_and_back_round_trip(state_dict_file: Path, tmp_path: Path, capsys) -> None:
    code, out, err = _run(_args(state_dict_file, "--to", "syncbn"), capsys)
    assert code == 0, err
    sync_path = state_dict_file.with_name("model.syncbn.safetensors")
    assert "(exact)" in out and sum(isinstance(m, nn.SyncBatchNorm) for m in
                                    nf.load(sync_path, arch=ARCH).modules()) == 6
    code, out, err = _run(["convert", str(sync_path), "--arch", ARCH, "--input-shape", SHAPE, "--to", "batchnorm",
                           "-o", str(tmp_path / "back.pt")], capsys)
    assert code == 0, err
    back = nf.load(tmp_path / "back.pt", arch=ARCH)
    original = build_demo_model(seed=3)
    assert [type(m) for m in back.modules()] == [type(m) for m in original.modules()]
    assert_state_equal(back, state_snapshot(original))


def test_frozen_and_back(state_dict_file: Path, tmp_path: Path, capsys) -> None:
    code, out, err = _run(_args(state_dict_file, "--to", "frozen"), capsys)
    assert code == 0, err
    frozen_path = state_dict_file.with_name("model.frozen.safetensors")
    frozen = nf.load(frozen_path, arch=ARCH)
    assert sum(isinstance(m, FrozenAffine) for m in frozen.modules()) == 6
    original = build_demo_model(seed=3)
    x = torch.randn(4, 3, 32, 32)
    assert_models_close(frozen, original, (x,))
    code, out, err = _run(["convert", str(frozen_path), "--arch", ARCH, "--to", "batchnorm", "-q"], capsys)
    assert code == 0, err
    assert out.strip().startswith("converted 6 layer(s) to batchnorm (exact)") and len(out.strip().splitlines()) == 1
    back = nf.load(state_dict_file.with_name("model.frozen.batchnorm.safetensors"), arch=ARCH)
    assert_state_equal(back, state_snapshot(original))


def test_rmsnorm_calls_the_layernorm_pass(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))
    path = tmp_path / "ln.pt"
    torch.save(model, path)
    code, out, err = _run(["convert", str(path), "--trust", "--to", "rmsnorm", "--mode", "approx",
                           "--input-shape", "4,8"], capsys)
    assert code == 0, err
    converted = torch.load(tmp_path / "ln.rmsnorm.pt", weights_only=False)
    assert not any(isinstance(m, nn.LayerNorm) for m in converted.modules())
    assert "(approximate)" in out


@pytest.mark.parametrize("extra, fix", [
    (["--to", "frozen", "--groups", "4"], "--groups only applies to --to groupnorm"),
    (["--to", "syncbn", "--mode", "exact"], "--mode only applies to --to rmsnorm"),
    (["--to", "groupnorm", "--sequential"], "pass --calibration-data"),
    (["--to", "groupnorm", "--groups", "0"], "positive integer"),
    (["--to", "groupnorm", "--calibration-data", "missing.pt"], "--calibration-data missing.pt: no such file"),
    (["--to", "frozen", "-o", "{input}"], "refusing to overwrite the input"),
])
def test_bad_usage_is_one_line_exit_2(state_dict_file: Path, capsys, extra: list[str], fix: str) -> None:
    before = _digest(state_dict_file)
    extra = [e.replace("{input}", str(state_dict_file)) for e in extra]
    code, out, err = _run(_args(state_dict_file, *extra), capsys)
    assert code == 2
    assert fix in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _digest(state_dict_file) == before
    assert sorted(p.name for p in state_dict_file.parent.iterdir()) == ["model.pt"]


def test_missing_to_and_exported_program(state_dict_file: Path, tmp_path: Path, capsys) -> None:
    code, _, err = _run(["convert", str(state_dict_file), "--arch", ARCH], capsys)
    assert code == 2 and "--to" in err
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(build_demo_model(seed=1).eval(), (torch.randn(2, 3, 32, 32),)), pt2)
    code, _, err = _run(["convert", str(pt2), "--to", "frozen"], capsys)
    assert code == 2 and "ExportedProgram" in err


def test_exact_conversion_that_does_not_match_exits_1_and_writes_nothing(state_dict_file: Path, capsys,
                                                                         monkeypatch) -> None:
    import normfold.passes.freeze_batchnorm as fb

    real = fb.freeze_batchnorm

    def broken(model, **kw):
        r = real(model, **kw)
        with torch.no_grad():
            next(m for m in r.module.modules() if isinstance(m, FrozenAffine)).shift.add_(1.0)
        return r

    monkeypatch.setattr(fb, "freeze_batchnorm", broken)
    code, out, err = _run(_args(state_dict_file, "--to", "frozen"), capsys)
    assert code == 1
    assert "FAILED: the converted model differs from the original" in out and "nothing written" in out
    assert not state_dict_file.with_name("model.frozen.safetensors").exists()


def test_approximate_conversion_with_nan_exits_1(state_dict_file: Path, capsys, monkeypatch) -> None:
    import normfold.passes.batchnorm_to_groupnorm as bg

    real = bg.batchnorm_to_groupnorm

    def broken(model, **kw):
        r = real(model, **kw)
        with torch.no_grad():
            next(m for m in r.module.modules() if isinstance(m, nn.GroupNorm)).weight.fill_(float("nan"))
        return r

    monkeypatch.setattr(bg, "batchnorm_to_groupnorm", broken)
    code, out, err = _run(_args(state_dict_file, "--to", "groupnorm"), capsys)
    assert code == 1 and "NaN" in out and "nothing written" in out
    assert not state_dict_file.with_name("model.groupnorm.safetensors").exists()
