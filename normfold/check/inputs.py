"""Real inputs for the checker, read from a file: ``.pt``/``.pth``, ``.npy`` or ``.npz``.

* ``.pt``/``.pth`` (``torch.load(weights_only=True)``): a tensor, a list or
  tuple of tensors (positional inputs), or a dict of tensors (positional, in
  the dict's order).
* ``.npy``: one array.
* ``.npz``: every array, in the order they were saved.

The first dimension of each input is its batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from normfold.data import read_tensor_file
from normfold.errors import InputError, UsageError

__all__ = ["load_inputs", "INPUT_SUFFIXES"]

INPUT_SUFFIXES = (".pt", ".pth", ".npy", ".npz")


def _as_tensor(x: object, what: str, path: Path) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise InputError(f"{path}: {what} is an object array; save numeric arrays")
        try:
            return torch.from_numpy(np.ascontiguousarray(x))
        except TypeError:  # strings, records: numpy arrays torch has no dtype for
            raise InputError(f"{path}: {what} is a {x.dtype} array; save numeric arrays") from None
    raise InputError(f"{path}: {what} is a {type(x).__name__}, not a tensor; save tensors (or a tuple of them)")


def load_inputs(path: str | os.PathLike) -> tuple[torch.Tensor, ...]:
    """Read positional model inputs from ``path`` (see the module docstring).

    The file is read by :func:`normfold.data.read_tensor_file`, the reader ``recalibrate --data`` uses
    too; here every array it holds is one model input.
    """
    p = Path(path)
    if p.suffix not in INPUT_SUFFIXES:
        raise UsageError(f"--inputs {p}: use a .pt, .pth, .npy or .npz file")
    if not p.exists():
        raise InputError(f"--inputs {p}: no such file; check the path")
    obj = read_tensor_file(p, flag="--inputs", what="input file")
    if p.suffix == ".npy":
        return (_as_tensor(obj, "the array", p),)
    if p.suffix == ".npz":
        if not obj:
            raise InputError(f"{p} holds no arrays")
        return tuple(_as_tensor(v, f"array {k!r}", p) for k, v in obj.items())
    if isinstance(obj, torch.Tensor):
        return (obj,)
    if isinstance(obj, (list, tuple)) and obj:
        return tuple(_as_tensor(x, f"item {i}", p) for i, x in enumerate(obj))
    if isinstance(obj, dict) and obj:
        return tuple(_as_tensor(v, f"entry {k!r}", p) for k, v in obj.items())
    raise InputError(f"{p} holds a {type(obj).__name__}; save a tensor, a tuple of tensors or a dict of tensors")
