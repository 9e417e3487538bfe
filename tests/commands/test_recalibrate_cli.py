"""`normfold recalibrate` from the command line: results equal the library's, files, and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from normfold.data import visiting_order
import normfold as nf
from normfold.demo import build_demo_model
from normfold.recalibrate import recalibrate
from normfold.tolerances import RECALIBRATE
from tests.commands._cli import digest as _digest, run_cli as _run

ARCH = "normfold.demo:build_demo_model"
TOL = RECALIBRATE[torch.float32]


SIZE = 16  # image side: small keeps the test fast; the demo model takes any even size


def _data(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 1.7 + 0.8


def _visited(x: torch.Tensor, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """The batches the command runs: samples in its seeded visiting order."""
    order = visiting_order(len(x), seed)
    return [x[order[i:i + batch_size]] for i in range(0, len(x), batch_size)]


def _bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def _assert_same_stats(written: nn.Module, expected: nn.Module) -> None:
    got, want = _bn_stats(written), _bn_stats(expected)
    assert set(got) == set(want) and got
    for k in want:
        assert TOL.allclose(got[k], want[k]), k


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    p = tmp_path / "model.pt"
    torch.save(build_demo_model(seed=3).state_dict(), p)
    return p


def test_tensor_file_gives_the_library_result_and_writes_beside_the_input(model_file: Path, tmp_path: Path,
                                                                         capsys) -> None:
    data = tmp_path / "domain.pt"
    torch.save(_data(), data)
    before = _digest(model_file), _digest(data)
    code, out, err = _run(["recalibrate", str(model_file), "--arch", ARCH, "--data", str(data), "--batch-size", "16"],
                          capsys)
    assert code == 0, err
    written = tmp_path / "model.recalibrated.safetensors"
    assert written.exists() and (_digest(model_file), _digest(data)) == before
    expected = recalibrate(build_demo_model(seed=3), _visited(_data(), 16), progress=False)
    _assert_same_stats(nf.load(written, arch=ARCH), expected.model)
    last = out.strip().splitlines()[-1]
    assert last.startswith("recalibrated 6 BatchNorm layer(s) (population, 3 batch(es), 40 samples)") and str(written) in last
    for path in ("stem.1", "block_bn", "fc_bn"):
        assert path in out
    assert not any(p.name.startswith(".model") for p in tmp_path.iterdir()), "temporary file left behind"


def test_seed_sets_the_visiting_order(model_file: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "domain.pt"
    torch.save(_data(24), data)
    runs = {}
    for seed in ("0", "5"):
        out_file = tmp_path / f"seed{seed}.pt"
        code, out, err = _run(["recalibrate", str(model_file), "--arch", ARCH, "--data", str(data), "--batch-size",
                               "8", "--max-batches", "1", "--seed", seed, "-o", str(out_file), "-q"], capsys)
        assert code == 0, err
        runs[seed] = nf.load(out_file, arch=ARCH)
    expected = recalibrate(build_demo_model(seed=3), _visited(_data(24), 8, seed=5), max_batches=1, progress=False)
    _assert_same_stats(runs["5"], expected.model)
    assert not torch.allclose(runs["0"].stem[1].running_mean, runs["5"].stem[1].running_mean)


@pytest.mark.parametrize("kind", ["npy float64", "npz with x and labels", "pt dict"])
def test_numpy_and_dict_files(kind: str, model_file: Path, tmp_path: Path, capsys) -> None:
    x = _data(24)
    if kind == "npy float64":
        data = tmp_path / "d.npy"
        np.save(data, x.double().numpy())
    elif kind == "npz with x and labels":
        data = tmp_path / "d.npz"
        np.savez(data, labels=np.zeros(24), x=x.numpy())
    else:
        data = tmp_path / "d.pt"
        torch.save({"inputs": x, "labels": torch.zeros(24)}, data)
    out_file = tmp_path / "out.pt"
    code, out, err = _run(["recalibrate", str(model_file), "--arch", ARCH, "--data", str(data), "--estimator",
                           "cumulative", "--max-batches", "2", "--batch-size", "8", "-o", str(out_file), "-q"], capsys)
    assert code == 0, err
    assert out.strip().splitlines() == [out.strip().splitlines()[-1]], "-q prints only the final line"
    expected = recalibrate(build_demo_model(seed=3), _visited(x, 8), estimator="cumulative", max_batches=2,
                           progress=False)
    _assert_same_stats(nf.load(out_file, arch=ARCH), expected.model)


def _write_images(folder: Path, n: int, size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> list[np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for i in range(n):
        a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"img{i:02d}.png")
        arrays.append(a)
    return arrays


def test_image_folder_is_scaled_normalized_and_matches_the_library(model_file: Path, tmp_path: Path, capsys) -> None:
    arrays = _write_images(tmp_path / "imgs" / "class_a", 6) + _write_images(tmp_path / "imgs" / "class_b", 4, seed=1)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, ignored")
    out_file = tmp_path / "out.pt"
    code, out, err = _run(["recalibrate", str(model_file), "--arch", ARCH, "--data", str(tmp_path / "imgs"),
                           "--mean", "0.5,0.4,0.3", "--std", "0.25", "--batch-size", "4", "-o", str(out_file)], capsys)
    assert code == 0, err
    assert "10 image(s)" in out and f"RGB {SIZE}x{SIZE}" in out
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    x = (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255 - mean) / 0.25
    expected = recalibrate(build_demo_model(seed=3), _visited(x, 4), progress=False)
    _assert_same_stats(nf.load(out_file, arch=ARCH), expected.model)


def test_image_folder_resizes_with_image_size(model_file: Path, tmp_path: Path, capsys) -> None:
    _write_images(tmp_path / "imgs", 3, size=(20, 24))
    _write_images(tmp_path / "imgs" / "more", 3, size=(14, 10), seed=2)
    code, out, err = _run(["recalibrate", str(model_file), "--arch", ARCH, "--data", str(tmp_path / "imgs"),
                           "--image-size", "16,12", "-o", str(tmp_path / "o.pt")], capsys)
    assert code == 0, err
    assert "RGB 16x12" in out


def exploding_model() -> nn.Module:
    """A model whose outputs overflow to inf: the check after recalibration must fail (exit 1)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), _Exp())


