"""Load and save model files, safely: the library's one entry for files.

Loading rules (docs/architecture.md, "Model files"):

* ``.pt`` / ``.pth`` / ``.bin`` are read with ``torch.load(weights_only=True)``.
  A file that holds a pickled ``nn.Module`` needs ``trust=True`` (``--trust``):
  unpickling runs code from the file. A TorchScript archive is refused.
* ``.safetensors`` holds tensors only (never code).
* A state_dict (``.pt`` or ``.safetensors``) needs ``arch``, which names how to
  build the model (see :func:`parse_arch`): ``pkg.module:factory``,
  ``pkg.module:factory(num_classes=10)`` (keyword values are Python literals,
  read with ``ast.literal_eval``: no code is evaluated), ``timm:NAME`` (a timm
  registry name, built with ``pretrained=False``) or ``./file.py:factory``
  (a factory in a local file). Its ``load_state_dict(strict=True)`` must
  accept the file.
* A Hugging Face ``save_pretrained`` directory (``config.json`` and
  ``model.safetensors`` or ``pytorch_model.bin``) is built with the class the
  config's ``architectures`` names, looked up on the ``transformers``
  package, from the local files only (``local_files_only=True``, and
  ``HF_HUB_OFFLINE=1`` while the folder is read, the caller's value restored
  afterwards): never the network.
* ``.pt2`` is a torch.export ExportedProgram.
* A file normfold wrote carries a *recipe* (:mod:`normfold.recipe`): the
  model is built from its factory or Hugging Face class, the recipe's
  structural edits are replayed and the weights loaded strictly.

The loaded weights keep their dtype (an fp16 file gives an fp16 model).

Saving rules: outputs never overwrite the input and are written to a
temporary file (or folder) beside the destination, then renamed (atomic on
POSIX), so a crash never leaves a half-written model; they get the usual
permissions (``0o666 & ~umask``). What is written follows the output path:

* ``.safetensors``: the weights and the recipe (safetensors metadata);
* ``.pt`` / ``.pth``: the weights and the recipe as a dict that
  ``torch.load(weights_only=True)`` reads;
* a folder, when the input was a Hugging Face folder: its files, with the
  weights as ``model.safetensors`` carrying the recipe;
* ``.pt2``: an ExportedProgram (re-exported with the example inputs for an
  nn.Module);
* a pickled whole module only with ``pickle=True`` (``--pickle``), or when
  the input was a pickled module given without ``arch`` (nothing else could
  rebuild it).

Default output paths are ``<stem>.<step>.safetensors`` beside a state_dict
input, ``<stem>.<step>.pt2`` beside a ``.pt2``, ``<dir>.<step>`` beside a
Hugging Face folder and ``<stem>.<step>.pt`` beside a pickled module.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import pickle as pickle_module
import shutil
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from normfold import recipe as recipes
from normfold.errors import ModelLoadError, UsageError

__all__ = ["LoadedModel", "ArchSpec", "load", "load_model", "save_model", "default_output_path", "import_factory",
           "parse_arch", "build_arch", "check_output_path", "atomic_write"]

_MODEL_SUFFIXES = {".pt", ".pth", ".pt2", ".bin", ".ckpt", ".safetensors"}
_RECIPE_KEY = "normfold_recipe"
_ALIASES_KEY = "normfold_aliases"
_EXTRA_PREFIX = "__normfold_buffer__."  # non-persistent buffers of rebuilt modules travel under this prefix
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".index.json")


@dataclass
class LoadedModel:
    """A model read from disk and how it was stored.

    ``kind`` is ``"module"`` (a pickled nn.Module), ``"state_dict"`` (built with
    ``arch``, from a .pt/.pth or .safetensors file), ``"hf"`` (a Hugging Face
    folder; ``hf_class`` names the transformers class) or ``"exported"`` (an
    ExportedProgram; ``module`` is then its ``.module()`` and ``program`` the
    ExportedProgram). ``recipe`` is True when the file carried normfold's
    structural edits.
    """

    module: nn.Module
    path: Path
    kind: str
    arch: str | None = None
    program: Any = None
    hf_class: str | None = None
    recipe: bool = False


# ---------------------------------------------------------------------------------------------------- --arch


@dataclass
class ArchSpec:
    """A parsed ``--arch``: where the factory lives and the literal arguments to call it with."""

    text: str
    source: str  # "module" (importable), "file" (a local .py file) or "timm" (registry name)
    module: str
    attr: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None


def parse_arch(spec: str) -> ArchSpec:
    """Parse ``pkg.module:factory``, ``pkg.module:factory(k=v, ...)``, ``timm:NAME[(k=v)]`` or ``./file.py:factory``.

    Arguments must be Python literals (numbers, strings, tuples, lists,
    dicts, True/False/None): each is read with ``ast.literal_eval``, so no
    code from the command line is evaluated.
    """
    text = spec.strip()
    head, sep, call = text.partition("(")
    if ":" not in head:
        raise UsageError(f"--arch {spec!r} must look like pkg.module:factory (for example torchvision.models:resnet18, "
                         "timm:resnet18d or ./my_models.py:build)")
    mod_name, _, attr = head.rpartition(":")
    mod_name, attr = mod_name.strip(), attr.strip()
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if sep:
        try:
            node = ast.parse(f"f({call}", mode="eval").body
        except SyntaxError as exc:
            raise UsageError(f"--arch {spec!r}: cannot parse the arguments ({exc.msg}); write them like "
                             "factory(num_classes=10)") from exc
        assert isinstance(node, ast.Call)
        try:
            args = tuple(ast.literal_eval(a) for a in node.args)
            for kw in node.keywords:
                if kw.arg is None:
                    raise ValueError("**kwargs")
                kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError as exc:
            raise UsageError(f"--arch {spec!r}: arguments must be literals (numbers, strings, tuples, lists, dicts, "
                             "True/False/None), not expressions") from exc
    if not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise UsageError(f"--arch {spec!r}: {attr!r} is not a factory name; write pkg.module:factory")
    if mod_name == "timm":
        return ArchSpec(text, "timm", "timm", attr, args, kwargs)
    if mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name:
        return ArchSpec(text, "file", mod_name, attr, args, kwargs)
    return ArchSpec(text, "module", mod_name, attr, args, kwargs)


def _file_module_name(path: Path) -> str:
    """A module name for a factory file that is the same in every process (recipes record class names by it)."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    return f"normfold_arch_{path.stem if path.stem.isidentifier() else 'file'}_{digest}"


