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

from normfold.errors import InputError, UsageError

__all__ = ["load_inputs", "INPUT_SUFFIXES"]

INPUT_SUFFIXES = (".pt", ".pth", ".npy", ".npz")


def _as_tensor(x: object, what: str, path: Path) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise InputError(f"{path}: {what} is an object array; save numeric arrays")
        return torch.from_numpy(np.ascontiguousarray(x))
    raise InputError(f"{path}: {what} is a {type(x).__name__}, not a tensor; save tensors (or a tuple of them)")


def load_inputs(path: str | os.PathLike) -> tuple[torch.Tensor, ...]:
    """Read positional model inputs from ``path`` (see the module docstring)."""
    p = Path(path)
    if p.suffix not in INPUT_SUFFIXES:
        raise UsageError(f"--inputs {p}: use a .pt, .pth, .npy or .npz file")
    if not p.exists():
        raise InputError(f"--inputs {p}: no such file; check the path")
    try:
        if p.suffix == ".npy":
            return (_as_tensor(np.load(p, allow_pickle=False), "the array", p),)
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if not z.files:
                    raise InputError(f"{p} holds no arrays")
                return tuple(_as_tensor(z[k], f"array {k!r}", p) for k in z.files)
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as exc:  # torch.load and numpy raise many kinds on a damaged file (struct.error, ...)
        head = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(f"{p} is not a readable input file ({head}); save it with torch.save or numpy.save") from exc
    if isinstance(obj, torch.Tensor):
        return (obj,)
    if isinstance(obj, (list, tuple)) and obj:
        return tuple(_as_tensor(x, f"item {i}", p) for i, x in enumerate(obj))
    if isinstance(obj, dict) and obj:
        return tuple(_as_tensor(v, f"entry {k!r}", p) for k, v in obj.items())
    raise InputError(f"{p} holds a {type(obj).__name__}; save a tensor, a tuple of tensors or a dict of tensors")
