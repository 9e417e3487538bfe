"""Structural edits as data: record what a rewrite changed in a module tree, and replay it without unpickling.

A rewritten model no longer fits the factory it came from (a BatchNorm became
``nn.Identity``, a conv gained a bias, a BatchNorm became ``FrozenAffine``),
so its weights alone cannot be loaded back. Instead of pickling the whole
module, normfold writes the weights (safetensors) and a *recipe*: the
difference between the rewritten tree and a fresh build of the original
(the ``--arch`` factory or the Hugging Face class). Loading builds the model
again, replays the recipe and loads the weights strictly.

The recipe is derived generically, so every pass (fold, conversions,
recalibration, weight-norm bakes, RMSNorm) is covered without each one
writing its own record. For every module path of the rewritten tree:

* ``replace``: the module's class differs from the fresh build's (or the path
  is new). The record holds the class (``module.qualname``), its plain
  attributes (numbers, strings, booleans, tuples, dtypes, classes and
  functions from the allow-list below and ``functools.partial`` of them with
  such arguments, e.g. ``partial(nn.LayerNorm, eps=1e-6)``), its parameter and
  buffer tables (name -> shape, dtype) and its children's order. Replay makes
  the object with ``cls.__new__`` + ``nn.Module.__init__`` and sets that
  state: no constructor and no code from the file runs.
* ``patch``: same class, different state (a parameter appeared or vanished,
  an attribute changed, hooks were removed, a child was removed). Replay
  edits the freshly built module in place.
* ``take``: under a replaced module, a module of the same class as the fresh
  build's at the same path (a merged block became ``nn.Sequential(merged_conv,
  act, se)``: ``act`` and ``se`` are the block's own). Replay moves the fresh
  build's module there; it is then compared and patched like any module that
  stayed, so the new parent's children are either rebuilt from the allow-list
  or the fresh build's own, never code from the file.

Only classes from an allow-list are rebuilt: ``torch.nn``, normfold's own
modules and the modules the original model's own classes live in. Anything
else (a ``torch.fx.GraphModule``, a module holding a callable or a
non-tensor object) raises :class:`RecipeError`, whose message says to write
a pickled module instead (``--pickle``).
"""

from __future__ import annotations

import functools
import importlib
import json
from typing import Any, Iterable

import torch
from torch import nn

from normfold.errors import ModelLoadError

__all__ = ["RecipeError", "RECIPE_VERSION", "derive_recipe", "apply_recipe", "dumps", "loads"]

#: 2 added the "take" edit (a module of the fresh build moved under a replaced parent)
RECIPE_VERSION = 2
_READABLE_VERSIONS = (1, 2)

# Attributes nn.Module.__init__ creates: module machinery, never recorded as state.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_parameters", "_buffers", "_modules", "training"}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


class RecipeError(ModelLoadError):
    """The rewritten model holds something a recipe cannot rebuild safely."""


# ---------------------------------------------------------------------------------------------------- values


