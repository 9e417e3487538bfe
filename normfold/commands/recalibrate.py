"""Re-estimate BatchNorm statistics on data from a new domain, and write the recalibrated model.

Loads MODEL and the unlabeled data of the new domain (--data: a tensor file,
.pt/.pth read with torch.load(weights_only=True), .npy or .npz; or a folder of
images, read with Pillow, resized to --image-size and normalized with
--mean/--std), runs it through the model with every BatchNorm measuring its
input (everything else in eval), and writes the model with the new statistics
beside the input as <stem>.recalibrated<suffix> (or -o OUT), never over the
input. Prints how far each layer's statistics moved: the mean in units of the
old standard deviation, and the variance ratio. Samples are visited in a
seeded random order (--seed), so that every batch mixes the data even when
they are sorted (a folder of class subfolders) and --max-batches takes a
representative subset. Exit 0 when written, 1 when
the recalibrated model gives non-finite outputs on the data (nothing is
written then), 2 on bad input.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from normfold.commands._common import (Command, add_model_arguments, add_output_argument, final_line,
                                       load_from_args, output_path, print_skips, write_model)
from normfold.errors import InputError, UsageError
from normfold.inputs import model_dtype_device, run_model
from normfold.io import check_output_path
from normfold.recalibrate import DEFAULT_BATCH_SIZE, ESTIMATORS, RecalibrationResult, recalibrate

__all__ = ["RecalibrateCommand", "load_data", "IMAGE_SUFFIXES", "TENSOR_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".npz")
#: names under which a .npz or a dict in a .pt file holds the model's input, in order of preference
_INPUT_KEYS = ("x", "inputs", "input", "data", "images", "X")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class RecalibrateCommand(Command):
    __doc__ = __doc__

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        add_model_arguments(p, inputs=False)
        p.add_argument("--data", metavar="PATH", required=True,
                       help="the new domain's unlabeled data: a tensor file (.pt, .pth, .npy, .npz) whose dim 0 "
                            "indexes samples, or a folder of images (searched recursively)")
        p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                       help=f"samples per forward pass (default {DEFAULT_BATCH_SIZE}; larger is closer to the "
                            "population statistics)")
        p.add_argument("--max-batches", type=int, default=None, metavar="N", help="stop after N batches")
        p.add_argument("--estimator", choices=ESTIMATORS, default="population",
                       help="population (default): every value weighted alike, exact pooled variance; cumulative: "
                            "torch's momentum=None, one weight per batch; ema: the layers' own momentum, no reset")
        p.add_argument("--image-size", metavar="H[,W]", help="resize images to H x W (default: their own size, "
                                                             "which must then be the same for all)")
        p.add_argument("--mean", metavar="M[,M,...]", help="per-channel mean subtracted from images scaled to [0, 1] "
                                                           "(e.g. 0.485,0.456,0.406)")
        p.add_argument("--std", metavar="S[,S,...]", help="per-channel std images are divided by (e.g. 0.229,0.224,0.225)")
        p.add_argument("--seed", type=int, default=0, help="seed of the order samples are visited in (default 0)")
        add_output_argument(p, "recalibrated")

    def run(self, args: argparse.Namespace, console: Console) -> int:
        for flag in ("batch_size", "max_batches"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise UsageError(f"--{flag.replace('_', '-')} {value} must be a positive integer")
        loaded = load_from_args(args)
        if loaded.kind == "exported":
            raise UsageError(f"{loaded.path} is an ExportedProgram (.pt2), whose BatchNorms are graph ops without "
                             "running buffers to update: recalibrate the nn.Module (a .pt state_dict with --arch, "
                             "or a pickled module with --trust)")
        # refuse a bad -o before a long run, not after it
        check_output_path(output_path(args, loaded, "recalibrated"), loaded.path)
        original = loaded.module
        data, description = load_data(Path(args.data), model=original, image_size=args.image_size,
                                      mean=args.mean, std=args.std, batch_size=args.batch_size, seed=args.seed)
        console.print(f"[dim]data: {description}[/dim]")
        result = recalibrate(original, data, estimator=args.estimator, max_batches=args.max_batches,
                             progress=not args.quiet)
        print_shifts(console, result)
        probe = next(iter(data))[:8]
        before = run_model(original, (probe,))
        after = run_model(result.module, (probe,))
        outs = [t for t in _tensors(after)]
        if not all(torch.isfinite(t).all() for t in outs if t.is_floating_point()):
            final_line("FAILED: the recalibrated model gives non-finite outputs on the data; nothing written")
            return 1
        change = max(((a.double() - b.double()).abs().max().item() for a, b in zip(outs, _tensors(before))
                      if a.is_floating_point() and a.shape == b.shape), default=float("nan"))
        console.print(f"outputs on {probe.shape[0]} samples of the data moved by up to {change:.3g} (max abs)")
        out = write_model(args, loaded, result.module, "recalibrated")
        top = result.most_shifted(1)
        largest = f"; largest mean shift {top[0].mean_shift:.3g} sd at {top[0].path}" if top else ""
        final_line(f"recalibrated {len(result.shifts)} BatchNorm layer(s) ({result.estimator}, {result.batches} "
                   f"batch(es), {result.samples} samples), left {len(result.skipped)} alone{largest}; wrote {out}")
        return 0


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in _tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def print_shifts(console: Console, result: RecalibrationResult) -> None:
    """One row per recalibrated layer: how far its statistics moved; then what was left alone and why."""
    t = Table(title=f"recalibrated: {len(result.shifts)} BatchNorm layer(s), {result.estimator} estimator",
              title_justify="left")
    for col, justify in (("layer", "left"), ("kind", "left"), ("values/ch", "right"),
                         ("mean shift (old sd)", "right"), ("max", "right"), ("variance ratio", "right")):
        t.add_column(col, justify=justify)
    for s in result.shifts:
        t.add_row(s.path, s.kind, str(s.count), f"{s.mean_shift:.3g}", f"{s.max_mean_shift:.3g}", f"x{s.var_ratio:.3g}")
    console.print(t)
    print_skips(console, result.skipped)


# ----------------------------------------------------------------------------------------------
# data


def visiting_order(n: int, seed: int) -> torch.Tensor:
    """The order samples are visited in: ``torch.randperm(n)`` from a generator seeded with ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class _TensorBatches:
    """Batches of a tensor's samples in a given order, gathered lazily (no shuffled copy of the whole data)."""

    def __init__(self, data: torch.Tensor, order: torch.Tensor, batch_size: int) -> None:
        self.data, self.order, self.batch_size = data, order, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.order), self.batch_size):
            yield self.data[self.order[i:i + self.batch_size]]