class _Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x * 1000)


def test_non_finite_outputs_fail_with_exit_1_and_write_nothing(tmp_path: Path, capsys) -> None:
    model = tmp_path / "exploding.pt"
    torch.save(exploding_model().state_dict(), model)
    data = tmp_path / "d.pt"
    torch.save(_data(8), data)
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(["recalibrate", str(model), "--arch", f"{__name__}:exploding_model", "--data", str(data)],
                          capsys)
    assert code == 1, (out, err)
    assert out.strip().splitlines()[-1].startswith("FAILED: the recalibrated model gives non-finite outputs")
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> tuple[Path, dict[str, tuple[list[str], str]]]:
    """Every bad-input case's files, written once; each case must leave the folder exactly as it was."""
    from PIL import Image

    d = tmp_path_factory.mktemp("cases")
    model_file = d / "model.pt"
    torch.save(build_demo_model(seed=3).state_dict(), model_file)
    base = ["recalibrate", str(model_file), "--arch", ARCH, "--data"]
    (d / "empty_folder").mkdir()
    unreadable = d / "unreadable"
    unreadable.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)).save(unreadable / "ok.png")
    (unreadable / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    mixed = d / "mixed_sizes"
    _write_images(mixed, 1, size=(SIZE, SIZE))
    _write_images(mixed / "b", 1, size=(SIZE - 2, SIZE - 2))
    truncated_img = d / "truncated_img"
    _write_images(truncated_img, 2)
    png = (truncated_img / "img01.png").read_bytes()
    (truncated_img / "img01.png").write_bytes(png[:60])
    torch.save(torch.randn(8, 5, SIZE, SIZE), d / "channels.pt")
    torch.save(torch.randn(0, 3, SIZE, SIZE), d / "zero.pt")
    torch.save((torch.randn(8, 3, SIZE, SIZE), torch.zeros(8)), d / "pair.pt")
    torch.save(torch.randint(0, 255, (8, 3, SIZE, SIZE), dtype=torch.uint8), d / "uint8.pt")
    nan = torch.randn(8, 3, SIZE, SIZE)
    nan[3, 1, 4, 4] = float("nan")
    torch.save(nan, d / "nan.pt")
    np.savez(d / "two.npz", a=np.zeros((4, 3, SIZE, SIZE)), b=np.zeros((4, 3, SIZE, SIZE)))
    np.save(d / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.pt").write_text("not a tensor file\n")
    (d / "notes.txt").write_text("hello\n")
    good = d / "good.pt"
    torch.save(_data(8), good)
    g = str(good)
    return d, {
        "data missing": (base + [str(d / "nope.pt")], "no such file or folder"),
        "empty folder": (base + [str(d / "empty_folder")], "holds no images"),
        "unreadable image": (base + [str(unreadable)], "broken.jpg is not a readable image"),
        "truncated image": (base + [str(truncated_img)], "img01.png is not a readable image"),
        "images of different sizes": (base + [str(mixed)], "pass --image-size"),
        "data does not fit the model": (base + [str(d / "channels.pt")], "does not fit the model"),
        "zero samples": (base + [str(d / "zero.pt")], "no samples along dim 0"),
        "tuple in .pt": (base + [str(d / "pair.pt")], "save only the model's input"),
        "integer data": (base + [str(d / "uint8.pt")], "convert the data to float"),
        "NaN in data": (base + [str(d / "nan.pt")], "non-finite statistics"),
        "npz without a named input": (base + [str(d / "two.npz")], "name it 'x'"),
        "npy of objects": (base + [str(d / "objects.npy")], "not a readable tensor file"),
        "empty data file": (base + [str(d / "empty.pt")], "is empty"),
        "garbage data file": (base + [str(d / "garbage.pt")], "not a readable tensor file"),
        "unknown data suffix": (base + [str(d / "notes.txt")], "unknown kind of file"),
        "image flags with a tensor file": (base + [g, "--image-size", str(SIZE)], "applies to a folder of images"),
        "mean of the wrong length": (base + [str(mixed), "--image-size", str(SIZE), "--mean", "0.5,0.5"], "give 1 or 3"),
        "std not numbers": (base + [str(mixed), "--image-size", str(SIZE), "--std", "a"], "not a list of numbers"),
        "bad image size": (base + [str(mixed), "--image-size", "0"], "positive integers"),
        "batch size 0": (base + [g, "--batch-size", "0"], "--batch-size 0 must be a positive integer"),
        "batch size 1 with BatchNorm1d": (base + [g, "--batch-size", "1"], "batch size of 2 or more"),
        "unknown estimator": (base + [g, "--estimator", "median"], "invalid choice"),
        "missing --data": (["recalibrate", str(model_file), "--arch", ARCH], "--data"),
        "output over the input": (base + [g, "-o", str(model_file)], "refusing to overwrite the input"),
        "state_dict without --arch": (["recalibrate", str(model_file), "--data", g], "pass --arch"),
        "model missing": (["recalibrate", str(d / "none.pt"), "--data", g], "no such file"),
    }


CASES = ["data missing", "empty folder", "unreadable image", "truncated image", "images of different sizes",
         "data does not fit the model", "zero samples", "tuple in .pt", "integer data", "NaN in data",
         "npz without a named input", "npy of objects", "empty data file", "garbage data file", "unknown data suffix",
         "image flags with a tensor file", "mean of the wrong length", "std not numbers", "bad image size",
         "batch size 0", "batch size 1 with BatchNorm1d", "unknown estimator", "missing --data",
         "output over the input", "state_dict without --arch", "model missing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2(case: str, bad_inputs, capsys) -> None:
    folder, cases = bad_inputs
    argv, expected = cases[case]
    digests = {p: _digest(p) for p in folder.rglob("*") if p.is_file()}
    code, out, err = _run(argv, capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert {p: _digest(p) for p in folder.rglob("*") if p.is_file()} == digests, \
        "a bad input must not modify or leave files"


def test_all_cases_are_tested(bad_inputs) -> None:
    assert sorted(CASES) == sorted(bad_inputs[1])
