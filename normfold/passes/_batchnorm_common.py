"""Helpers shared by the BatchNorm conversion passes (GroupNorm, SyncBatchNorm, frozen affine).

* :func:`input_ranks` answers "what rank is the tensor each module sees?" from
  the graph (:func:`normfold.graph.build_graph` with example inputs), which is
  what tells a BatchNorm1d on ``(N, C)`` from one on ``(N, C, L)`` and gives a
  dimension-less SyncBatchNorm back its 1d/2d/3d class.
* :func:`transplant` moves a module's state into an instance of another class
  without calling that class's ``__init__``: the parameters and buffers are the
  very same tensor objects (an optimizer built earlier keeps working, and
  ``inplace=True`` means in place), and every attribute a user subclass added
  travels along.
* :func:`bn_forward_problem` says when a BatchNorm subclass computes something
  normfold does not know.
* :func:`iter_batches` reads calibration data in the usual shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.errors import InputError, NormfoldError
from normfold.graph import build_graph
from normfold.norms import STANDARD_BN_FORWARDS, _is_norm_act

__all__ = ["RankInfo", "input_ranks", "transplant", "bn_forward_problem", "iter_batches", "module_internals",
           "maybe_example_inputs", "bn_channels", "alias_map", "replace_module"]

log = logging.getLogger(__name__)

#: attributes every nn.Module has; everything else in a module's __dict__ is its own configuration
_MODULE_INTERNALS = frozenset(nn.Module().__dict__.keys())


def module_internals() -> frozenset[str]:
    """The ``__dict__`` keys nn.Module.__init__ creates (hooks, parameter/buffer/module dicts, training)."""
    return _MODULE_INTERNALS


def alias_map(root: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every path it is registered at (one module object can sit at several paths)."""
    out: dict[int, list[str]] = {}
    for path, m in root.named_modules(remove_duplicate=False):
        out.setdefault(id(m), []).append(path)
    return out


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module, aliases: dict[int, list[str]] | None = None
                   ) -> list[str]:
    """Put ``new`` at every path where ``old`` is registered; returns those paths.

    named_modules() lists a shared module once: replacing it at that path
    alone would leave the other registrations (and the calls through them)
    on the old layer, a silent half conversion.
    """
    from normfold.norms import set_submodule

    paths = (aliases or alias_map(root)).get(id(old), [])
    for path in paths:
        set_submodule(root, path, new)
    return paths


def bn_channels(m: nn.Module) -> int:
    """Number of channels of a BatchNorm of any kind (FrozenBatchNorm2d has no num_features)."""
    n = getattr(m, "num_features", None)
    if isinstance(n, int):
        return n
    return int(m.running_mean.numel())


def bn_forward_problem(m: nn.Module) -> str | None:
    """Why the forward of BatchNorm ``m`` is not plain BatchNorm (plus timm's drop/act), or None."""
    if not isinstance(m, _BatchNorm):
        return None
    if type(m).forward not in STANDARD_BN_FORWARDS and not _is_norm_act(m):
        return (f"{type(m).__name__} is a BatchNorm subclass with its own forward(); normfold does not guess "
                "what it computes")
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return "lazy BatchNorm not initialized yet (run one forward first)"
    return None


def transplant(old: nn.Module, cls: type[nn.Module], *, drop_attrs: Iterable[str] = ()) -> nn.Module:
    """A new ``cls`` instance carrying ``old``'s parameters, buffers, children and attributes.

    The tensors are shared, not copied: the caller works on its own copy already
    (the Pass base class deep-copies unless ``inplace=True``), and sharing keeps
    parameter identity for optimizers. Hooks are not carried: they belong to
    the old object.
    """
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    drop = set(drop_attrs)
    for k, v in old.__dict__.items():
        if k not in _MODULE_INTERNALS and k not in drop:
            new.__dict__[k] = v
    for name, p in old._parameters.items():
        new._parameters[name] = p
    for name, b in old._buffers.items():
        new._buffers[name] = b
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    for name, c in old._modules.items():
        new._modules[name] = c
    new.training = old.training
    return new