def _encode(value: Any, where: str, allowed: Iterable[str] = (), factory_module: str | None = None) -> Any:
    """A plain attribute value as JSON (tuples, dtypes and allowed classes/functions tagged so they come back)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where, allowed, factory_module) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where, allowed, factory_module) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v, f"{where}[{k!r}]", allowed, factory_module) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Size):
        return {"__tuple__": [int(v) for v in value]}
    # functools.partial(cls, eps=1e-6) (torchvision's ViT keeps its norm_layer so): the callable by name from the
    # allow-list below, its arguments as values; replay only rebuilds the partial object, it calls nothing
    if type(value) is functools.partial:
        return {"__partial__": {
            "func": _encode(value.func, f"{where}.func", allowed, factory_module),
            "args": [_encode(v, f"{where}.args[{i}]", allowed, factory_module) for i, v in enumerate(value.args)],
            "keywords": {k: _encode(v, f"{where}.keywords[{k!r}]", allowed, factory_module)
                         for k, v in value.keywords.items()}}}
    # a class or function by name (ResNet keeps its norm layer class, blocks keep an activation function):
    # rebuilt by import from the same allow-list as module classes
    module_name = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if (isinstance(value, type) or callable(value)) and isinstance(module_name, str) and isinstance(qualname, str) \
            and "<" not in qualname and any((module_name + ".").startswith(p) for p in allowed):
        return {"__object__": _qualname(value, factory_module)}
    raise RecipeError(f"{where} holds a {type(value).__name__}, which a safe (non-pickled) file cannot record; "
                      "write a pickled module instead (--pickle)")


def _decode(value: Any, allowed: set[str], factory_module: str | None) -> Any:
    if isinstance(value, list):
        return [_decode(v, allowed, factory_module) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_decode(v, allowed, factory_module) for v in value["__tuple__"])
        if "__dict__" in value:
            return {str(k): _decode(v, allowed, factory_module) for k, v in value["__dict__"].items()}
        if "__object__" in value:
            return _import_allowed(str(value["__object__"]), allowed, factory_module)
        if "__partial__" in value:
            spec = value["__partial__"]
            if not (isinstance(spec, dict) and isinstance(spec.get("args", []), list)
                    and isinstance(spec.get("keywords", {}), dict)):
                raise ModelLoadError(f"recipe holds a malformed partial {value!r}; the file is damaged")
            func = _decode(spec.get("func"), allowed, factory_module)
            if not (isinstance(spec.get("func"), dict) and ("__object__" in spec["func"] or "__partial__" in spec["func"])
                    and callable(func)):
                raise ModelLoadError(f"recipe holds a partial of {spec.get('func')!r}, not of an allowed class or "
                                     "function; the file is damaged")
            return functools.partial(func, *[_decode(v, allowed, factory_module) for v in spec.get("args", [])],
                                     **{str(k): _decode(v, allowed, factory_module)
                                        for k, v in spec.get("keywords", {}).items()})
        if "__dtype__" in value:
            dt = getattr(torch, str(value["__dtype__"]), None)
            if not isinstance(dt, torch.dtype):
                raise ModelLoadError(f"recipe names an unknown dtype {value['__dtype__']!r}")
            return dt
        if "__float__" in value:
            return float(value["__float__"])
        raise ModelLoadError(f"recipe holds an unknown value {value!r}")
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ModelLoadError(f"recipe names an unknown dtype {name!r}")
    return dt


# ---------------------------------------------------------------------------------------------------- derive


def _qualname(obj: Any, factory_module: str | None = None) -> str:
    module = FACTORY if factory_module and obj.__module__ == factory_module else obj.__module__
    return f"{module}:{obj.__qualname__}"


#: what transformers' from_pretrained leaves on a model about how its checkpoint was read (key renamings), absent
#: from the ``cls(config)`` a recipe is replayed on: bookkeeping of that one load, not part of the model
_LOAD_BOOKKEEPING = frozenset({"_weight_conversions"})


def _raw_attrs(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(module).items()
            if k not in _MODULE_INTERNALS and k not in _LOAD_BOOKKEEPING and not k.startswith("__")}


def _plain_attrs(module: nn.Module, path: str, allowed: Iterable[str], factory_module: str | None) -> dict[str, Any]:
    return {name: _encode(value, f"{path or '<model>'}.{name}", allowed, factory_module)
            for name, value in _raw_attrs(module).items()}


def _filled_cache(built: Any, now: Any) -> bool:
    """A dict the fresh build has empty and a forward filled with tensors: a cache, not structure.

    timm's LeViT and EfficientFormer keep ``attention_bias_cache = {device: tensor}``, filled by an
    eval forward (every rewrite verifies with one) and refilled on the next when empty, so the
    rebuilt model's empty dict is the right state to replay.
    """
    return isinstance(built, dict) and not built and isinstance(now, dict) and \
        all(isinstance(v, torch.Tensor) for v in now.values())


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if type(a) is functools.partial:  # partial has no ==: two builds of a model hold equal, distinct partials
        return _same(a.func, b.func) and len(a.args) == len(b.args) and all(map(_same, a.args, b.args)) \
            and a.keywords.keys() == b.keywords.keys() and all(_same(v, b.keywords[k]) for k, v in a.keywords.items())
    try:
        return bool(a == b)
    except Exception:  # tensors and other values without a plain ==: different unless the same object
        return False


def _tensor_table(tensors: dict[str, torch.Tensor | None]) -> dict[str, Any]:
    return {name: None if t is None else {"shape": list(t.shape), "dtype": _dtype_name(t.dtype),
                                          "requires_grad": bool(t.requires_grad)}
            for name, t in tensors.items()}


def _tables(module: nn.Module) -> dict[str, Any]:
    return {
        "params": _tensor_table(dict(module._parameters)),
        "buffers": _tensor_table(dict(module._buffers)),
        "non_persistent": sorted(module._non_persistent_buffers_set),
    }


def _state(module: nn.Module, path: str, allowed: Iterable[str], factory_module: str | None) -> dict[str, Any]:
    return {
        "attrs": _plain_attrs(module, path, allowed, factory_module),
        "params": _tensor_table(dict(module._parameters)),
        "buffers": _tensor_table(dict(module._buffers)),
        "non_persistent": sorted(module._non_persistent_buffers_set),
        "children": list(module._modules),
        "training": bool(module.training),
    }


def _hook_count(module: nn.Module) -> int:
    return sum(len(getattr(module, name, {}) or {}) for name in _HOOK_DICTS)


#: how a recipe names the module of the --arch factory: the file's own module name depends on where it lies
FACTORY = "@factory"


def _allowed_prefixes(base: nn.Module, factory_module: str | None = None) -> set[str]:
    """torch.nn, normfold, the modules the original model's classes come from, and the factory's module."""
    prefixes = {"torch.nn.", "normfold.", FACTORY + "."}
    if factory_module:
        prefixes.add(factory_module + ".")
    for m in base.modules():
        prefixes.add(type(m).__module__ + ".")
    return prefixes


def _class_name(cls: type) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def _importable(cls: type) -> bool:
    """Whether importing ``cls``'s module and walking its qualname gives ``cls`` back (not a generated class)."""
    try:
        obj: Any = importlib.import_module(cls.__module__)
        for part in cls.__qualname__.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return False
    return obj is cls