def load_data(path: Path, *, model: nn.Module, image_size: str | None = None, mean: str | None = None,
              std: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0) -> tuple[Any, str]:
    """The data at ``path`` as a sized iterable of batches in :func:`visiting_order`, and a description."""
    if not path.exists():
        raise InputError(f"--data {path}: no such file or folder; check the path")
    if path.is_dir():
        return _image_batches(path, model=model, image_size=image_size, mean=mean, std=std, batch_size=batch_size,
                              seed=seed)
    given = [f for f, v in (("--image-size", image_size), ("--mean", mean), ("--std", std)) if v is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to a folder of images; "
                         f"a tensor file is used as it is: drop {'it' if len(given) == 1 else 'them'}, or save the "
                         "data already resized and normalized")
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        raise UsageError(f"--data {path}: unknown kind of file ({suffix or 'no suffix'}); pass a tensor file "
                         f"({', '.join(TENSOR_SUFFIXES)}) or a folder of images")
    if path.stat().st_size == 0:
        raise InputError(f"--data {path} is empty; save the data with torch.save(tensor, path) or numpy.save")
    array = _read_tensor_file(path, suffix)
    data = _TensorBatches(_fit_dtype(array, path, model), visiting_order(len(array), seed), batch_size)
    return data, f"{path.name}: {tuple(array.shape)} {str(array.dtype).replace('torch.', '')}"


def _read_tensor_file(path: Path, suffix: str) -> torch.Tensor:
    how = "torch.save(tensor, path)" if suffix in (".pt", ".pth") else "numpy.save(path, array)"
    try:
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npy":
            obj = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                obj = {k: npz[k] for k in npz.files}
    except Exception as exc:  # pickled objects, truncation, garbage: all mean "not a tensor file"
        head = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"--data {path} is not a readable tensor file ({type(exc).__name__}: {head}); "
                         f"save the data with {how}") from exc
    if isinstance(obj, dict):
        arrays = {k: v for k, v in obj.items() if isinstance(v, (torch.Tensor, np.ndarray))}
        if len(arrays) == 1:
            obj = next(iter(arrays.values()))
        else:
            key = next((k for k in _INPUT_KEYS if k in arrays), None)
            if key is None:
                raise InputError(f"--data {path} holds {len(arrays)} arrays ({', '.join(map(str, list(arrays)[:6]))}) "
                                 f"and none is named {' or '.join(_INPUT_KEYS[:3])}; keep only the model's input or "
                                 "name it 'x'")
            obj = arrays[key]
    if isinstance(obj, np.ndarray):
        if obj.dtype == object or obj.dtype.kind not in "biuf":
            raise InputError(f"--data {path} holds a {obj.dtype} array; save numeric samples")
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if not isinstance(obj, torch.Tensor):
        raise InputError(f"--data {path} holds a {type(obj).__name__}, not a tensor; save only the model's input "
                         f"with {how}")
    if obj.dim() < 1 or obj.shape[0] == 0:
        raise InputError(f"--data {path} holds a tensor of shape {tuple(obj.shape)}: no samples along dim 0; "
                         "save a tensor whose dim 0 indexes the samples")
    return obj


