"""The pass contract: Pass, PassResult, Change, Skip, PassManager.

A pass takes an ``nn.Module`` and returns a :class:`PassResult` naming every
edit it made (:class:`Change`) and every candidate it left alone, with the
reason (:class:`Skip`). The base class keeps the promises every pass makes to
its caller, so that individual passes cannot forget them:

* ``inplace=False`` works on a deep copy: the caller's model is never touched;
* the train/eval flag of every module comes back as it was given;
* the pass returns a PassResult (a contract error addressed to the pass author
  otherwise).
"""

from __future__ import annotations

import abc
import copy
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx
from torch import nn

from normfold.errors import NormfoldError, PassError

__all__ = ["Change", "Skip", "PassResult", "Pass", "PassManager", "copy_module", "pass_name"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """One edit a pass made.

    ``paths`` are the module paths involved (``("layer1.0.bn1", "layer1.0.conv1")``
    for a fold); ``message`` is the sentence a person reads.
    """

    pass_name: str
    action: str
    paths: tuple[str, ...]
    message: str
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "action": self.action, "paths": list(self.paths),
                "message": self.message, "details": _jsonable(self.details)}


@dataclass(frozen=True)
class Skip:
    """A candidate a pass left alone, and why (a sentence a person can act on)."""

    pass_name: str
    paths: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        where = ", ".join(self.paths) if self.paths else "<model>"
        return f"{where}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "paths": list(self.paths), "reason": self.reason}


@dataclass
class PassResult:
    """What a pass returns: the rewritten module and the record of what happened.

    ``metrics`` carries measurements a pass made (for example the output error
    of an approximate rewrite), keyed by name.
    """

    module: nn.Module
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        """True when the pass changed the model."""
        return bool(self.changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "modified": self.modified,
            "changes": [c.to_dict() for c in self.changes],
            "skipped": [s.to_dict() for s in self.skipped],
            "metrics": _jsonable(self.metrics),
        }

    def summary(self) -> str:
        return f"{len(self.changes)} change(s), {len(self.skipped)} skipped"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 64 else f"<tensor {tuple(value.shape)}>"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def training_flags(module: nn.Module) -> dict[str, bool]:
    """The ``training`` flag of every submodule, by path."""
    return {name: m.training for name, m in module.named_modules()}


def restore_training_flags(module: nn.Module, flags: dict[str, bool]) -> None:
    """Put back the flags from :func:`training_flags` on the modules that still exist.

    A module a pass created (an ``nn.Identity`` in place of a BatchNorm) takes the
    flag its predecessor had at that path.
    """
    for name, m in module.named_modules():
        flag = flags.get(name)
        if flag is not None and m.training != flag:  # nn.Module.__setattr__ is slow: write only what changed
            m.training = flag


