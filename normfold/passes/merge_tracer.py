"""The torch.fx tracer branch merging reads blocks with (:mod:`normfold.passes.merge_branches`, :mod:`normfold.passes.merge_modules`).

Convs, norms (timm's BatchNormAct included) and timm's own no-trace modules are leaves: the merge reads a
block as the calls of those modules and the ops between them. timm's no-trace functions are wrapped, as
timm's own tracing does.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch.fx
from torch import nn

from normfold.graph import is_leaf_type, scrub_proxies
from normfold.norms import is_batchnorm

__all__ = ["MergeTracer", "timm_notrace"]


class _Proxy(torch.fx.Proxy):
    """A proxy that records ``t[idx] = v`` as an ``operator.setitem`` node (a plain fx proxy raises on it)."""

    def __setitem__(self, indices: Any, values: Any) -> torch.fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.setitem, (self, indices, values), {})


class MergeTracer(torch.fx.Tracer):
    """Keeps conv, norm (BatchNormAct included) and timm's no-trace modules as leaves.

    In-place item assignments are recorded as ``operator.setitem`` nodes (DBB writes the border of a
    padded tensor so); the merge treats them as in-place ops, except the border writes it reads.
    """

    def __init__(self, leaves: tuple[type, ...], autowrap: tuple[Callable, ...]) -> None:
        super().__init__(autowrap_functions=autowrap)
        self._leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_leaf_type(m) or is_batchnorm(m) or (self._leaves and isinstance(m, self._leaves)):
            return True
        return super().is_leaf_module(m, qualname)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> torch.fx.Graph:
        """Trace ``root``, then drop the Proxies its forward cached in module dicts.

        timm's LeViT and EfficientFormerV2 cache ``attention_biases[:, idxs]`` in eval; traced, the
        cache keeps a Proxy of this graph, which the next trace (a block traced on its own after the
        whole model) would read back as a node of another graph.
        """
        try:
            return super().trace(root, concrete_args)
        finally:
            if isinstance(root, nn.Module):
                scrub_proxies(root)


def timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    try:  # timm is optional: its blocks trace with its own no-trace registry when it is installed
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))