def _check_allowed(cls: type, allowed: Iterable[str], path: str) -> None:
    name = cls.__module__ + "."
    if not any(name.startswith(p) for p in allowed) or "<locals>" in cls.__qualname__ or not _importable(cls):
        raise RecipeError(f"{path or '<model>'} is a {cls.__module__}.{cls.__qualname__}, not a class a safe file may "
                          "rebuild (torch.nn, normfold, or the original model's own classes); write a pickled module "
                          "instead (--pickle)")


def derive_recipe(base: nn.Module, rewritten: nn.Module, *, factory_module: str | None = None) -> dict[str, Any]:
    """The edits that turn ``base`` (a fresh build of the original) into the structure of ``rewritten``.

    Only structure is recorded (classes, attributes, parameter/buffer names,
    shapes and dtypes); the values travel as weights beside the recipe.
    ``factory_module`` is the module the ``--arch`` factory lives in: its
    classes may be rebuilt too, and are recorded under :data:`FACTORY` so
    that the recipe does not depend on where a factory file lies.
    """
    allowed = _allowed_prefixes(base, factory_module)
    base_modules = dict(base.named_modules(remove_duplicate=False))
    edits: list[dict[str, Any]] = []
    # how each module that is not the base's own was made: "replace" (rebuilt from the record) or "take" (the
    # base's module, moved under a replaced parent); the nearest such ancestor decides how children are made
    made: dict[str, str] = {}
    taken: set[str] = set()
    base_uses: dict[int, int] = {}
    for m in base_modules.values():
        base_uses[id(m)] = base_uses.get(id(m), 0) + 1
    seen: dict[int, str] = {}
    moved: list[tuple[str, str]] = []  # (path in rewritten, path in base) of the modules a wrapper now holds

    def base_path(path: str) -> str:
        for new, was in reversed(moved):  # innermost wrapper last
            if path == new or path.startswith(new + "."):
                return was + path[len(new):]
        return path

    def under_replaced(path: str) -> bool:
        parts = path.split(".") if path else []
        for i in range(len(parts) - 1, -1, -1):  # the parent first, the root last
            how = made.get(".".join(parts[:i]))
            if how is not None:
                return how == "replace"
        return False

    for path, module in rewritten.named_modules(remove_duplicate=False):
        if id(module) in seen:
            edits.append({"op": "alias", "path": path, "of": seen[id(module)]})
            continue
        seen[id(module)] = path
        was = base_path(path)
        if _hook_count(module) and (was not in base_modules or _hook_count(module) > _hook_count(base_modules[was])):
            raise RecipeError(f"{path or '<model>'} carries hooks (weight_norm, spectral_norm or user hooks) that a "
                              "safe file cannot record; bake them first or write a pickled module (--pickle)")
        cls = type(module)
        inside_replaced = under_replaced(path)
        old = base_modules.get(was)
        if (inside_replaced and old is not None and _class_name(type(old)) == _class_name(cls)
                and base_uses[id(old)] == 1 and was not in taken):
            # a module of the same class at the same path, now under a replaced parent (a merged block's
            # activation or SE in the nn.Sequential that took the block's place): replay moves the fresh build's
            # module here, then it is compared with it like any module that stayed (patched where it differs), so
            # none of its attributes has to be recorded
            edits.append({"op": "take", "path": path, "from": was})
            made[path] = "take"
            taken.add(was)
            inside_replaced = False
        child_name = getattr(cls, "_normfold_wraps", None)
        inner = module._modules.get(child_name) if isinstance(child_name, str) else None
        if (not inside_replaced and old is not None and inner is not None and list(module._modules) == [child_name]
                and not module._parameters and not module._buffers
                and _class_name(type(old)) != _class_name(cls) and _class_name(type(inner)) == _class_name(type(old))):
            # a normfold wrapper (a centring op) around the module that was here: record the wrapper alone; the
            # wrapped module keeps being compared with the base's module at the old path
            _check_allowed(cls, allowed, path)
            edits.append({"op": "wrap", "path": path, "class": _qualname(cls, factory_module), "child": child_name,
                          "attrs": _plain_attrs(module, path, allowed, factory_module)})
            moved.append((f"{path}.{child_name}" if path else child_name, was))
            continue
        # by name, not identity: torch.nn.utils.parametrize makes a new ParametrizedConv2d class per module
        if inside_replaced or old is None or _class_name(type(old)) != _class_name(cls):
            _check_allowed(cls, allowed, path)
            if cls is torch.fx.GraphModule or isinstance(module, torch.fx.GraphModule):
                raise RecipeError(f"{path or '<model>'} is a torch.fx GraphModule (generated code); "
                                  "write a pickled module instead (--pickle)")
            edits.append({"op": "replace", "path": path, "class": _qualname(cls, factory_module),
                          **_state(module, path, allowed, factory_module)})
            made[path] = "replace"
            continue
        new_attrs, old_attrs = _raw_attrs(module), _raw_attrs(old)
        changed_attrs = {k: _encode(v, f"{path or '<model>'}.{k}", allowed, factory_module) for k, v in new_attrs.items()
                         if k not in old_attrs or not (_same(old_attrs[k], v) or _filled_cache(old_attrs[k], v))}
        removed_attrs = [k for k in old_attrs if k not in new_attrs]
        new_tables, old_tables = _tables(module), _tables(old)
        tables_differ = new_tables != old_tables
        children_differ = list(module._modules) != list(old._modules)
        clear_hooks = _hook_count(module) == 0 and _hook_count(old) > 0
        if changed_attrs or removed_attrs or tables_differ or children_differ or clear_hooks:
            edit: dict[str, Any] = {"op": "patch", "path": path}
            if changed_attrs:
                edit["attrs"] = changed_attrs
            if removed_attrs:
                edit["remove_attrs"] = removed_attrs
            if tables_differ:
                edit.update(new_tables)
            if children_differ:
                edit["children"] = list(module._modules)
            if clear_hooks:
                edit["clear_hooks"] = True
            edits.append(edit)
    return {"version": RECIPE_VERSION, "edits": edits, "training": bool(rewritten.training)}