def arch_module(spec: str | ArchSpec) -> str:
    """The module an ``--arch`` factory lives in: its classes may be rebuilt from a recipe."""
    a = parse_arch(spec) if isinstance(spec, str) else spec
    if a.source == "file":
        path = Path(a.module)
        return _file_module_name(path if path.suffix == ".py" else path.with_suffix(".py"))
    return a.module


def _import_file(spec: ArchSpec) -> Any:
    path = Path(spec.module)
    if path.suffix != ".py":
        path = path.with_suffix(".py")
    if not path.is_file():
        raise ModelLoadError(f"--arch {spec.text!r}: no file {path}; check the path of the .py file")
    name = _file_module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    mspec = importlib.util.spec_from_file_location(name, path)
    if mspec is None or mspec.loader is None:
        raise ModelLoadError(f"--arch {spec.text!r}: cannot import {path}")
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[name] = mod
    try:
        mspec.loader.exec_module(mod)
    except Exception as exc:
        del sys.modules[name]
        raise ModelLoadError(f"--arch {spec.text!r}: importing {path} raised {type(exc).__name__}: {exc}") from exc
    return mod


def import_factory(spec: str | ArchSpec) -> Callable[..., Any]:
    """Resolve an ``--arch`` to the callable, or a ModelLoadError that says what is wrong."""
    a = parse_arch(spec) if isinstance(spec, str) else spec
    if a.source == "timm":
        try:
            import timm
        except ImportError as exc:
            raise ModelLoadError(f"--arch {a.text!r}: timm is not installed; pip install timm") from exc
        if not timm.is_model(a.attr):
            raise ModelLoadError(f"--arch {a.text!r}: timm has no model {a.attr!r}; list them with "
                                 "timm.list_models('pattern*')")
        return lambda *args, **kwargs: timm.create_model(a.attr, *args, pretrained=False, **kwargs)
    if a.source == "file":
        mod = _import_file(a)
    else:
        try:
            mod = importlib.import_module(a.module)
        except ModuleNotFoundError as exc:
            local = Path(*a.module.split(".")).with_suffix(".py")
            hint = (f"; {local} is here but not importable: run with PYTHONPATH=. or give the file path "
                    f"(--arch ./{local}:{a.attr})" if local.is_file() else
                    "; check the module name and that it is installed (for a local file: run with PYTHONPATH=. "
                    "or give the file path, --arch ./my_models.py:build)")
            raise ModelLoadError(f"--arch {a.text!r}: cannot import {a.module!r} ({exc}){hint}") from exc
        except Exception as exc:
            raise ModelLoadError(f"--arch {a.text!r}: cannot import {a.module!r} ({type(exc).__name__}: {exc}); "
                                 "check the module name and that it is installed") from exc
    obj: Any = mod
    for part in a.attr.split("."):
        if not hasattr(obj, part):
            hint = ""
            if a.module == "timm" or a.module.startswith("timm."):
                hint = f"; for a timm registry name use --arch timm:{a.attr}"
            raise ModelLoadError(f"--arch {a.text!r}: module {a.module!r} has no attribute {a.attr!r}; "
                                 f"check the factory name{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"--arch {a.text!r}: {a.attr!r} is not callable; name a function or class that builds "
                             "the model")
    return obj


