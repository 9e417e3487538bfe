"""What a merged block becomes in the user's model (see :mod:`normfold.passes.merge_branches`).

The model that comes back: the outer class stays; each block whose branches
merged (the innermost module whose ``forward`` holds the whole region) gives
way, at its path, to the merged conv and whatever came after the add
(activation, SE, ...). When the merged block computes a chain,

    y = f_n( ... f_2(f_1(x)) ... )

(one input; every step reads only the value before it, plus constants), the
block becomes ``nn.Sequential(OrderedDict(...))`` of the steps, which computes
the same composition in the same order: the state_dict keys read
``<block>.merged_conv.weight``, ``<block>.se.fc1.weight`` and the safe weights
format (safetensors + recipe, :mod:`normfold.recipe`) can save and rebuild it:
the Sequential and ``merged_conv`` are ``torch.nn`` classes, and the block's
own children (``act``, ``se``) are the fresh build's, moved under it (the
recipe's ``take`` edit).
A step is

* a module the block called once (``merged_conv``, ``act``): the very object,
  under its attribute name;
* a whole call of one of the block's children that the trace went through
  (``se``): the user's own child object, taken only when a trace of that child
  alone is node for node the steps the block's trace holds (so a child that
  the merge reached into, or that was called with other arguments, is never
  taken);
* a function or method with an exact ``torch.nn`` equivalent (``F.relu``,
  ``torch.relu``, ``x.relu()`` -> ``nn.ReLU``; ``F.gelu(approximate=...)`` ->
  ``nn.GELU``; ``F.silu``, ``sigmoid``, ``tanh``, ``F.hardswish``,
  ``F.hardsigmoid``; a dropout traced with ``training=False`` or ``p=0`` ->
  ``nn.Identity``), named after the fx node. Each equivalent runs the same
  ATen op with the same arguments, so the outputs are equal bit for bit.

Anything else (a second input, a residual add outside the merge, a parameter
read outside a child module, an argument that has no module equivalent, a
module called twice) keeps the ``torch.fx.GraphModule`` the merge wrote
(class ``Merged<Block>``), which a ``.pt2`` or a pickled file holds. When the
region is in the model's own ``forward``, the whole model is that block.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from normfold.passes.merge_tracer import MergeTracer, timm_notrace

__all__ = ["merged_block_module"]

#: (parameter name, default) after the input, as the function's signature has them
_Params = tuple[tuple[str, Any], ...]


def _dropout_as_module(p: Any, training: Any, inplace: Any) -> nn.Module | None:
    # the trace baked ``training`` in: a dropout traced in eval (or with p=0) is the identity for good
    if isinstance(training, bool) and isinstance(p, (int, float)) and (training is False or p == 0):
        return nn.Identity()
    return None


def _with_inplace(cls: type[nn.Module]) -> Callable[..., nn.Module | None]:
    return lambda inplace: cls(inplace=inplace) if isinstance(inplace, bool) else None


def _gelu(approximate: Any) -> nn.Module | None:
    return nn.GELU(approximate=approximate) if approximate in ("none", "tanh") else None


_INPLACE: _Params = (("inplace", False),)
_DROPOUT: _Params = (("p", 0.5), ("training", True), ("inplace", False))
_ALPHA_DROPOUT: _Params = (("p", 0.5), ("training", False), ("inplace", False))

#: call_function targets -> (the module's factory given the arguments, the arguments after the input)
_FUNCTIONS: dict[Callable[..., Any], tuple[Callable[..., nn.Module | None], _Params]] = {
    F.relu: (_with_inplace(nn.ReLU), _INPLACE),
    torch.relu: (nn.ReLU, ()),
    torch.relu_: (lambda: nn.ReLU(inplace=True), ()),
    F.gelu: (_gelu, (("approximate", "none"),)),
    F.silu: (_with_inplace(nn.SiLU), _INPLACE),
    torch.sigmoid: (nn.Sigmoid, ()),
    F.sigmoid: (nn.Sigmoid, ()),
    torch.tanh: (nn.Tanh, ()),
    F.tanh: (nn.Tanh, ()),
    F.hardswish: (_with_inplace(nn.Hardswish), _INPLACE),
    F.hardsigmoid: (_with_inplace(nn.Hardsigmoid), _INPLACE),
    F.dropout: (_dropout_as_module, _DROPOUT),
    F.dropout1d: (_dropout_as_module, _DROPOUT),
    F.dropout2d: (_dropout_as_module, _DROPOUT),
    F.dropout3d: (_dropout_as_module, _DROPOUT),
    F.alpha_dropout: (_dropout_as_module, _ALPHA_DROPOUT),
    F.feature_alpha_dropout: (_dropout_as_module, _ALPHA_DROPOUT),
}

#: call_method targets (``x.relu()``) -> the same
_METHODS: dict[str, tuple[Callable[..., nn.Module | None], _Params]] = {
    "relu": (nn.ReLU, ()),
    "relu_": (lambda: nn.ReLU(inplace=True), ()),
    "sigmoid": (nn.Sigmoid, ()),
    "tanh": (nn.Tanh, ()),
}


def _function_as_module(node: torch.fx.Node, prev: torch.fx.Node) -> nn.Module | None:
    """The ``torch.nn`` module computing ``node`` (a function of ``prev`` and constants), or None."""
    if node.op == "call_function":
        spec = _FUNCTIONS.get(node.target)  # type: ignore[call-overload]
    elif node.op == "call_method" and isinstance(node.target, str):
        spec = _METHODS.get(node.target)
    else:
        return None
    if spec is None or not node.args or node.args[0] is not prev:
        return None
    factory, params = spec
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if len(rest) > len(params):
        return None
    values = {name: rest[i] if i < len(rest) else kwargs.pop(name, default)
              for i, (name, default) in enumerate(params)}
    if kwargs or any(isinstance(v, torch.fx.Node) or _has_node(v) for v in values.values()):
        return None  # an argument the module cannot take, or one computed in the graph
    return factory(*values.values())


def _has_node(value: Any) -> bool:
    found = False

    def visit(n: torch.fx.Node) -> torch.fx.Node:
        nonlocal found
        found = True
        return n

    torch.fx.node.map_arg(value, visit)
    return found


def _scope(node: torch.fx.Node) -> str | None:
    """The key of the outermost module call (below the block) that ``node`` ran in; None for the block's own ops."""
    stack = node.meta.get("nn_module_stack")
    return next(iter(stack)) if stack else None