# ---------------------------------------------------------------------------------------------------- apply


def _import_allowed(qualname: str, allowed: set[str], factory_module: str | None) -> Any:
    mod_name, _, attr = qualname.partition(":")
    if mod_name == FACTORY:
        if not factory_module:
            raise ModelLoadError(f"the file's recipe names {qualname!r}, a class of the --arch factory's module; "
                                 "pass --arch")
        mod_name = factory_module
    if not any((mod_name + ".").startswith(p) for p in allowed) or not attr:
        raise ModelLoadError(f"the file's recipe names {qualname!r}, which is outside torch.nn, normfold and "
                             "the model's own modules; refusing to import it")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"the file's recipe names {qualname!r}, which cannot be imported here ({exc}); "
                             "install the normfold/torch version that wrote it") from exc
    return obj


def _resolve_class(qualname: str, allowed: set[str], factory_module: str | None) -> type:
    obj = _import_allowed(qualname, allowed, factory_module)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelLoadError(f"the file's recipe names {qualname!r}, which is not an nn.Module class")
    return obj


def _set_tables(module: nn.Module, edit: dict[str, Any]) -> None:
    for name, spec in edit.get("params", {}).items():
        old = module._parameters.get(name)
        if spec is None:
            module._parameters[name] = None
        elif old is None or list(old.shape) != spec["shape"] or _dtype_name(old.dtype) != spec["dtype"]:
            module._parameters[name] = nn.Parameter(torch.empty(spec["shape"], dtype=_dtype(spec["dtype"])),
                                                    requires_grad=bool(spec["requires_grad"]))
    for name in [n for n in module._parameters if n not in edit.get("params", {})]:
        del module._parameters[name]
    for name, spec in edit.get("buffers", {}).items():
        old = module._buffers.get(name)
        if spec is None:
            module._buffers[name] = None
        elif old is None or list(old.shape) != spec["shape"] or _dtype_name(old.dtype) != spec["dtype"]:
            module._buffers[name] = torch.empty(spec["shape"], dtype=_dtype(spec["dtype"]))
    for name in [n for n in module._buffers if n not in edit.get("buffers", {})]:
        del module._buffers[name]
    module._non_persistent_buffers_set = set(edit.get("non_persistent", []))


