"""Convert BatchNorm to SyncBatchNorm for multi-GPU training, and back for deployment.

Math. None: SyncBatchNorm computes exactly what BatchNorm computes, with the
batch statistics of a training step reduced over every process of the group
instead of the local batch. In eval both are ``F.batch_norm`` with the running
statistics, so a conversion in either direction must leave eval outputs
bit-identical, and a round trip must give back the same classes and the same
state_dict.

What travels. The parameters and buffers (weight, bias, running_mean,
running_var, num_batches_tracked) are moved as the same tensor objects (the
pass works on a copy unless ``inplace=True``; with ``inplace=True`` an
optimizer built before the conversion keeps pointing at the live parameters),
together with eps, momentum, affine, track_running_stats, the training flag
and any attribute a BatchNorm subclass added. timm's BatchNormAct2d becomes
timm's SyncBatchNormAct with the same ``drop`` and ``act`` modules, and back.

Dimensionality. SyncBatchNorm has no 1d/2d/3d: ``to_syncbn`` remembers the
original class on the module (attribute ``_normfold_bn_class``, kept by
deepcopy and pickling, not by a state_dict). A model converted by
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (or timm's) has no such
attribute: ``from_syncbn`` then reads the rank of each layer's input from the
graph with example inputs (2 or 3: BatchNorm1d, 4: BatchNorm2d, 5:
BatchNorm3d) and skips, with the reason, a layer it cannot place.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normfold.graph import is_frozen_batchnorm
from normfold.norms import _is_norm_act
from normfold.passes._batchnorm_common import (RankInfo, bn_forward_problem, input_ranks, replace_module,
                                               transplant)
from normfold.passes.base import Change, Pass, PassResult, Skip

__all__ = ["ToSyncBatchNorm", "FromSyncBatchNorm", "to_syncbn", "from_syncbn", "ORIGINAL_CLASS_ATTR"]

log = logging.getLogger(__name__)

#: attribute on a converted SyncBatchNorm naming the BatchNorm class it came from
ORIGINAL_CLASS_ATTR = "_normfold_bn_class"

_RANK_TO_CLASS: dict[int, type[_BatchNorm]] = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d,
                                               5: nn.BatchNorm3d}


def _timm_norm_act() -> tuple[type, type] | None:
    try:
        from timm.layers.norm_act import BatchNormAct2d, SyncBatchNormAct
    except Exception:  # timm is optional
        return None
    return BatchNormAct2d, SyncBatchNormAct


class ToSyncBatchNorm(Pass):
    """Replace every BatchNorm (1d/2d/3d, subclasses, timm BatchNormAct2d) by SyncBatchNorm."""

    name = "to_syncbn"

    def __init__(self, *, process_group: Any = None) -> None:
        self.process_group = process_group

    def call(self, module: nn.Module) -> PassResult:
        result = PassResult(module=module)
        timm_cls = _timm_norm_act()
        for path, m in list(module.named_modules()):
            if is_frozen_batchnorm(m):
                result.skipped.append(Skip(self.name, (path,), f"{type(m).__name__} is frozen: its statistics never "
                                           "update, so there is nothing to synchronise"))
                continue
            if not isinstance(m, _BatchNorm):
                continue
            if isinstance(m, nn.SyncBatchNorm):
                result.skipped.append(Skip(self.name, (path,), "already a SyncBatchNorm"))
                continue
            problem = bn_forward_problem(m)
            if problem:
                result.skipped.append(Skip(self.name, (path,), problem))
                continue
            if _is_norm_act(m):
                if timm_cls is None or not isinstance(m, timm_cls[0]):
                    result.skipped.append(Skip(self.name, (path,), f"{type(m).__name__} carries drop/act and is not "
                                               "timm's BatchNormAct2d: no SyncBatchNorm class keeps them"))
                    continue
                target: type[nn.Module] = timm_cls[1]
            else:
                target = nn.SyncBatchNorm
            new = transplant(m, target)
            new.process_group = self.process_group
            setattr(new, ORIGINAL_CLASS_ATTR, type(m))
            replace_module(module, m, new)
            result.changes.append(Change(self.name, "to_syncbn", (path,),
                                         f"converted {path} ({type(m).__name__}) to {target.__name__}",
                                         {"from": type(m).__name__, "to": target.__name__}))
        return result


class FromSyncBatchNorm(Pass):
    """Replace every SyncBatchNorm by the BatchNorm class of its dimensionality (or the one it came from)."""

    name = "from_syncbn"

    def __init__(self, *, example_inputs: Any = None) -> None:
        self.example_inputs = example_inputs

    def call(self, module: nn.Module) -> PassResult:
        result = PassResult(module=module)
        syncs = [(p, m) for p, m in module.named_modules() if isinstance(m, nn.SyncBatchNorm)]
        if not syncs:
            return result
        ranks: RankInfo | None = None
        timm_cls = _timm_norm_act()
        for path, m in syncs:
            remembered = getattr(m, ORIGINAL_CLASS_ATTR, None)
            how: str
            if isinstance(remembered, type) and issubclass(remembered, _BatchNorm) \
                    and not issubclass(remembered, nn.SyncBatchNorm):
                target: type[nn.Module] = remembered
                how = "the class remembered by to_syncbn"
            else:
                if ranks is None:
                    # Only models converted by someone else need the graph.
                    ranks = input_ranks(module, self.example_inputs)
                target_or_reason = self._target_from_graph(path, m, ranks, timm_cls)
                if isinstance(target_or_reason, str):
                    result.skipped.append(Skip(self.name, (path,), target_or_reason))
                    continue
                target = target_or_reason
                how = f"its {ranks.rank(path)}-D input in the graph"
            new = transplant(m, target, drop_attrs=("process_group", ORIGINAL_CLASS_ATTR))
            replace_module(module, m, new)
            result.changes.append(Change(self.name, "from_syncbn", (path,),
                                         f"converted {path} ({type(m).__name__}) to {target.__name__} (from {how})",
                                         {"from": type(m).__name__, "to": target.__name__}))
        return result

    @staticmethod
    def _target_from_graph(path: str, m: nn.Module, ranks: RankInfo, timm_cls: tuple[type, type] | None
                           ) -> type[nn.Module] | str:
        if ranks.unavailable:
            return f"cannot tell whether it is 1d, 2d or 3d: {ranks.unavailable}"
        if path not in ranks.called:
            return "not called in forward(), so its dimensionality (1d/2d/3d) is unknown"
        seen = ranks.ranks.get(path, set())
        if not seen:
            return "the graph has no shape for its input, so its dimensionality (1d/2d/3d) is unknown"
        classes = {_RANK_TO_CLASS.get(r) for r in seen}
        if None in classes:
            return f"its input has rank {sorted(seen)}, which no BatchNorm1d/2d/3d accepts"
        if len(classes) > 1:
            return f"called on inputs of ranks {sorted(seen)}: no single BatchNorm class accepts them all"
        target = classes.pop()
        if hasattr(m, "act") or hasattr(m, "drop"):
            if timm_cls is not None and target is nn.BatchNorm2d and isinstance(m, timm_cls[1]):
                return timm_cls[0]
            return (f"{type(m).__name__} carries drop/act on a {sorted(seen)[0]}-D input: there is no BatchNorm "
                    "class of that dimensionality that keeps them")
        if type(m).forward is not nn.SyncBatchNorm.forward and not isinstance(m, timm_cls[1] if timm_cls else ()):
            return f"{type(m).__name__} is a SyncBatchNorm subclass with its own forward(); normfold does not guess it"
        return target


def to_syncbn(model: nn.Module, *, process_group: Any = None, inplace: bool = False) -> PassResult:
    """Convert every BatchNorm (any dimensionality, subclasses, timm BatchNormAct2d) to SyncBatchNorm.

    Keeps parameters, running statistics, num_batches_tracked, eps, momentum,
    affine, track_running_stats and the training flag, and remembers each
    layer's class so that :func:`from_syncbn` restores it exactly.
    ``process_group`` is stored on every converted layer (None: the world).
    """
    return ToSyncBatchNorm(process_group=process_group)(model, inplace=inplace)


def from_syncbn(model: nn.Module, *, example_inputs: Any = None, inplace: bool = False) -> PassResult:
    """Convert every SyncBatchNorm back to BatchNorm1d/2d/3d (or the class :func:`to_syncbn` remembered).

    A layer without a remembered class gets its dimensionality from the rank of
    its input in the graph: ``example_inputs`` (a tensor or tuple), inferred
    from the first layer when omitted.
    """
    return FromSyncBatchNorm(example_inputs=example_inputs)(model, inplace=inplace)