def _same_value(a: Any, b: Any) -> bool:
    """Equal constants or the same node; tensors only when the same object (no elementwise ==)."""
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node) or isinstance(a, torch.Tensor):
        return a is b
    # fx keeps lists and dicts as its immutable subclasses, in one graph and not the other
    for kind in (tuple, list, dict):
        if isinstance(a, kind) or isinstance(b, kind):
            if not (isinstance(a, kind) and isinstance(b, kind)) or len(a) != len(b):
                return False
            if kind is dict:
                return a.keys() == b.keys() and all(_same_value(v, b[k]) for k, v in a.items())
            return all(map(_same_value, a, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, slice):
        return _same_value((a.start, a.stop, a.step), (b.start, b.stop, b.step))
    try:
        return bool(a == b)
    except Exception:  # a value without a plain ==: different unless the same object
        return a is b


def _whole_child_call(gm: torch.fx.GraphModule, block: nn.Module, name: str, nodes: list[torch.fx.Node],
                      prev: torch.fx.Node) -> nn.Module | None:
    """``block.<name>`` when ``nodes`` are exactly one call of it on ``prev``, else None.

    The child is traced alone with the merge's own tracer; its graph must match ``nodes`` op for op,
    target for target (``<name>.`` prefixed), argument for argument (its one input being ``prev``), and
    every module and tensor it reaches must be the very object ``gm`` holds. Then ``child(prev)`` runs
    the same ops on the same tensors as ``nodes``.
    """

    child = block._modules.get(name)
    # the trace went through the child's forward without its hooks; calling it would run them
    if child is None or any(m._forward_hooks or m._forward_pre_hooks for m in child.modules()):
        return None
    try:
        graph = MergeTracer(*timm_notrace()).trace(child)
    except Exception:  # a child that does not trace alone cannot be checked: keep the GraphModule
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    body = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    output = next(n for n in graph.nodes if n.op == "output")
    if len(placeholders) != 1 or len(body) != len(nodes) or not isinstance(output.args[0], torch.fx.Node):
        return None
    env: dict[torch.fx.Node, torch.fx.Node] = {placeholders[0]: prev}
    for mine, theirs in zip(body, nodes):
        if mine.op != theirs.op:
            return None
        if mine.op in ("call_module", "get_attr"):
            if theirs.target != f"{name}.{mine.target}":
                return None
            try:
                here, there = _fetch(child, str(mine.target)), _fetch(gm, str(theirs.target))
            except AttributeError:
                return None
            if here is not there:
                return None
        elif mine.target != theirs.target:
            return None
        try:
            args, kwargs = torch.fx.node.map_arg((mine.args, mine.kwargs), env.__getitem__)
        except KeyError:  # reads a value from outside the child's call
            return None
        if not _same_value(args, theirs.args) or not _same_value(kwargs, theirs.kwargs):
            return None
        env[mine] = theirs
    return child if env.get(output.args[0]) is nodes[-1] else None


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _chain(gm: torch.fx.GraphModule, block: nn.Module | None) -> list[tuple[str, nn.Module]] | None:
    """The steps of ``gm`` as (name, module), or None when ``gm`` is not a chain of such steps."""
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if len(placeholders) != 1 or len(outputs) != 1 or nodes[0] is not placeholders[0] or nodes[-1] is not outputs[0]:
        return None
    # consecutive nodes run in the same outermost child call form one segment
    segments: list[tuple[str | None, list[torch.fx.Node]]] = []
    for node in nodes[1:-1]:
        key = _scope(node)
        if key is not None and segments and segments[-1][0] == key:
            segments[-1][1].append(node)
        else:
            segments.append((key, [node]))
    keys = [k for k, _ in segments if k is not None]
    if len(set(keys)) != len(keys) or any("@" in k for k in keys):
        return None  # a child called twice (fx keys its later calls "name@1")
    called: dict[int, int] = {}
    for node in nodes:
        if node.op == "call_module":
            obj = gm.get_submodule(str(node.target))
            called[id(obj)] = called.get(id(obj), 0) + 1
    if any(c > 1 for c in called.values()):
        return None
    steps: list[tuple[str, nn.Module]] = []
    prev = placeholders[0]
    for key, seg in segments:
        step = _step(gm, block, key, seg, prev)
        if step is None:
            return None
        steps.append(step)
        prev = seg[-1]
    if outputs[0].args != (prev,) or outputs[0].kwargs:
        return None
    # the chain's own values are read only by the next step (checked per step) and nowhere else
    return steps


def _step(gm: torch.fx.GraphModule, block: nn.Module | None, key: str | None, seg: list[torch.fx.Node],
          prev: torch.fx.Node) -> tuple[str, nn.Module] | None:
    """One segment of the chain as (attribute name, module) reading ``prev``, or None."""
    if len(seg) == 1:
        node = seg[0]
        if node.op == "call_module" and "." not in str(node.target) and key in (None, node.target):
            if node.args != (prev,) or node.kwargs:
                return None
            return str(node.target), gm.get_submodule(str(node.target))
        if key is None:
            module = _function_as_module(node, prev)
            if module is None:
                return None
            module.train(gm.training)
            return node.name, module
    if key is None or block is None or "." in key:
        return None
    child = _whole_child_call(gm, block, key, seg, prev)
    return None if child is None else (key, child)


def merged_block_module(gm: torch.fx.GraphModule, block: nn.Module | None = None) -> nn.Module:
    """The module that takes the merged block's place: an ``nn.Sequential`` of the steps when ``gm`` is a chain.

    ``gm`` is the block as the merge rewrote it (``merged_conv`` in place of the branches);
    ``block`` the original block, whose children the chain may take whole (an SE module). The
    Sequential holds the very module objects under their attribute names, so it computes what
    ``gm`` computes, bit for bit; when ``gm`` is not such a chain it is returned unchanged (see the
    module docstring).
    """
    steps = _chain(gm, block)
    if steps is None:
        return gm
    names = [name for name, _ in steps]
    if len(set(names)) != len(names):
        return gm  # a function's node name equal to a module's attribute name
    sequential = nn.Sequential(OrderedDict(steps))
    sequential.training = gm.training  # the steps keep their own flags, as they had them in gm
    return sequential
