"""Data for calibration and recalibration, read from files: tensor files, .npz archives, folders of images.

Used by :func:`normfold.recalibrate` through ``normfold recalibrate --data``
and by ``normfold convert --to groupnorm --calibration-data``; reachable from
Python as :func:`load_data`. Samples are visited in a seeded random order
(:func:`visiting_order`), so that every batch mixes the data even when it is
sorted (a folder of class subfolders) and a prefix of the batches is a
representative subset. Nothing is read into memory whole: tensor batches are
gathered lazily, images are read per batch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from normfold.errors import InputError, UsageError
from normfold.inputs import model_dtype_device
from normfold.recalibrate import DEFAULT_BATCH_SIZE

__all__ = ["load_data", "read_tensor_file", "visiting_order", "IMAGE_SUFFIXES", "TENSOR_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".npz")
#: names under which a .npz or a dict in a .pt file holds the model's input, in order of preference
_INPUT_KEYS = ("x", "inputs", "input", "data", "images", "X")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


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


def load_data(path: str | Path, *, model: nn.Module, image_size: str | None = None, mean: str | None = None,
              std: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
              flag: str = "--data") -> tuple[Any, str]:
    """The data at ``path`` as a sized iterable of batches in :func:`visiting_order`, and a description.

    ``path`` is a tensor file (.pt/.pth read with ``torch.load(weights_only=True)``,
    .npy, .npz; dim 0 indexes samples; a file holding several arrays names the
    input ``x``) or a folder of images (read with Pillow, resized to
    ``image_size`` and normalized with ``mean``/``std`` after scaling to
    [0, 1]). Batches come in the seeded order of :func:`visiting_order`, in the
    model's dtype. Errors name ``flag``, the option the path came from.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{flag} {path}: no such file or folder; check the path")
    if path.is_dir():
        return _image_batches(path, model=model, image_size=image_size, mean=mean, std=std, batch_size=batch_size,
                              seed=seed, flag=flag)
    given = [f for f, v in (("--image-size", image_size), ("--mean", mean), ("--std", std)) if v is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to a folder of images; "
                         f"a tensor file is used as it is: drop {'it' if len(given) == 1 else 'them'}, or save the "
                         "data already resized and normalized")
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        raise UsageError(f"{flag} {path}: unknown kind of file ({suffix or 'no suffix'}); pass a tensor file "
                         f"({', '.join(TENSOR_SUFFIXES)}) or a folder of images")
    if path.stat().st_size == 0:
        raise InputError(f"{flag} {path} is empty; save the data with torch.save(tensor, path) or numpy.save")
    array = _read_tensor_file(path, suffix, flag)
    data = _TensorBatches(_fit_dtype(array, path, model, flag), visiting_order(len(array), seed), batch_size)
    return data, f"{path.name}: {tuple(array.shape)} {str(array.dtype).replace('torch.', '')}"


def _save_hint(suffix: str) -> str:
    return "torch.save(tensor, path)" if suffix in (".pt", ".pth") else "numpy.save(path, array)"


def read_tensor_file(path: Path, *, flag: str, what: str = "tensor file") -> Any:
    """What a tensor file holds, read without running code from it: the one reader of users' tensor files.

    ``.pt``/``.pth``: ``torch.load(weights_only=True)`` (a tensor, or lists, tuples and dicts of them);
    ``.npy``: one array; ``.npz``: a dict ``name -> array`` in the order saved (numpy, ``allow_pickle=False``).
    What the contents mean is the caller's: ``recalibrate --data`` and ``convert --calibration-data`` take
    one array of samples (:func:`load_data`), ``check --inputs`` one model input per array
    (:func:`normfold.check.inputs.load_inputs`). A file that cannot be read so (pickled objects, truncation,
    garbage) is an :class:`~normfold.errors.InputError` naming ``flag`` and calling the file a ``what``.
    """
    suffix = path.suffix.lower()
    how = _save_hint(suffix)
    try:
        if suffix in (".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=True)
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:  # pickled objects, truncation, garbage: all mean "not a tensor file"
        head = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"{flag} {path} is not a readable {what} ({type(exc).__name__}: {head}); "
                         f"save the data with {how}") from exc


