"""Hugging Face ``transformers`` models as tracers need them: positional tensors in, a flat tuple of tensors out.

A ``transformers`` model as it comes does not trace as it is: its ``forward``
takes keyword inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ...)
and ``**kwargs``, returns a ``ModelOutput`` (a dict), and with the default
``use_cache=True`` also returns a ``Cache`` object that neither torch.fx nor
torch.export can put in a graph. :func:`traceable` makes such a model (or any
module called with keyword inputs) look like a plain module for the duration of
a ``with`` block, without copying it and without renaming any submodule:

* every config the model holds gets ``use_cache=False`` (restored afterwards):
  a cache is an inference-time memo, it does not change what the model computes
  for one full sequence;
* the model's class is swapped for a subclass whose ``forward`` takes the
  example inputs as positional tensors (in the order given), calls the real
  ``forward`` with them as keywords, and returns every tensor of the result as a
  flat tuple (``ModelOutput`` fields in their order, ``None`` and caches
  dropped). Submodule paths, parameters and hooks are the model's own, so an
  edit made inside the block is an edit of the user's model.
"""

from __future__ import annotations

import contextlib
import inspect
import keyword
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from normfold.errors import InputError

__all__ = ["is_hf_model", "needs_wrapping", "traceable", "flatten_output", "positional_inputs", "export_onnx"]

_SUBCLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def is_hf_model(model: nn.Module) -> bool:
    """True for a ``transformers`` ``PreTrainedModel`` (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def needs_wrapping(model: nn.Module, example_inputs: Any) -> bool:
    """Whether :func:`traceable` is needed: a Hugging Face model, or keyword (dict) example inputs."""
    return is_hf_model(model) or isinstance(example_inputs, Mapping)


def flatten_output(out: Any) -> tuple[torch.Tensor, ...]:
    """Every tensor of a model's result, in order: ModelOutput / dict values, tuples and lists, recursively.

    ``None`` and non-tensor values (a ``Cache``, a number) are dropped: they are no model output a
    rewrite must preserve.
    """
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, Mapping):  # ModelOutput is an OrderedDict holding only its non-None fields
        return tuple(t for v in out.values() for t in flatten_output(v))
    if isinstance(out, (list, tuple)):
        return tuple(t for v in out for t in flatten_output(v))
    return ()


def positional_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[str, ...], tuple]:
    """(keyword names, tensors) for the example inputs: a dict keeps its keys, positional ones take forward()'s names."""
    if isinstance(example_inputs, Mapping):
        items = [(str(k), v) for k, v in example_inputs.items() if v is not None]
        return tuple(k for k, _ in items), tuple(v for _, v in items)
    values = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs or ())
    params = [p for p in inspect.signature(type(model).forward).parameters.values()
              if p.name != "self" and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(values) > len(params):
        raise InputError(f"{type(model).__name__}.forward takes {len(params)} positional inputs, got {len(values)}: "
                         "pass the example inputs as a dict of keyword inputs")
    return tuple(p.name for p in params[: len(values)]), values


def _configs(model: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        stack = [cfg]
        while stack:
            c = stack.pop()
            if c is None or id(c) in seen or not hasattr(c, "to_dict"):
                continue
            seen[id(c)] = c
            # encoder-decoder and multimodal configs hold sub-configs
            stack.extend(v for v in vars(c).values() if hasattr(v, "to_dict") and hasattr(v, "use_cache"))
    return list(seen.values())


def _subclass(cls: type, names: tuple[str, ...]) -> type:
    """A subclass of ``cls`` whose forward(self, <names>) calls cls.forward(**names) and flattens the result.

    The forward is generated with one named parameter per input because torch.fx reads the arguments
    of ``type(root).forward`` from its code object (it cannot trace ``*args``).
    """
    key = (cls, names)
    if key in _SUBCLASSES:
        return _SUBCLASSES[key]
    accepts = inspect.signature(cls.forward).parameters
    extra = {k: False for k in ("use_cache", "output_attentions", "output_hidden_states") if k in accepts}
    # the inputs' own names where they are identifiers: they become the graph's (and the ONNX model's) input names
    args = [n if n.isidentifier() and not keyword.iskeyword(n) and n not in ("self", "kw") and not n.startswith("_")
            else f"input_{i}" for i, n in enumerate(names)]
    if len(set(args)) != len(args):
        args = [f"input_{i}" for i in range(len(names))]
    src = (f"def forward(self, {', '.join(args)}):\n"
           f"    kw = dict(zip(_names, ({', '.join(args)}{',' if len(args) == 1 else ''})))\n"
           f"    kw.update(_extra)\n"
           f"    return _flatten(_forward(self, **kw))\n")
    scope: dict[str, Any] = {"_names": names, "_extra": extra, "_flatten": flatten_output, "_forward": cls.forward}
    exec(src, scope)  # noqa: S102 - generated from identifiers only
    sub = type(cls.__name__, (cls,), {"forward": scope["forward"], "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__, "_normfold_traceable": True})
    _SUBCLASSES[key] = sub
    return sub


@contextlib.contextmanager
def traceable(model: nn.Module, example_inputs: Any) -> Iterator[tuple]:
    """Within the block, ``model(*inputs)`` returns a flat tuple of tensors; yields those positional ``inputs``.

    Caches are off and restored on exit, as is the model's class (see the module docstring).
    """
    names, values = positional_inputs(model, example_inputs)
    configs = [c for c in _configs(model) if hasattr(c, "use_cache")]
    saved_cache = [(c, c.use_cache) for c in configs]
    cls = type(model)
    if getattr(cls, "_normfold_traceable", False):  # already inside a traceable block
        yield values
        return
    try:
        for c in configs:
            c.use_cache = False
        model.__class__ = _subclass(cls, names)
        yield values
    finally:
        model.__class__ = cls
        for c, v in saved_cache:
            c.use_cache = v


def export_onnx(model: nn.Module, example_inputs: Any, path: Any = None, *, dynamic_sequence: bool | None = None,
                **kwargs: Any) -> Any:
    """:func:`normfold.export.export_onnx` for a model called with keyword inputs (a ``transformers`` model).

    The model is exported inside :func:`traceable` (caches off, a flat tuple of output tensors, the
    inputs' names as the ONNX inputs' names). ``dynamic_sequence`` (default: when an input is a 2-D
    integer tensor, i.e. token ids) makes dim 1 of the 2-D inputs a symbolic ``sequence``. To check the
    export against the original, run :func:`normfold.check` inside ``traceable`` blocks of both models.
    """
    from normfold.export import export_onnx as _export

    with traceable(model, example_inputs) as inputs:
        if dynamic_sequence is None:
            dynamic_sequence = any(isinstance(t, torch.Tensor) and t.dim() == 2 and not t.is_floating_point()
                                   for t in inputs)
        return _export(model, inputs, path, dynamic_sequence=dynamic_sequence, **kwargs)
