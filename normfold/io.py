"""Load and save model files, safely.

Loading rules (DESIGN.md, "Model files"):

* ``.pt`` / ``.pth`` are read with ``torch.load(weights_only=True)``. A file
  that holds a pickled ``nn.Module`` needs ``trust=True`` (``--trust``):
  unpickling runs code from the file.
* A state_dict needs ``arch="pkg.module:factory"``: a callable that builds the
  model, whose ``load_state_dict(strict=True)`` must accept the file.
* ``.pt2`` is a torch.export ExportedProgram.

Saving rules: outputs never overwrite the input and are written to a
temporary file in the destination folder, then renamed (atomic on POSIX), so
a crash never leaves a half-written model. Output paths default to
``<stem>.<step><suffix>`` beside the input.
"""

from __future__ import annotations

import importlib
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from normfold.errors import ModelLoadError, UsageError

__all__ = ["LoadedModel", "load_model", "save_model", "default_output_path", "import_factory", "check_output_path"]

_MODEL_SUFFIXES = {".pt", ".pth", ".pt2", ".bin", ".ckpt"}


@dataclass
class LoadedModel:
    """A model read from disk and how it was stored.

    ``kind`` is ``"module"`` (a pickled nn.Module), ``"state_dict"`` (built with
    ``arch``) or ``"exported"`` (an ExportedProgram; ``module`` is then its
    ``.module()`` and ``program`` the ExportedProgram).
    """

    module: nn.Module
    path: Path
    kind: str
    arch: str | None = None
    program: Any = None


def import_factory(spec: str) -> Callable[[], Any]:
    """Resolve ``"pkg.module:factory"`` to the callable, or a ModelLoadError that says what is wrong."""
    if ":" not in spec:
        raise UsageError(f"--arch {spec!r} must look like pkg.module:factory (for example torchvision.models:resnet18)")
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:
        raise ModelLoadError(f"--arch {spec!r}: cannot import {mod_name!r} ({type(exc).__name__}: {exc}); "
                             "check the module name and that it is installed") from exc
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"--arch {spec!r}: module {mod_name!r} has no attribute {attr!r}; check the factory name")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"--arch {spec!r}: {attr!r} is not callable; name a function or class that builds the model")
    return obj


def build_arch(spec: str) -> nn.Module:
    """Call the ``--arch`` factory with no arguments and check it returns an nn.Module."""
    factory = import_factory(spec)
    try:
        model = factory()
    except Exception as exc:
        raise ModelLoadError(f"--arch {spec!r}: calling it raised {type(exc).__name__}: {exc}; "
                             "name a factory that builds the model with no arguments") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--arch {spec!r} returned {type(model).__name__}, not a torch.nn.Module; "
                             "name a factory that returns the model")
    return model


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model_state_dict", "model", "weights"):
            inner = obj.get(key)
            if isinstance(inner, dict):
                found = _extract_state_dict(inner)
                if found is not None:
                    return found
    return None


def load_model(path: str | os.PathLike, *, trust: bool = False, arch: str | None = None) -> LoadedModel:
    """Read a model file following the module docstring's rules."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise ModelLoadError(f"{p} is a directory; pass a model file (.pt, .pth or .pt2)")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p} is empty; re-save the model with torch.save")
    if p.suffix == ".pt2":
        return _load_exported(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # A pickled object is refused by the weights-only unpickler with "Unsupported global";
        # any other unpickling error means the bytes themselves are damaged.
        if "Unsupported global" in text or "can still be loaded" in text:
            if not trust:
                raise ModelLoadError(
                    f"{p} holds a pickled Python object (a whole nn.Module); unpickling it runs code from the file: "
                    "pass --trust if you trust its source, or save model.state_dict() and pass --arch pkg.module:factory"
                ) from exc
            obj = _load_trusted(p)
        else:
            raise _corrupt(p, exc) from exc
    except Exception as exc:  # torch.load raises many types on damaged bytes (IndexError on text, RuntimeError on bad zips...)
        raise _corrupt(p, exc) from exc
    if isinstance(obj, torch.jit.ScriptModule):
        raise ModelLoadError(f"{p} is TorchScript; normfold rewrites nn.Modules: save the eager model or its state_dict")
    if isinstance(obj, nn.Module):
        return LoadedModel(module=obj, path=p, kind="module", arch=arch)
    state = _extract_state_dict(obj)
    if state is None:
        raise ModelLoadError(f"{p} holds a {type(obj).__name__}, not a model or a state_dict; "
                             "save the model with torch.save(model.state_dict(), path)")
    if arch is None:
        raise ModelLoadError(f"{p} holds a state_dict ({len(state)} tensors) without the model's code; "
                             "pass --arch pkg.module:factory naming a function that builds the model")
    model = build_arch(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else str(exc)
        raise ModelLoadError(f"{p} does not fit --arch {arch}: {detail[:300]}; pass the factory the weights came from") from exc
    return LoadedModel(module=model, path=p, kind="state_dict", arch=arch)


def _load_trusted(p: Path) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ModelLoadError(f"{p} pickles a class that cannot be imported here ({exc}); install or put on PYTHONPATH "
                             "the code that defined the model") from exc
    except Exception as exc:
        raise _corrupt(p, exc) from exc


def _load_exported(p: Path) -> LoadedModel:
    try:
        ep = torch.export.load(p)
    except Exception as exc:
        raise ModelLoadError(f"{p} is not a readable torch.export ExportedProgram ({type(exc).__name__}); "
                             "re-save it with torch.export.save") from exc
    return LoadedModel(module=ep.module(), path=p, kind="exported", program=ep)


def _corrupt(p: Path, exc: BaseException) -> ModelLoadError:
    head = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    return ModelLoadError(f"{p} is not a readable PyTorch file (truncated, corrupt or not a model: {head}); "
                          "re-save it with torch.save")


def default_output_path(input_path: str | os.PathLike, step: str, suffix: str | None = None) -> Path:
    """``model.pt`` + ``"folded"`` -> ``model.folded.pt`` beside the input."""
    p = Path(input_path)
    return p.with_name(f"{p.stem}.{step}{suffix if suffix is not None else p.suffix}")


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None) -> Path:
    """Refuse to write over the input or into a folder that does not exist."""
    out = Path(output)
    if input_path is not None and out.exists() and Path(input_path).exists() and out.resolve() == Path(input_path).resolve():
        raise UsageError(f"refusing to overwrite the input {input_path}; pass another -o path")
    if out.is_dir():
        raise UsageError(f"-o {out} is a directory; pass a file path")
    if not out.parent.exists():
        raise UsageError(f"-o {out}: folder {out.parent} does not exist; create it or pass another path")
    return out


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it into place."""
    # keep the real suffix last: torch.export.save warns about a .pt2 archive named otherwise
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_model(module: nn.Module, path: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
               program: Any = None) -> Path:
    """Write ``module`` (or an ExportedProgram) atomically, never over ``input_path``.

    nn.Modules are written whole (``torch.save(module)``): a rewritten model no
    longer fits its original factory, so a state_dict alone could not be
    loaded again. Reading it back needs ``weights_only=False`` (``--trust``).
    """
    out = check_output_path(path, input_path)
    if program is not None:
        atomic_write(out, lambda tmp: torch.export.save(program, tmp))
    else:
        atomic_write(out, lambda tmp: torch.save(module, tmp))
    return out