def _first_layer(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)):
            return m
    return None


def _fit_dtype(data: torch.Tensor, path: Path, model: nn.Module) -> torch.Tensor:
    dtype, _ = model_dtype_device(model)
    if data.is_floating_point():
        return data.to(dtype)
    first = _first_layer(model)
    if data.dtype == torch.bool or not isinstance(first, nn.Embedding):
        raise InputError(f"--data {path} holds {str(data.dtype).replace('torch.', '')} values but the model's first "
                         f"layer is {type(first).__name__ if first is not None else 'not an Embedding'}: convert the "
                         "data to float (scaled and normalized as in training) before saving")
    return data


def _floats(text: str | None, flag: str, channels: int) -> torch.Tensor | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a list of numbers; write it like 0.485,0.456,0.406") from None
    if len(values) not in (1, channels):
        raise UsageError(f"{flag} {text!r} has {len(values)} values; the model takes {channels} channel(s): give 1 "
                         f"or {channels}")
    if flag == "--std" and any(v <= 0 for v in values):
        raise UsageError(f"--std {text!r} must be positive")
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


def _parse_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) not in (1, 2) or any(s <= 0 for s in size):
        raise UsageError(f"--image-size {text!r} must be one or two positive integers, like 224 or 224,320")
    return (size[0], size[-1])


class _ImageBatches:
    """Batches of images read lazily from disk: ``(N, C, H, W)`` tensors in the model's dtype."""

    def __init__(self, files: list[Path], *, mode: str, size: tuple[int, int], mean: torch.Tensor | None,
                 std: torch.Tensor | None, batch_size: int, dtype: torch.dtype) -> None:
        self.files, self.mode, self.size = files, mode, size
        self.mean, self.std, self.batch_size, self.dtype = mean, std, batch_size, dtype

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(0, len(self.files), self.batch_size):
            yield torch.stack([self._read(f) for f in self.files[i:i + self.batch_size]])

    def _read(self, f: Path) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(f) as im:
                im = im.convert(self.mode)
                if im.size != (self.size[1], self.size[0]):
                    im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except Exception as exc:
            raise InputError(f"--data {f} is not a readable image ({type(exc).__name__}: {exc}); remove or replace "
                             "it") from exc
        t = torch.from_numpy(a.reshape(a.shape[0], a.shape[1], -1)).permute(2, 0, 1)
        if self.mean is not None:
            t = t - self.mean
        if self.std is not None:
            t = t / self.std
        return t.to(self.dtype)


def _image_batches(folder: Path, *, model: nn.Module, image_size: str | None, mean: str | None, std: str | None,
                   batch_size: int, seed: int) -> tuple[_ImageBatches, str]:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise InputError(f"--data {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images "
                         "or a tensor file (.pt, .npy, .npz)")
    first = _first_layer(model)
    if not isinstance(first, nn.modules.conv._ConvNd) or len(first.kernel_size) != 2:
        raise InputError(f"--data {folder} is a folder of images but the model's first layer is "
                         f"{type(first).__name__ if first is not None else 'not a layer normfold knows'}, not a "
                         "Conv2d: pass a tensor file of the model's inputs instead")
    channels = first.in_channels
    if channels not in _MODES:
        raise InputError(f"the model's first layer takes {channels} channels; images have 1, 3 or 4: pass a tensor "
                         "file of the model's inputs instead")
    size = _parse_size(image_size)
    sizes: dict[tuple[int, int], Path] = {}
    for f in files:  # headers only: a bad file is found before a long run, not in the middle of it
        try:
            with Image.open(f) as im:
                sizes.setdefault((im.size[1], im.size[0]), f)
        except Exception as exc:
            raise InputError(f"--data {f} is not a readable image ({type(exc).__name__}); remove or replace it") from exc
    if size is None:
        if len(sizes) > 1:
            shown = ", ".join(f"{p.name}: {h}x{w}" for (h, w), p in list(sizes.items())[:3])
            raise InputError(f"--data {folder}: the images have different sizes ({shown}); pass --image-size H[,W]")
        size = next(iter(sizes))
    dtype, _ = model_dtype_device(model)
    files = [files[i] for i in visiting_order(len(files), seed).tolist()]
    batches = _ImageBatches(files, mode=_MODES[channels], size=size, mean=_floats(mean, "--mean", channels),
                            std=_floats(std, "--std", channels), batch_size=batch_size, dtype=dtype)
    return batches, f"{len(files)} image(s) in {folder}, read as {_MODES[channels]} {size[0]}x{size[1]}"