def _set_attrs(module: nn.Module, attrs: dict[str, Any], path: str, allowed: set[str],
               factory_module: str | None) -> None:
    for name, value in attrs.items():
        if not name.isidentifier() or name.startswith("__") or name in _MODULE_INTERNALS:
            raise ModelLoadError(f"the file's recipe sets an invalid attribute {name!r} on {path or '<model>'}")
        try:
            object.__setattr__(module, name, _decode(value, allowed, factory_module))
        except (AttributeError, TypeError) as exc:
            raise ModelLoadError(f"the file's recipe cannot set {path or '<model>'}.{name}: {exc}") from exc


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name


def _put(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Place ``module`` at ``path`` under ``root``; returns the (possibly new) root."""
    if path == "":
        return module
    parent, name = _parent(root, path)
    parent._modules[name] = module
    return root


def apply_recipe(base: nn.Module, recipe: dict[str, Any], *, factory_module: str | None = None) -> nn.Module:
    """Replay ``recipe`` on ``base`` (a fresh build of the original model); returns the rebuilt model.

    The result has the rewritten model's structure with uninitialized new
    tensors: load the saved weights into it strictly. ``factory_module`` as
    for :func:`derive_recipe` (where :data:`FACTORY` names now point).
    """
    if not isinstance(recipe, dict) or recipe.get("version") not in _READABLE_VERSIONS:
        raise ModelLoadError(f"the file's recipe has version {recipe.get('version') if isinstance(recipe, dict) else '?'}"
                             f"; this normfold reads versions up to {RECIPE_VERSION}: upgrade normfold")
    allowed = _allowed_prefixes(base, factory_module)
    # what a "take" moves: the fresh build's modules as they were, before replaced parents drop them
    originals = dict(base.named_modules(remove_duplicate=False))
    root = base
    for edit in recipe.get("edits", []):
        op, path = edit.get("op"), str(edit.get("path", ""))
        if op == "alias":
            target = root.get_submodule(edit["of"]) if edit["of"] else root
            parent, name = _parent(root, path)
            parent._modules[name] = target
        elif op == "replace":
            cls = _resolve_class(str(edit["class"]), allowed, factory_module)
            module = cls.__new__(cls)
            nn.Module.__init__(module)
            _set_attrs(module, edit.get("attrs", {}), path, allowed, factory_module)
            _set_tables(module, edit)
            # children come from their own (later) records; keep the order here
            for child in edit.get("children", []):
                module._modules[child] = None
            module.training = bool(edit.get("training", True))
            root = _put(root, path, module)
        elif op == "take":
            source = originals.get(str(edit.get("from", "")))
            if source is None:
                raise ModelLoadError(f"the file's recipe moves {edit.get('from')!r}, which the model built here does "
                                     "not have; the file is damaged or was written for another --arch")
            root = _put(root, path, source)
        elif op == "wrap":
            cls = _resolve_class(str(edit["class"]), allowed, factory_module)
            inner = root.get_submodule(path) if path else root
            module = cls.__new__(cls)
            nn.Module.__init__(module)
            _set_attrs(module, edit.get("attrs", {}), path, allowed, factory_module)
            module._modules[str(edit["child"])] = inner
            module.training = inner.training
            root = _put(root, path, module)
        elif op == "patch":
            module = root.get_submodule(path) if path else root
            _set_attrs(module, edit.get("attrs", {}), path, allowed, factory_module)
            for name in edit.get("remove_attrs", []):
                module.__dict__.pop(name, None)
            if "params" in edit:
                _set_tables(module, edit)
            if "children" in edit:
                keep = edit["children"]
                module._modules = {k: module._modules.get(k) for k in keep}  # type: ignore[assignment]
            if edit.get("clear_hooks"):
                for name in _HOOK_DICTS:
                    getattr(module, name).clear()
        else:
            raise ModelLoadError(f"the file's recipe has an unknown edit {op!r}")
    missing = [p for p, m in _walk(root) if m is None]
    if missing:
        raise ModelLoadError(f"the file's recipe leaves {missing[0]} empty; the file is damaged")
    root.train(bool(recipe.get("training", False)))
    return root


def _walk(root: nn.Module, prefix: str = "") -> Iterable[tuple[str, nn.Module | None]]:
    for name, child in root._modules.items():
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if child is not None:
            yield from _walk(child, path)


def dumps(recipe: dict[str, Any]) -> str:
    """The recipe as a compact JSON string (safetensors metadata values are strings)."""
    return json.dumps(recipe, separators=(",", ":"), sort_keys=True)


def loads(text: str) -> dict[str, Any]:
    """Parse a recipe written by :func:`dumps`."""
    try:
        recipe = json.loads(text)
    except ValueError as exc:
        raise ModelLoadError(f"the file's normfold recipe is not valid JSON ({exc}); the file is damaged") from exc
    if not isinstance(recipe, dict):
        raise ModelLoadError("the file's normfold recipe is not a JSON object; the file is damaged")
    return recipe