def build_arch(spec: str | ArchSpec, *, device: torch.device | str | None = None) -> nn.Module:
    """Call the ``--arch`` factory with its literal arguments and check it returns an nn.Module."""
    a = parse_arch(spec) if isinstance(spec, str) else spec
    factory = import_factory(a)
    try:
        if device is not None:
            with torch.device(device):
                model = factory(*a.args, **(a.kwargs or {}))
        else:
            model = factory(*a.args, **(a.kwargs or {}))
    except Exception as exc:
        raise ModelLoadError(f"--arch {a.text!r}: calling it raised {type(exc).__name__}: {exc}; "
                             "name a factory that builds the model (arguments as factory(k=v))") from exc
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--arch {a.text!r} returned {type(model).__name__}, not a torch.nn.Module; "
                             "name a factory that returns the model")
    return model


# ---------------------------------------------------------------------------------------------------- loading


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


def _is_torchscript(p: Path) -> bool:
    """A torch.jit.save archive: a zip with ``<name>/constants.pkl`` and ``<name>/code/`` entries."""
    if not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_model(path: str | os.PathLike, *, trust: bool = False, arch: str | None = None) -> LoadedModel:
    """Read a model file or Hugging Face folder following the module docstring's rules."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file; check the path")
    if p.is_dir():
        with _hf_offline():
            return _load_hf_dir(p)
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p} is empty; re-save the model with torch.save")
    if p.suffix == ".pt2":
        return _load_exported(p)
    if p.suffix == ".safetensors":
        state, recipe = _read_safetensors(p)
        return _from_state(p, state, recipe, arch)
    if _is_torchscript(p):
        raise ModelLoadError(f"{p} is TorchScript (torch.jit.save), whose eager modules cannot be recovered; "
                             "normfold rewrites nn.Modules: save the eager model's state_dict (or safetensors) and "
                             "pass --arch")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle_module.UnpicklingError as exc:
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
    recipe = None
    if isinstance(obj, dict) and isinstance(obj.get(_RECIPE_KEY), str):
        recipe = recipes.loads(obj[_RECIPE_KEY])
    state = _extract_state_dict(obj)
    if state is None:
        raise ModelLoadError(f"{p} holds a {type(obj).__name__}, not a model or a state_dict; "
                             "save the model with torch.save(model.state_dict(), path)")
    return _from_state(p, state, recipe, arch)  # as loaded: its ``_metadata`` (module versions) matters


def load(path: str | os.PathLike, *, arch: str | None = None, trust: bool = False) -> nn.Module:
    """The model in ``path``, rebuilt without unpickling (unless ``trust``): safetensors or .pt weights with
    normfold's recorded edits, a Hugging Face folder, or a ``.pt2`` (its ``.module()``).

    ``arch`` names the factory (``pkg.module:factory``, ``timm:NAME``,
    ``./file.py:factory``, with literal keyword arguments) for a file that
    holds weights; a Hugging Face folder names its own class.
    """
    return load_model(path, trust=trust, arch=arch).module


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in memory aligned to 64 bytes, copied only where it is not.

    A tensor read from a safetensors file may start at any byte offset of the file; CPU convolutions pick
    other kernels for unaligned data, so the loaded model would round differently from the one saved
    (measured: 1.2e-4 of the output's scale on timm repvgg_d2se, where the same weights aligned are
    bit-identical).
    """
    return t.clone() if t.numel() and t.data_ptr() % 64 else t


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    try:
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors ships with transformers/timm and is a dependency
        raise ModelLoadError("reading .safetensors needs the safetensors package; pip install safetensors") from exc
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: _aligned(f.get_tensor(k)) for k in f.keys()}
    except Exception as exc:
        head = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ModelLoadError(f"{p} is not a readable safetensors file ({head}); re-save it with "
                             "safetensors.torch.save_file") from exc
    recipe = recipes.loads(meta[_RECIPE_KEY]) if _RECIPE_KEY in meta else None
    if _ALIASES_KEY in meta:
        aliases = json.loads(meta[_ALIASES_KEY])
        for alias, kept in aliases.items():
            if kept not in state:
                raise ModelLoadError(f"{p}: tensor {alias!r} is recorded as a copy of {kept!r}, which is missing; "
                                     "the file is damaged")
            state[alias] = state[kept]
    return state, recipe