def copy_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules holding non-leaf tensors as plain attributes.

    Old-style weight_norm / spectral_norm hooks leave the weight they computed in
    the last forward as a plain attribute with a ``grad_fn``, and ``deepcopy``
    refuses non-leaf tensors (pytorch/pytorch#103001). The copy gets a detached
    clone of each such tensor (the hook recomputes it on the next forward); the
    input is not touched.
    """
    memo: dict[int, Any] = {}
    for m in module.modules():
        for value in m.__dict__.values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(module, memo)


#: the attributes torch.fx's tracer stores on a traced module for every tensor its forward uses that is neither a
#: parameter nor a buffer (``Tracer.create_arg`` does ``setattr(root, "_tensor_constant0", t)``)
_FX_TENSOR_CONSTANT = re.compile(r"_tensor_constant\d+$")


def _fx_tensor_constants(module: nn.Module) -> set[tuple[str, str]]:
    return {(path, k) for path, m in module.named_modules() for k in vars(m) if _FX_TENSOR_CONSTANT.match(k)}


def drop_fx_tensor_constants(module: nn.Module, keep: set[tuple[str, str]] = frozenset()) -> None:
    """Remove the ``_tensor_constantN`` attributes that tracing left on ``module`` and its submodules.

    A traced module keeps them after the GraphModule made from it has copied them, so a pass that traces
    would hand back the user's model with tensors its own forward never reads (torchvision's MaxViT gets
    22), which the safe weights format then cannot describe. A GraphModule's are its own (its code reads
    them) and stay, and so do those in ``keep`` (present before the pass).
    """
    for path, m in module.named_modules():
        if isinstance(m, torch.fx.GraphModule):
            continue
        for k in [k for k in vars(m) if _FX_TENSOR_CONSTANT.match(k) and (path, k) not in keep]:
            delattr(m, k)


class Pass(abc.ABC):
    """Base class of every rewrite.

    Subclasses implement :meth:`call`, which edits ``module`` in place and
    returns a PassResult. Callers use ``pass_(module, inplace=...)``.
    """

    #: short name used in reports and in PassManager errors
    name: str = "pass"

    @abc.abstractmethod
    def call(self, module: nn.Module) -> PassResult:
        """Rewrite ``module`` in place and describe what was done."""

    def __call__(self, module: nn.Module, *, inplace: bool = False) -> PassResult:
        if not isinstance(module, nn.Module):
            raise NormfoldError(
                f"{self.name}: expected a torch.nn.Module, got {type(module).__name__}"
            )
        flags = training_flags(module)
        constants = _fx_tensor_constants(module)
        work = module if inplace else copy_module(module)
        try:
            result = self.call(work)
        finally:
            restore_training_flags(work, flags)
            drop_fx_tensor_constants(work, constants)
        if not isinstance(result, PassResult):
            raise TypeError(
                f"pass {type(self).__name__}.call() must return a PassResult, "
                f"got {type(result).__name__} (pass author: fix the return value)"
            )
        restore_training_flags(result.module, flags)
        if result.module is not work and isinstance(result.module, nn.Module):
            drop_fx_tensor_constants(result.module, constants)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def pass_name(p: Any) -> str:
    """The name a pass is reported under: ``Pass.name``, else the function's (or partial's) ``__name__``."""
    name = getattr(p, "name", None)
    if isinstance(name, str):
        return name
    func = getattr(p, "func", p)  # functools.partial(nf.fold_batchnorm, example_inputs=x)
    return getattr(func, "__name__", type(p).__name__)


class PassManager:
    """Runs passes in order, feeding each the previous one's module.

    A pass is a :class:`Pass` instance or any callable with the public pass
    functions' signature, ``fn(module, *, inplace=...) -> PassResult``
    (``nf.fold_batchnorm``, ``nf.freeze_batchnorm``, or a
    ``functools.partial`` of one that binds its options). The returned
    PassResult concatenates changes and skips. If a pass raises, the error is
    re-raised as :class:`PassError` naming the pass that failed and the passes
    that had run; a :class:`NormfoldError` (bad inputs, an untraceable model)
    is raised unchanged.
    """

    def __init__(self, passes: Sequence[Any] | Iterable[Any]) -> None:
        self.passes = list(passes)
        for p in self.passes:
            if not callable(p):
                raise NormfoldError(f"PassManager: {p!r} is not a pass; pass Pass instances or pass functions "
                                    "such as nf.fold_batchnorm")

    def __call__(self, module: nn.Module, *, inplace: bool = False) -> PassResult:
        total = PassResult(module=module)
        ran: list[str] = []
        current = module
        for i, p in enumerate(self.passes):
            name = pass_name(p)
            try:
                # Only the first pass may need a copy; the rest work on that copy.
                r = p(current, inplace=inplace or i > 0)
            except NormfoldError:
                # normfold's own errors already name their fix and carry their exit code (inputs that do not
                # fit the model are the user's to change, not a failure of the pass): pass them on as raised
                raise
            except Exception as exc:
                before = ", ".join(ran) if ran else "none"
                raise PassError(
                    f"pass {name!r} failed ({type(exc).__name__}: {exc}); passes that ran before it: {before}",
                    pass_name=name,
                    ran=ran,
                ) from exc
            if not isinstance(r, PassResult):
                raise PassError(f"pass {name!r} returned {type(r).__name__}, not a PassResult; PassManager runs "
                                "normfold passes and functions that return one", pass_name=name, ran=ran)
            ran.append(name)
            current = r.module
            total.changes.extend(r.changes)
            total.skipped.extend(r.skipped)
            for k, v in r.metrics.items():
                total.metrics[f"{name}.{k}"] = v
        total.module = current
        return total
