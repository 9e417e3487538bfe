"""Bake weight_norm and spectral_norm into plain weights for deployment.

Math. Weight normalization recomputes ``w = g * v / ||v||`` (norm over every
axis but ``dim``) before each forward; spectral normalization recomputes
``w = w_orig / sigma`` with ``sigma = u^T W_mat v``, where in eval the vectors
``u`` and ``v`` are the stored ones (no power iteration: in training each
forward first runs ``n_power_iterations`` steps and updates ``u``, ``v`` in
place). Both are deterministic functions of stored tensors in eval, so the
weight can be computed once and stored: the deployed model skips the
recomputation, and exporters and fold_batchnorm see a plain weight.

Exactness. The baked weight is the tensor the module's own eval forward
computes, bit for bit, in the module's dtype: the eval outputs do not change at
all. (This is the one pass that does not recompute in float64: the reference
is what the trained model computes, and a float64 recomputation would move
every weight by a rounding.) The baking runs with the model in eval, so
spectral norm's ``u`` and ``v`` are not advanced.

Both styles are handled:

* the old hooks ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (a forward
  pre-hook plus ``<name>_g``/``<name>_v`` or ``<name>_orig``/``_u``/``_v``),
  removed with ``remove_weight_norm`` / ``remove_spectral_norm`` semantics;
* ``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``,
  removed with ``parametrize.remove_parametrizations(leave_parametrized=True)``.

A tensor whose parametrization list holds anything else (an orthogonal map, a
user function) is skipped with the reason: baking it is not this pass's call.
The baked tensor stays a Parameter with the original's ``requires_grad``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from normfold.graph import eval_mode
from normfold.passes.base import Change, Pass, PassResult, Skip

__all__ = ["FoldWeightNorm", "fold_weight_norm"]

log = logging.getLogger(__name__)


def _param_kind(p: nn.Module) -> str | None:
    """'weight_norm' / 'spectral_norm' for torch's own parametrization modules, else None."""
    name = type(p).__name__
    if type(p).__module__.startswith("torch.nn.utils.parametrizations"):
        if name == "_WeightNorm":
            return "weight_norm"
        if name == "_SpectralNorm":
            return "spectral_norm"
    return None


def _old_hooks(m: nn.Module) -> list[tuple[int, Any, str]]:
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    out = []
    for k, hook in m._forward_pre_hooks.items():
        if isinstance(hook, WeightNorm):
            out.append((k, hook, "weight_norm"))
        elif isinstance(hook, SpectralNorm):
            out.append((k, hook, "spectral_norm"))
    return out


class FoldWeightNorm(Pass):
    """Replace every weight_norm / spectral_norm reparametrization by the plain weight it computes in eval."""

    name = "fold_weight_norm"

    def call(self, module: nn.Module) -> PassResult:
        result = PassResult(module=module)
        # eval: spectral norm must use the stored u, v (training mode would run power iterations and move them)
        with eval_mode(module), torch.no_grad():
            for path, m in list(module.named_modules()):
                for key, hook, kind in _old_hooks(m):
                    self._bake_hook(path, m, key, hook, kind, result)
                if parametrize.is_parametrized(m):
                    for tname in list(m.parametrizations.keys()):
                        self._bake_parametrization(path, m, tname, result)
        return result

    def _bake_hook(self, path: str, m: nn.Module, key: int, hook: Any, kind: str, result: PassResult) -> None:
        from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook, SpectralNormStateDictHook

        name = hook.name
        where = f"{path}.{name}" if path else name
        if kind == "weight_norm":
            orig = getattr(m, name + "_v")
            weight = hook.compute_weight(m)  # what the pre-hook sets before every forward
            requires_grad = orig.requires_grad or getattr(m, name + "_g").requires_grad
            del m._forward_pre_hooks[key]
            delattr(m, name)
            del m._parameters[name + "_g"]
            del m._parameters[name + "_v"]
        else:
            orig = getattr(m, name + "_orig")
            weight = hook.compute_weight(m, do_power_iteration=False)  # what the eval pre-hook sets
            requires_grad = orig.requires_grad
            del m._forward_pre_hooks[key]
            delattr(m, name)
            delattr(m, name + "_u")
            delattr(m, name + "_v")
            delattr(m, name + "_orig")
            for hooks, cls in ((m._state_dict_hooks, SpectralNormStateDictHook),
                               (m._load_state_dict_pre_hooks, SpectralNormLoadStateDictPreHook)):
                for k, h in list(hooks.items()):
                    if isinstance(h, cls) and h.fn.name == name:
                        del hooks[k]
        m.register_parameter(name, nn.Parameter(weight.detach().clone(), requires_grad=requires_grad))
        result.changes.append(Change(self.name, "bake", (path,),
                                     f"baked {kind} (hook) of {where} into a plain weight",
                                     {"kind": kind, "style": "hook", "tensor": name}))

    def _bake_parametrization(self, path: str, m: nn.Module, tname: str, result: PassResult) -> None:
        plist = m.parametrizations[tname]
        where = f"{path}.{tname}" if path else tname
        kinds = [_param_kind(p) for p in plist]
        if any(k is None for k in kinds):
            others = ", ".join(type(p).__name__ for p, k in zip(plist, kinds) if k is None)
            result.skipped.append(Skip(self.name, (path,), f"{where} is parametrized by {others} as well: only "
                                       "weight_norm/spectral_norm are baked (remove the others first)"))
            return
        originals = [t for n, t in plist.named_parameters(recurse=False)] or \
                    [getattr(plist, n) for n in ("original", "original0", "original1") if hasattr(plist, n)]
        requires_grad = any(t.requires_grad for t in originals)
        value = getattr(m, tname).detach().clone()  # the eval value (parametrizations are in eval here)
        # A deep copy of a parametrized module shares its generated class ("ParametrizedConv2d") with the
        # original, and removing a parametrization deletes a property of that class: give this module a
        # class of its own first, or the caller's model (inplace=False) would lose its weight.
        cls = type(m)
        own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        m.__class__ = type(cls.__name__, cls.__bases__, own)
        parametrize.remove_parametrizations(m, tname, leave_parametrized=True)
        # remove_parametrizations keeps the original Parameter object for a single-tensor parametrization
        # (spectral_norm: optimizers stay valid) and builds a new tensor for weight_norm's (g, v), a buffer
        # when under no_grad. Either way store exactly the eval value, as a Parameter with the original
        # requires_grad.
        current = m._parameters.get(tname)
        if isinstance(current, nn.Parameter) and current.shape == value.shape and current.dtype == value.dtype:
            current.copy_(value)
            current.requires_grad_(requires_grad)
        else:
            m._parameters.pop(tname, None)
            m._buffers.pop(tname, None)
            m.register_parameter(tname, nn.Parameter(value, requires_grad=requires_grad))
        kind = "+".join(dict.fromkeys(k for k in kinds if k))
        result.changes.append(Change(self.name, "bake", (path,),
                                     f"baked {kind} (parametrization) of {where} into a plain weight",
                                     {"kind": kind, "style": "parametrization", "tensor": tname}))


def fold_weight_norm(model: nn.Module, *, inplace: bool = False) -> PassResult:
    """Bake every weight_norm and spectral_norm (hook style and torch.nn.utils.parametrizations) into plain weights.

    The baked weights are what each module computes in eval, so eval outputs
    are bit-identical. Other parametrizations are skipped with the reason.
    """
    return FoldWeightNorm()(model, inplace=inplace)