@dataclass
class RankInfo:
    """Tensor ranks seen by each called module, and why they are unknown when they are."""

    ranks: dict[str, set[int]] = field(default_factory=dict)
    #: input shapes by module path (every call)
    shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    #: set when no graph with shapes could be built: the reason, for skip messages
    unavailable: str | None = None
    #: paths the graph shows as called (empty when unavailable)
    called: set[str] = field(default_factory=set)

    def rank(self, path: str) -> int | None:
        r = self.ranks.get(path)
        return next(iter(r)) if r and len(r) == 1 else None


def maybe_example_inputs(model: nn.Module, example_inputs: Any) -> tuple[Any, str | None]:
    """``example_inputs`` as given, else inputs inferred from the first layer; plus why there are none."""
    if example_inputs is not None:
        return example_inputs, None
    from normfold.inputs import infer_input_shapes, model_dtype_device, random_inputs

    try:
        inferred = infer_input_shapes(model)
    except NormfoldError as exc:
        # the message names the command-line flag; from Python the fix is the keyword argument
        return None, f"{exc} (from Python: example_inputs=...)"
    except Exception as exc:  # a model that cannot even run on a guessed input
        return None, f"cannot infer an input shape ({type(exc).__name__}); pass example_inputs"
    dtype, device = model_dtype_device(model)
    return random_inputs(inferred.shapes, dtype=dtype, device=device, integer_high=inferred.integer_high), None


def input_ranks(model: nn.Module, example_inputs: Any = None) -> RankInfo:
    """The rank (and shape) of the input of every module call, from the graph with shapes.

    ``example_inputs`` None: an input shape is inferred from the first layer when
    possible (as fold_batchnorm does). Never raises on a model it cannot trace:
    ``RankInfo.unavailable`` then says why, for the skip reasons of the caller.
    """
    inputs, why = maybe_example_inputs(model, example_inputs)
    if inputs is None:
        return RankInfo(unavailable=f"the tensor ranks are unknown ({why})")
    try:
        graph = build_graph(model, inputs)
    except InputError:
        if example_inputs is not None:
            raise  # the caller's own inputs do not fit: say so rather than guess the ranks
        return RankInfo(unavailable="the tensor ranks are unknown (the inferred input shape does not fit; "
                                    "pass example_inputs)")
    except NormfoldError as exc:
        return RankInfo(unavailable=f"the tensor ranks are unknown ({exc})")
    info = RankInfo()
    for node in graph.module_nodes():
        info.called.add(node.target)
        src = node.args[0] if node.args else None
        shape = src.shape if src is not None and src.shape is not None else node.shape
        if shape is None:
            continue
        info.ranks.setdefault(node.target, set()).add(len(shape))
        info.shapes.setdefault(node.target, []).append(tuple(shape))
    if not info.ranks:
        info.unavailable = "the tensor ranks are unknown (the graph carries no shapes)"
    return info


def iter_batches(data: Any, *, device: torch.device | None = None, batch_size: int = 64) -> Iterator[tuple[tuple, dict]]:
    """Yield ``(args, kwargs)`` for the model from calibration data.

    Accepted: a Tensor (split into batches of ``batch_size`` along dim 0); an
    iterable (DataLoader, list) of batches, where a batch is a Tensor, a dict of
    keyword inputs, or a tuple/list whose FIRST element is the input and the
    rest (labels, as a DataLoader over a TensorDataset yields) are ignored.
    """
    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and device is not None:
            return x.to(device)
        return x

    if isinstance(data, torch.Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise InputError("calibration_data is an empty tensor; pass a batch of inputs (N, ...)")
        for chunk in torch.split(data, batch_size):
            yield (move(chunk),), {}
        return
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise InputError(f"calibration_data must be a Tensor or an iterable of batches, got {type(data).__name__}")
    for batch in data:
        if isinstance(batch, torch.Tensor):
            yield (move(batch),), {}
        elif isinstance(batch, dict):
            yield (), {k: move(v) for k, v in batch.items()}
        elif isinstance(batch, (tuple, list)) and batch:
            yield (move(batch[0]),), {}
        else:
            raise InputError(f"a calibration batch must be a Tensor, a dict or an (input, label) tuple; got "
                             f"{type(batch).__name__}")