def _read_tensor_file(path: Path, suffix: str, flag: str) -> torch.Tensor:
    how = _save_hint(suffix)
    obj = read_tensor_file(path, flag=flag)
    if isinstance(obj, dict):
        arrays = {k: v for k, v in obj.items() if isinstance(v, (torch.Tensor, np.ndarray))}
        if len(arrays) == 1:
            obj = next(iter(arrays.values()))
        else:
            key = next((k for k in _INPUT_KEYS if k in arrays), None)
            if key is None:
                raise InputError(f"{flag} {path} holds {len(arrays)} arrays ({', '.join(map(str, list(arrays)[:6]))}) "
                                 f"and none is named {' or '.join(_INPUT_KEYS[:3])}; keep only the model's input or "
                                 "name it 'x'")
            obj = arrays[key]
    if isinstance(obj, np.ndarray):
        if obj.dtype == object or obj.dtype.kind not in "biuf":
            raise InputError(f"{flag} {path} holds a {obj.dtype} array; save numeric samples")
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    if not isinstance(obj, torch.Tensor):
        raise InputError(f"{flag} {path} holds a {type(obj).__name__}, not a tensor; save only the model's input "
                         f"with {how}")
    if obj.dim() < 1 or obj.shape[0] == 0:
        raise InputError(f"{flag} {path} holds a tensor of shape {tuple(obj.shape)}: no samples along dim 0; "
                         "save a tensor whose dim 0 indexes the samples")
    return obj


def _first_layer(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)):
            return m
    return None


def _fit_dtype(data: torch.Tensor, path: Path, model: nn.Module, flag: str) -> torch.Tensor:
    dtype, _ = model_dtype_device(model)
    if data.is_floating_point():
        return data.to(dtype)
    first = _first_layer(model)
    if data.dtype == torch.bool or not isinstance(first, nn.Embedding):
        raise InputError(f"{flag} {path} holds {str(data.dtype).replace('torch.', '')} values but the model's first "
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
                 std: torch.Tensor | None, batch_size: int, dtype: torch.dtype, flag: str = "--data") -> None:
        self.files, self.mode, self.size, self.flag = files, mode, size, flag
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
            raise InputError(f"{self.flag} {f} is not a readable image ({type(exc).__name__}: {exc}); remove or replace "
                             "it") from exc
        t = torch.from_numpy(a.reshape(a.shape[0], a.shape[1], -1)).permute(2, 0, 1)
        if self.mean is not None:
            t = t - self.mean
        if self.std is not None:
            t = t / self.std
        return t.to(self.dtype)


def _image_batches(folder: Path, *, model: nn.Module, image_size: str | None, mean: str | None, std: str | None,
                   batch_size: int, seed: int, flag: str) -> tuple[_ImageBatches, str]:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise InputError(f"{flag} {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of images "
                         "or a tensor file (.pt, .npy, .npz)")
    first = _first_layer(model)
    if not isinstance(first, nn.modules.conv._ConvNd) or len(first.kernel_size) != 2:
        raise InputError(f"{flag} {folder} is a folder of images but the model's first layer is "
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
            raise InputError(f"{flag} {f} is not a readable image ({type(exc).__name__}); remove or replace it") from exc
    if size is None:
        if len(sizes) > 1:
            shown = ", ".join(f"{p.name}: {h}x{w}" for (h, w), p in list(sizes.items())[:3])
            raise InputError(f"{flag} {folder}: the images have different sizes ({shown}); pass --image-size H[,W]")
        size = next(iter(sizes))
    dtype, _ = model_dtype_device(model)
    files = [files[i] for i in visiting_order(len(files), seed).tolist()]
    batches = _ImageBatches(files, mode=_MODES[channels], size=size, mean=_floats(mean, "--mean", channels),
                            std=_floats(std, "--std", channels), batch_size=batch_size, dtype=dtype, flag=flag)
    return batches, f"{len(files)} image(s) in {folder}, read as {_MODES[channels]} {size[0]}x{size[1]}"