_INIT_NAMES = tuple(n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")
                    and callable(getattr(torch.nn.init, n)))
# torch.nn.init's functions are module globals, shared by every thread: the lock guards installing and removing
# normfold's wrappers (two loads saving each other's wrappers as "the originals" would leave init disabled for
# good), and a thread-local depth makes the wrappers skip only in the thread that is loading; any other thread
# building a model meanwhile gets its usual random initialization.
_init_lock = threading.Lock()
_init_users = 0  # open _skip_init blocks, all threads
_init_saved: dict[str, Callable[..., Any]] = {}
_init_wrappers: dict[str, Callable[..., Any]] = {}
_init_local = threading.local()


def _init_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_init_local, "depth", 0):
            return tensor
        return original(tensor, *args, **kwargs)
    return init


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Make torch.nn.init's in-place initializers no-ops, in this thread, while a model is built for a strict load.

    The random initialization of a model whose every parameter and persistent
    buffer is then overwritten is wasted time (1.2 s of resnet50's 1.3 s
    build). This is what transformers' ``no_init_weights`` does too; buffers
    a module computes itself (``arange``, ``inv_freq``) are not touched. The
    wrappers are installed while any thread is inside a block and call the
    original functions in every other thread (see the lock's comment); a
    wrapper left behind by someone else's save/restore only delegates.
    """
    global _init_users
    with _init_lock:
        if _init_users == 0:
            _init_saved.clear()
            _init_wrappers.clear()
            for n in _INIT_NAMES:
                _init_saved[n] = getattr(torch.nn.init, n)
                _init_wrappers[n] = _init_wrapper(_init_saved[n])
                setattr(torch.nn.init, n, _init_wrappers[n])
        _init_users += 1
    depth = getattr(_init_local, "depth", 0)
    _init_local.depth = depth + 1
    try:
        yield
    finally:
        _init_local.depth = depth
        with _init_lock:
            _init_users -= 1
            if _init_users == 0:
                for n, original in _init_saved.items():
                    if getattr(torch.nn.init, n) is _init_wrappers[n]:  # someone else's patch stays theirs
                        setattr(torch.nn.init, n, original)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], p: Path, what: str) -> None:
    """Strict load that keeps the file's dtypes (``assign=True``: an fp16 file gives fp16 parameters)."""
    extra = {k[len(_EXTRA_PREFIX):]: v for k, v in state.items() if k.startswith(_EXTRA_PREFIX)}
    weights = {k: v for k, v in state.items() if not k.startswith(_EXTRA_PREFIX)}
    # torch.save of a state_dict keeps each module's version in ``_metadata``, and modules whose loading
    # depends on it (torchvision's MNASNet refuses a state_dict without its version) need it. A file without
    # one (safetensors, normfold's own output) holds weights of the code that builds the model now: its versions.
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        metadata = getattr(model.state_dict(), "_metadata", None)
    weights = collections.OrderedDict(weights)
    if metadata is not None:
        weights._metadata = metadata  # type: ignore[attr-defined]
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except (RuntimeError, ValueError, KeyError) as exc:  # a module's own _load_from_state_dict may raise any
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else str(exc)
        raise ModelLoadError(f"{p} does not fit {what}: {detail[:300]}; pass the factory the weights came from") from exc
    for name, value in extra.items():
        owner_path, _, buf = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if buf not in owner._buffers:
            raise ModelLoadError(f"{p}: buffer {name!r} has no place in the rebuilt model; the file is damaged")
        owner._buffers[buf] = value


def _from_state(p: Path, state: dict[str, torch.Tensor], recipe: dict[str, Any] | None, arch: str | None) -> LoadedModel:
    if arch is None:
        base = (recipe or {}).get("base", {})
        recorded = base.get("arch")
        hint = f" (normfold recorded --arch {recorded!r} for this file)" if recorded else ""
        if base.get("hf_class"):
            raise ModelLoadError(f"{p} holds the weights of a Hugging Face {base['hf_class']}; load the folder it "
                                 "is in (with its config.json)")
        raise ModelLoadError(f"{p} holds a state_dict ({len(state)} tensors) without the model's code; "
                             f"pass --arch pkg.module:factory naming a function that builds the model{hint}")
    with _skip_init():  # every parameter and persistent buffer is overwritten by the strict load below
        model = build_arch(arch)
    if recipe is not None:
        model = recipes.apply_recipe(model, recipe, factory_module=arch_module(arch))
    _load_into(model, state, p, f"--arch {arch}" + (" with normfold's recorded edits" if recipe else ""))
    return LoadedModel(module=model, path=p, kind="state_dict", arch=arch, recipe=recipe is not None)


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


# ---------------------------------------------------------------------------------------------------- Hugging Face


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_offline_lock = threading.Lock()
_offline_depth = 0  # how many _hf_offline blocks are open, in any thread
_offline_saved: dict[str, Any] = {}  # what the outermost block restores


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Hugging Face offline mode while a folder is read; the caller's settings are restored afterwards.

    ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` are set for the
    duration, each restored to its previous value (or removed) on exit.
    huggingface_hub reads them once, when it is imported, into
    ``huggingface_hub.constants.HF_HUB_OFFLINE``: that flag is set to True for
    the duration too, and on exit gets back its previous value, or (when the
    block imported huggingface_hub) the value the restored environment gives.
    ``local_files_only=True`` on every call is the first guard; this one keeps
    any other code path of transformers off the network. The environment is
    process-wide: nested or concurrent blocks share one count under a lock,
    and only the last to leave restores it.
    """
    global _offline_depth
    with _offline_lock:
        if _offline_depth == 0:
            hub = sys.modules.get("huggingface_hub.constants")
            _offline_saved.clear()
            _offline_saved.update({k: os.environ.get(k) for k in _OFFLINE_VARS})
            _offline_saved["hub"] = hub.HF_HUB_OFFLINE if hub is not None else None
            for k in _OFFLINE_VARS:
                os.environ[k] = "1"
            if hub is not None:
                hub.HF_HUB_OFFLINE = True
        _offline_depth += 1
    try:
        yield
    finally:
        with _offline_lock:
            _offline_depth -= 1
            if _offline_depth == 0:
                for k in _OFFLINE_VARS:
                    if _offline_saved[k] is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = _offline_saved[k]
                hub = sys.modules.get("huggingface_hub.constants")
                if hub is not None:
                    before = _offline_saved["hub"]
                    if before is None:  # imported inside the block: what importing it now would read
                        env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
                        before = (env or "").upper() in {"1", "ON", "YES", "TRUE"}
                    hub.HF_HUB_OFFLINE = before


def _transformers() -> Any:
    """``import transformers`` (inside :func:`_hf_offline`), with huggingface_hub in offline mode."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError("a Hugging Face folder needs the transformers package; pip install transformers") from exc
    return transformers


def _hf_class(p: Path) -> tuple[Any, str, Any]:
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{p} is a directory without config.json; pass a model file (.pt, .pth, .safetensors, "
                             ".pt2) or a Hugging Face save_pretrained folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{cfg_file} is not valid JSON ({exc}); re-save the model with save_pretrained") from exc
    transformers = _transformers()
    names = cfg.get("architectures") or []
    if not names:
        raise ModelLoadError(f"{cfg_file} names no architectures; re-save the model with save_pretrained (it records "
                             "the class)")
    name = str(names[0])
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelLoadError(f"{cfg_file}: architectures names {name!r}, which is not a transformers model class in "
                             f"transformers {transformers.__version__}; upgrade transformers or re-save the model")
    return cls, name, transformers


def _load_hf_dir(p: Path) -> LoadedModel:
    cls, name, transformers = _hf_class(p)
    weights = p / "model.safetensors"
    recipe = None
    if weights.is_file():
        state, recipe = _read_safetensors(weights)
    if recipe is not None:
        with _skip_init():  # the strict load overwrites every weight
            model = _hf_base(p, cls, transformers, device=None)
        model = recipes.apply_recipe(model, recipe)
        _load_into(model, state, weights, f"{name} with normfold's recorded edits")
        return LoadedModel(module=model, path=p, kind="hf", hf_class=name, recipe=True)
    if not weights.is_file() and not (p / "pytorch_model.bin").is_file() and not any(p.glob("*.index.json")):
        raise ModelLoadError(f"{p} holds config.json but no weights (model.safetensors or pytorch_model.bin); "
                             "re-save the model with save_pretrained")
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype": "auto"} if major >= 5 else {"torch_dtype": "auto"}
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # library code prints nothing, transformers' bars included
    try:
        model = cls.from_pretrained(str(p), local_files_only=True, **dtype_kw)
    except Exception as exc:
        head = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"{p}: {name}.from_pretrained failed ({type(exc).__name__}: {head}); check that the "
                             "folder is complete") from exc
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return LoadedModel(module=model, path=p, kind="hf", hf_class=name)


def _hf_base(p: Path, cls: Any, transformers: Any, *, device: str | None) -> nn.Module:
    """A fresh ``cls(config)`` from the folder's config.json (random weights: the recipe and the file fill them)."""
    config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    if device is not None:
        with torch.device(device):
            return cls(config)
    return cls(config)


# ---------------------------------------------------------------------------------------------------- saving


def default_output_path(source: str | os.PathLike | LoadedModel, step: str, suffix: str | None = None, *,
                        pickle: bool = False) -> Path:
    """Where ``step``'s output goes by default, beside the input.

    Given a path: ``model.pt`` + ``"folded"`` -> ``model.folded.pt``. Given
    the :class:`LoadedModel`, the suffix follows what will be written:
    ``.safetensors`` for a model built from weights, ``.pt2`` for a ``.pt2``,
    a folder for a Hugging Face folder, ``.pt`` for a pickled module (or with
    ``pickle=True``).
    """
    if isinstance(source, LoadedModel):
        p = source.path
        if suffix is None:
            if pickle:
                suffix = ".pt"
            elif source.kind == "exported":
                suffix = ".pt2"
            elif source.kind == "hf":
                return p.with_name(f"{p.name}.{step}")
            elif source.kind == "module" and source.arch is None:
                suffix = p.suffix or ".pt"
            else:
                suffix = ".safetensors"
    else:
        p = Path(source)
    return p.with_name(f"{p.stem}.{step}{suffix if suffix is not None else p.suffix}")


def _is_normfold_hf_dir(p: Path) -> bool:
    w = p / "model.safetensors"
    if not (p / "config.json").is_file() or not w.is_file():
        return False
    try:
        from safetensors import safe_open
        with safe_open(str(w), framework="pt") as f:
            return _RECIPE_KEY in (f.metadata() or {})
    except Exception:
        return False


def check_output_path(output: str | os.PathLike, inputs: str | os.PathLike | Iterable[str | os.PathLike | None] | None = (),
                      *, flag: str, suffix: str | None = None, what: str = "file", folder: bool = False) -> Path:
    """The one rule for output paths; refuse, before any work, one that cannot be written; return it as a Path.

    Each refusal is a :class:`UsageError` whose message names ``flag`` (the
    option that set the path, ``-o``, ``--json``...), in this order:

    * ``suffix`` given and the path does not end with it ("give the ONNX file
      a .onnx suffix", with ``what`` naming the file);
    * the path is one of ``inputs`` (never overwrite an input);
    * the path is an existing directory, unless ``folder`` (a Hugging Face
      model is written as a folder) and it is a folder normfold wrote, which
      is then replaced whole;
    * its parent folder does not exist;
    * this process cannot create a file in that folder, probed by creating and
      removing a temporary file (permission bits do not tell, for example,
      that root cannot write into ``/sys``);
    * the path exists and is read-only.
    """
    out = Path(output)
    if inputs is None or isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if suffix is not None and out.suffix != suffix:
        raise UsageError(f"{flag} {out}: give the {what} a {suffix} suffix")
    for src in inputs:
        if src and out.exists() and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise UsageError(f"{flag} {out} is an input file; refusing to overwrite the input: pass another path")
    if out.is_dir() and not (folder and _is_normfold_hf_dir(out)):
        hint = " (or a new folder for a Hugging Face model)" if folder else ""
        raise UsageError(f"{flag} {out} is an existing directory; pass a file path{hint}")
    parent = out.parent
    if not parent.exists():
        raise UsageError(f"{flag} {out}: folder {parent} does not exist; create it or pass another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise UsageError(f"{flag} {out}: cannot write in {parent} ({exc.strerror or type(exc).__name__}); "
                         "pass a path in a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)
    if out.is_file() and not os.access(out, os.W_OK):
        raise UsageError(f"{flag} {out} exists and is read-only; pass another path")
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and rename it into place (mode ``0o666 & ~umask``)."""
    # keep the real suffix last: torch.export.save warns about a .pt2 archive named otherwise
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates 0600 files; a model file gets the permissions any other new file would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _atomic_dir(path: Path, fill: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside ``path``, then move it into place (replacing a previous normfold output)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        fill(tmp)
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~mask)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _base_for(source: LoadedModel, like: nn.Module) -> nn.Module | None:
    """A fresh build of the original model (on the meta device: only structure is needed), cast like ``like``."""
    def build(device: str | None) -> nn.Module:
        if source.kind == "hf":
            with _hf_offline():
                cls, _, transformers = _hf_class(source.path)
                return _hf_base(source.path, cls, transformers, device=device)
        assert source.arch is not None
        return build_arch(source.arch, device=device)

    if source.kind not in ("state_dict", "hf") and not (source.kind == "module" and source.arch):
        return None
    try:
        base = build("meta")
    except Exception:  # a factory that reads tensor values while building cannot run on meta: build it for real
        base = build(None)
    dtype = next((t.dtype for t in like.parameters() if t.is_floating_point()), None)
    return base.to(dtype) if dtype is not None else base


def _tensors_to_save(module: nn.Module, recipe: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict plus the non-persistent buffers of rebuilt modules; shared tensors stored once (with aliases)."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    for edit in recipe["edits"]:
        if edit["op"] in ("replace", "patch"):
            owner = module.get_submodule(edit["path"]) if edit["path"] else module
            for name in owner._non_persistent_buffers_set:
                buf = owner._buffers.get(name)
                if buf is not None:
                    state[f"{_EXTRA_PREFIX}{edit['path'] + '.' if edit['path'] else ''}{name}"] = buf.detach()
    kept: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.numel() else None
        if key is not None and key in kept:
            aliases[name] = kept[key]
            continue
        if key is not None:
            kept[key] = name
        out[name] = t.to("cpu").contiguous()
    return out, aliases


def _recipe_for(module: nn.Module, source: LoadedModel) -> dict[str, Any] | None:
    base = _base_for(source, module)
    if base is None:
        return None
    recipe = recipes.derive_recipe(base, module, factory_module=arch_module(source.arch) if source.arch else None)
    recipe["base"] = {"hf_class": source.hf_class} if source.kind == "hf" else {"arch": source.arch}
    from normfold import __version__
    recipe["normfold"] = __version__
    return recipe


def save_model(module: nn.Module, path: str | os.PathLike, *, input_path: str | os.PathLike | None = None,
               program: Any = None, source: LoadedModel | None = None, pickle: bool = False,
               example_inputs: Sequence[torch.Tensor] | None = None) -> Path:
    """Write ``module`` (or an ExportedProgram) atomically, never over the input; returns the path written.

    The format follows the output path and ``source`` (the loaded original),
    as the module docstring says: safe weights + recipe by default, a pickled
    module only with ``pickle=True`` or for a pickled input without ``arch``.
    Raises :class:`~normfold.recipe.RecipeError` (a ModelLoadError) when the
    rewritten model holds something a recipe cannot rebuild, with the hint to
    use ``pickle=True``.
    """
    if source is not None and input_path is None:
        input_path = source.path
    out = check_output_path(path, input_path, flag="-o", folder=True)
    suffix = out.suffix
    if pickle:
        if suffix in (".safetensors", ".pt2"):
            raise UsageError(f"-o {out}: --pickle writes a pickled module; give the output a .pt suffix")
        atomic_write(out, lambda tmp: torch.save(module, tmp))
        return out
    if suffix == ".pt2":
        if program is None:
            if example_inputs is None:
                raise UsageError(f"-o {out}: writing a .pt2 re-exports the model and needs its example inputs "
                                 "(--input-shape)")
            try:
                program = torch.export.export(module.eval(), tuple(example_inputs), strict=False)
            except Exception as exc:
                head = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                raise UsageError(f"-o {out}: torch.export cannot export the rewritten model ({type(exc).__name__}: "
                                 f"{head}); write .safetensors instead") from exc
        atomic_write(out, lambda tmp: torch.export.save(program, tmp))
        return out
    if program is not None:
        raise UsageError(f"-o {out}: the result is an ExportedProgram; give the output a .pt2 suffix")
    if source is None:
        raise UsageError(f"-o {out}: normfold needs to know how the model was built (its --arch or Hugging Face "
                         "class) to write it without pickling; pass pickle=True to write a pickled module")
    recipe = _recipe_for(module, source)
    if recipe is None and source.kind == "exported":
        raise UsageError(f"-o {out}: {source.path} is an ExportedProgram (.pt2); write the result as .pt2, or load "
                         "the weights with --arch to write .safetensors")
    if recipe is None:  # a pickled module given without --arch: nothing but the pickle can rebuild it
        if suffix in (".safetensors", ""):
            raise UsageError(f"-o {out}: {source.path} is a pickled module; pass --arch pkg.module:factory so the "
                             "output can be rebuilt without unpickling, or write a .pt with --pickle")
        atomic_write(out, lambda tmp: torch.save(module, tmp))
        return out
    tensors, aliases = _tensors_to_save(module, recipe)
    text = recipes.dumps(recipe)
    if source.kind == "hf":
        if suffix in _MODEL_SUFFIXES:
            raise UsageError(f"-o {out}: a Hugging Face model is written as a folder (config.json + "
                             "model.safetensors); pass a folder path, or -o x.pt2 / --pickle")

        def fill(tmp: Path) -> None:
            for f in source.path.iterdir():
                if f.is_file() and not f.name.endswith(_HF_SKIP_SUFFIXES):
                    shutil.copy2(f, tmp / f.name)
            _write_safetensors(tmp / "model.safetensors", tensors, text, aliases)

        _atomic_dir(out, fill)
        return out
    if suffix == ".safetensors":
        atomic_write(out, lambda tmp: _write_safetensors(tmp, tensors, text, aliases))
    else:
        # a dict of tensors and a string: torch.load(weights_only=True) reads it, no code runs
        full = dict(tensors)
        for alias, kept in aliases.items():
            full[alias] = tensors[kept]
        atomic_write(out, lambda tmp: torch.save({"state_dict": full, _RECIPE_KEY: text}, tmp))
    return out


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], recipe_text: str, aliases: dict[str, str]) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt", _RECIPE_KEY: recipe_text}
    if aliases:
        meta[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    save_file(tensors, str(path), metadata=meta)
