"""What the two graph readers share: the rule builders and argument helpers.

A graph reader answers :class:`normfold.passes.fold.flow.FlowReader`'s
questions for one IR: :class:`~normfold.passes.fold.fx_reader.ModuleReader`
for the torch.fx graph of an ``nn.Module`` (modules, torch functions, tensor
methods) and :class:`~normfold.passes.fold.aten_reader.ProgramReader` for the
ATen graph of an ExportedProgram. Both build the same three kinds of
:class:`~normfold.passes.fold.flow.Rule` here: data movement (the op is run
on the index tensor), a per-channel pool, and a block.
"""

from __future__ import annotations

import abc
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx

from normfold.passes.fold.flow import Rule

__all__ = ["GraphReader", "bind_args", "substitute", "flat_nodes", "is_getitem"]


def flat_nodes(value: Any) -> list[torch.fx.Node]:
    """Every fx Node inside ``value`` (nested args / kwargs), in order, with repeats."""
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(value, lambda n: out.append(n))
    return out


def bind_args(node: torch.fx.Node, names: Sequence[str], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Positional + keyword arguments of ``node`` by name, following ``names`` (the op's signature order)."""
    out = dict(defaults or {})
    for name, a in zip(names, node.args):
        out[name] = a
    out.update(node.kwargs)
    return out


def substitute(value: Any, via: torch.fx.Node, index: Any, concrete: Callable[[torch.fx.Node], Any]) -> Any:
    """``value`` (node args) with ``via`` replaced by the index tensor and every other node by its concrete value."""
    def sub(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return index if a is via else concrete(a)
        if isinstance(a, (list, tuple)):
            out = [sub(x) for x in a]
            return type(a)(out) if not hasattr(a, "_fields") else type(a)(*out)
        if isinstance(a, dict):
            return {k: sub(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(sub(a.start), sub(a.stop), sub(a.step))
        return a
    return sub(value)


def is_getitem(node: torch.fx.Node) -> bool:
    """True for ``operator.getitem`` (tuple / list indexing in the graph)."""
    return node.op == "call_function" and node.target is operator.getitem


class GraphReader(abc.ABC):
    """Base of the two readers: shapes and concrete values come from the subclass, rules are built here."""

    @abc.abstractmethod
    def shape(self, node: torch.fx.Node) -> tuple[int, ...] | None:
        """Concrete shape of the tensor ``node`` produces, if known."""

    @abc.abstractmethod
    def concrete(self, node: torch.fx.Node) -> Any:
        """The value of a non-tensor node (a size, a shape); raises NotConcrete when unknown."""

    @abc.abstractmethod
    def describe(self, node: torch.fx.Node) -> str:
        """Short human description for reasons."""

    @abc.abstractmethod
    def holds_tensor(self, node: torch.fx.Node) -> bool:
        """True when ``node`` produces a tensor (as opposed to a size or another Python value)."""

    @abc.abstractmethod
    def run(self, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
        """Run ``node``'s op on the given (substituted) arguments."""

    def lends_shape_only(self, node: torch.fx.Node) -> bool:
        """True for ops whose second argument only lends its shape or dtype (``view_as``, ``expand_as``...)."""
        return False

    def move(self, node: torch.fx.Node, via: torch.fx.Node, label: str) -> Rule:
        """Data movement: the same op, run on the index tensor, says where each channel lands."""
        if not self.lends_shape_only(node):
            for other in flat_nodes((node.args, node.kwargs)):
                if other is not via and self.holds_tensor(other):
                    # a tensor argument that holds values (an index tensor): not plain data movement
                    return self.block(label, f"{label} reads the BatchNorm output together with the tensor "
                                             f"{other.name}")

        def apply(index: Any) -> Any:
            return self.run(node, substitute(node.args, via, index, self.concrete),
                            substitute(node.kwargs, via, index, self.concrete))
        return Rule("move", label, apply=apply)

    @staticmethod
    def identity(label: str) -> Rule:
        """An op that leaves every value where it is (Dropout in eval, a no-op cast or pad)."""
        return Rule("move", label, apply=lambda i: i)

    def pool(self, node: torch.fx.Node, via: torch.fx.Node, label: str, k: int | None, *, nonneg: bool = False,
             keeps_shift: bool = True, shift_why: str = "", axes: tuple[int, ...] | None = None,
             keepdim: bool = True, wrap: int = 0) -> Rule:
        """A per-channel combination over ``axes`` (default: the last ``k`` axes, or all but N and C)."""
        if axes is None:
            if k is not None:
                axes = tuple(range(-k, 0))
            else:
                in_shape = self.shape(via)
                if in_shape is None:
                    return self.block(label, f"the shape reaching {label} is unknown (pass example_inputs)")
                axes = tuple(range(2, len(in_shape)))
        return Rule("pool", label, axes=axes, out_shape=self.shape(node), keepdim=keepdim, nonneg_scale=nonneg,
                    keeps_shift=keeps_shift, shift_why=shift_why, wrap_tuple=wrap)

    @staticmethod
    def block(label: str, reason: str | None = None, *, activation: str = "") -> Rule:
        """An op the affine does not pass through; the reason names it."""
        return Rule("block", label, reason=reason or f"{label} reads it and does not carry a per-channel affine",
                    activation=activation)
