"""Recover a model's dataflow: torch.fx first, torch.export (non-strict) when fx fails.

Passes analyse the graph and edit the modules. The graph answers the questions
a rewrite must get right: which module feeds which, how many users a tensor
has, how often a module is called, whether a parameter is read outside its
module, and (with example inputs) the shape of every tensor.

Both sources are normalised into the same small structure, :class:`ModelGraph`
of :class:`GNode`: a node is a module call (with the module's dotted path), a
function/method call, a graph input, a parameter read, or the output.

* **torch.fx** ``symbolic_trace`` with a tracer that keeps every normalization
  module (BatchNorm and its subclasses, torchvision's FrozenBatchNorm2d,
  GroupNorm, LayerNorm, ...) and every Conv/Linear subclass as a leaf, so a
  subclass with its own ``forward`` is seen as the module it is instead of the
  ops it happens to call.
* **torch.export** (``strict=False``) when symbolic tracing fails (data-dependent
  control flow, Hugging Face models). ATen nodes are mapped back to module paths
  through ``nn_module_stack``: consecutive ATen nodes whose innermost module is
  the same leaf call collapse into one module node.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from normfold.errors import InputError, TraceError

__all__ = ["GNode", "ModelGraph", "build_graph", "is_norm_module", "is_leaf_type", "describe_node", "eval_mode",
           "module_path", "innermost_module_path"]

log = logging.getLogger(__name__)

_CONV_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)


def is_frozen_batchnorm(m: nn.Module) -> bool:
    """torchvision's FrozenBatchNorm2d (and look-alikes): BN buffers, no parameters."""
    return type(m).__name__ in {"FrozenBatchNorm2d", "FrozenBatchNormAct2d"} and all(
        hasattr(m, a) for a in ("weight", "bias", "running_mean", "running_var")
    )


def is_norm_module(m: nn.Module) -> bool:
    """True for every normalization layer normfold knows (kept as a graph leaf)."""
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)):
        return True
    if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
        return True
    if is_frozen_batchnorm(m):
        return True
    # timm norm layers that do not subclass a torch norm (LayerNorm2d does; these don't)
    return type(m).__name__ in {"RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d", "FrozenBatchNorm2d"}


def is_leaf_type(m: nn.Module) -> bool:
    """Modules the tracer must not trace into."""
    return is_norm_module(m) or isinstance(m, _CONV_LINEAR)


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_leaf_type(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass(eq=False)
class GNode:
    """One node of the normalised dataflow graph.

    ``op`` is one of ``input``, ``module``, ``function``, ``method``, ``attr``,
    ``output``. For ``module`` and ``attr`` nodes ``target`` is the dotted
    path; for ``function``/``method`` it is the callable or the method name.
    ``args`` are the nodes this one reads (in order); ``users`` the nodes that
    read it. ``shape`` is known when the graph was built with example inputs.
    """

    name: str
    op: str
    target: Any
    args: list["GNode"] = field(default_factory=list)
    users: list["GNode"] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    fx_node: torch.fx.Node | None = None
    const_args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"GNode({self.op}:{self.target if isinstance(self.target, str) else getattr(self.target, '__name__', self.target)})"


class ModelGraph:
    """The dataflow of one model, from torch.fx or torch.export."""

    def __init__(self, root: nn.Module, nodes: list[GNode] | Callable[[], list[GNode]], source: str,
                 graph_module: torch.fx.GraphModule | None = None, fx_error: str | None = None,
                 *, fx_graph: torch.fx.Graph | None = None) -> None:
        self.root = root
        #: the GNode list, or the function that builds it on first use (a fold that reads the fx graph
        #: directly never pays for the conversion)
        self._nodes: list[GNode] | None = None if callable(nodes) else nodes
        self._build_nodes = nodes if callable(nodes) else None
        self.source = source
        self._graph_module = graph_module
        #: a traced torch.fx Graph whose GraphModule is only built when someone asks for it
        self._fx_graph = fx_graph
        self.fx_error = fx_error
        self._calls: dict[str, list[GNode]] | None = None
        self._attr_reads: dict[str, list[GNode]] | None = None
        self._modules: dict[str, nn.Module] | None = None
        self._shapes_done = False
        self._fx_call_counts: dict[str, int] | None = None
        self._fx_attr_reads: list[str] | None = None
        #: example inputs kept for :meth:`ensure_shapes` when shapes were not propagated at build time
        self.example_inputs: tuple | None = None

    @property
    def nodes(self) -> list[GNode]:
        """The normalised nodes, in graph order."""
        if self._nodes is None:
            self._nodes = self._build_nodes()
        return self._nodes

    @property
    def calls(self) -> dict[str, list[GNode]]:
        """Module path -> its call nodes."""
        if self._calls is None:
            self._calls = {}
            for n in self.nodes:
                if n.op == "module":
                    self._calls.setdefault(n.target, []).append(n)
        return self._calls

    @property
    def attr_reads(self) -> dict[str, list[GNode]]:
        """Parameter / buffer path -> the nodes that read it outside a module call."""
        if self._attr_reads is None:
            self._attr_reads = {}
            for n in self.nodes:
                if n.op == "attr":
                    self._attr_reads.setdefault(n.target, []).append(n)
        return self._attr_reads

    @attr_reads.setter
    def attr_reads(self, value: dict[str, list[GNode]]) -> None:
        self._attr_reads = value

    @property
    def modules(self) -> dict[str, nn.Module]:
        """Every submodule by path, as the model was when the graph was built."""
        if self._modules is None:
            self._modules = dict(self.root.named_modules())
        return self._modules

    @property
    def graph_module(self) -> torch.fx.GraphModule | None:
        """The torch.fx GraphModule (None for a torch.export graph), built on first use.

        Building it generates and compiles Python code, a third of the cost of
        tracing; a pass that only reads the dataflow never pays it.
        """
        if self._graph_module is None and self._fx_graph is not None:
            self._graph_module = torch.fx.GraphModule(self.root, self._fx_graph, class_name=type(self.root).__name__)
        return self._graph_module

    @graph_module.setter
    def graph_module(self, gm: torch.fx.GraphModule | None) -> None:
        self._graph_module = gm

    @property
    def fx_graph(self) -> torch.fx.Graph | None:
        """The traced torch.fx Graph, without building a GraphModule (None for a torch.export graph)."""
        if self._fx_graph is not None:
            return self._fx_graph
        return self._graph_module.graph if self._graph_module is not None else None

    @property
    def has_graph_module(self) -> bool:
        """True once :attr:`graph_module` has been built (it then holds its own submodule references)."""
        return self._graph_module is not None

    def ensure_shapes(self, example_inputs: Any = None) -> bool:
        """Fill in node shapes now (one forward pass) if they are missing; True when they are known.

        ``build_graph(..., shapes=False)`` defers this forward pass, which costs
        as much as running the model, to the passes that actually need a shape.
        """
        if self._graph_module is None and self._fx_graph is None:  # torch.export graphs always carry shapes
            return True
        if self._shapes_done:
            return True
        inputs = as_input_tuple(example_inputs) or self.example_inputs
        if not inputs:
            return False
        _propagate_shapes(self.root, self.graph_module, inputs)
        self._shapes_done = True
        if self._nodes is not None:  # nodes built later copy the shapes themselves
            for n in self._nodes:
                if n.fx_node is not None:
                    _copy_tensor_meta(n, n.fx_node)
        return True

    def module(self, node: GNode) -> nn.Module:
        return self.modules[node.target]

    def call_count(self, path: str) -> int:
        """How many times forward() calls module ``path``."""
        if self._calls is None and self._fx_graph is not None:
            if self._fx_call_counts is None:
                counts: dict[str, int] = {}
                for n in self._fx_graph.nodes:
                    if n.op == "call_module":
                        counts[n.target] = counts.get(n.target, 0) + 1
                self._fx_call_counts = counts
            return self._fx_call_counts.get(path, 0)
        return len(self.calls.get(path, []))

    def module_nodes(self) -> Iterator[GNode]:
        return (n for n in self.nodes if n.op == "module")

    def external_param_reads(self, path: str) -> list[str]:
        """Parameters/buffers of module ``path`` read by the graph outside a call of that module."""
        prefix = path + "."
        if self._attr_reads is None and self._fx_graph is not None:
            if self._fx_attr_reads is None:
                self._fx_attr_reads = sorted({n.target for n in self._fx_graph.nodes if n.op == "get_attr"})
            return [t for t in self._fx_attr_reads if t.startswith(prefix) or t == path]
        return [t for t in self.attr_reads if t.startswith(prefix) or t == path]


def describe_node(graph: ModelGraph, node: GNode) -> str:
    """A short human description of what produced a tensor, for skip reasons."""
    if node.op == "input":
        return "the model input"
    if node.op == "module":
        m = graph.modules.get(node.target)
        kind = type(m).__name__ if m is not None else "module"
        return f"{node.target} ({kind})"
    if node.op == "attr":
        return f"the parameter {node.target}"
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    return f"a call to {name}"


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval, so a forward cannot update BN statistics."""
    flags = {n: m.training for n, m in module.named_modules()}
    module.eval()
    try:
        yield
    finally:
        for n, m in module.named_modules():
            if n in flags:
                m.training = flags[n]


def as_input_tuple(example_inputs: Any) -> tuple:
    """Example inputs as the positional-argument tuple of a forward call (None -> (), a tensor -> (tensor,))."""
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def build_graph(model: nn.Module, example_inputs: Any = None, *, allow_export: bool = True,
                shapes: bool = True) -> ModelGraph:
    """Trace ``model`` and return its normalised dataflow graph.

    ``example_inputs`` (a tensor or a tuple of positional arguments) adds shapes
    to the nodes and makes the torch.export fallback possible. With
    ``shapes=False`` the shape-propagating forward pass of a torch.fx graph is
    deferred to :meth:`ModelGraph.ensure_shapes` (the inputs are kept for it).
    Raises :class:`TraceError` saying why when neither tracer works.
    """
    inputs = as_input_tuple(example_inputs)
    try:
        try:
            graph = _LeafTracer().trace(model)
        finally:
            scrub_proxies(model)
    except Exception as exc:  # symbolic tracing fails on data-dependent control flow and more
        fx_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log.info("torch.fx could not trace %s (%s); trying torch.export", type(model).__name__, fx_error)
        if not allow_export:
            raise TraceError(f"torch.fx could not trace the model ({fx_error})") from exc
        if not inputs:
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__} ({fx_error}); pass example_inputs "
                "(or --input-shape) so that torch.export can trace it instead"
            ) from exc
        return _graph_from_export(model, inputs, fx_error)
    mg = _graph_from_fx(model, graph)
    mg.example_inputs = inputs or None
    if inputs and shapes:
        mg.ensure_shapes()
    return mg


#: the attributes nn.Module.__init__ creates
_MODULE_DICTS = frozenset(nn.Module().__dict__)


def scrub_proxies(model: nn.Module) -> None:
    """Drop torch.fx Proxies that forward() cached in module dicts while being traced.

    timm's LeViT caches ``attention_biases[:, idxs]`` in a dict in eval mode;
    traced, the cache keeps a Proxy of that graph, which a second trace then
    reads back as a node of another graph (and the user's model would carry it).
    """
    for m in model.modules():
        for key, value in list(vars(m).items()):
            # nn.Module's own dicts (parameters, buffers, submodules, hooks) hold no Proxy: skip them
            if key not in _MODULE_DICTS and isinstance(value, dict) and value:
                for k in [k for k, v in value.items() if isinstance(v, torch.fx.Proxy) or isinstance(k, torch.fx.Proxy)]:
                    del value[k]


def _propagate_shapes(model: nn.Module, gm: torch.fx.GraphModule, inputs: tuple) -> None:
    try:
        with eval_mode(model), torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:
        raise InputError(
            f"the example inputs do not fit the model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "pass inputs of the shape the model expects (--input-shape)"
        ) from exc


def _copy_tensor_meta(g: "GNode", n: torch.fx.Node) -> None:
    tm = n.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        g.shape = tuple(tm.shape)
        g.dtype = tm.dtype


def _tensor_nodes(value: Any) -> list[torch.fx.Node]:
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(value, lambda n: out.append(n))
    return out


def _graph_from_fx(model: nn.Module, fx_graph: torch.fx.Graph) -> ModelGraph:
    return ModelGraph(model, lambda: _nodes_from_fx(fx_graph), "fx", fx_graph=fx_graph)


def _nodes_from_fx(fx_graph: torch.fx.Graph) -> list[GNode]:
    by_fx: dict[torch.fx.Node, GNode] = {}
    nodes: list[GNode] = []
    for n in fx_graph.nodes:
        op = {"placeholder": "input", "call_module": "module", "call_function": "function",
              "call_method": "method", "get_attr": "attr", "output": "output"}[n.op]
        g = GNode(name=n.name, op=op, target=n.target, fx_node=n)
        _copy_tensor_meta(g, n)
        g.args = [by_fx[a] for a in _tensor_nodes((n.args, n.kwargs)) if a in by_fx]
        g.const_args = tuple(a for a in n.args if not isinstance(a, torch.fx.Node))
        g.kwargs = dict(n.kwargs)
        by_fx[n] = g
        nodes.append(g)
    for g in nodes:
        for a in g.args:
            if g not in a.users:
                a.users.append(g)
    return nodes


# ----------------------------------------------------------------------------------------------
# torch.export fallback


def _innermost_leaf(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[str, str] | None:
    """(module path, call key) of the innermost leaf module an ATen node belongs to."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for key, value in reversed(list(stack.items())):
        path = value[0] if isinstance(value, (tuple, list)) else value
        path = module_path(str(path))
        m = modules.get(path)
        if m is not None and is_leaf_type(m):
            return path, str(key)
    return None


def module_path(path: str) -> str:
    """A dotted module path from an ``nn_module_stack`` entry (``"L['self'].layer1.0"``, ``"L__self__.x"``...)."""
    for prefix in ("L['self'].", "L__self__.", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    path = path.replace("['", ".").replace("']", "").replace("[", ".").replace("]", "")
    return path.strip(".")


def innermost_module_path(node: torch.fx.Node) -> str | None:
    """The dotted path of the innermost module an exported ATen node was recorded in, if any."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    value = list(stack.values())[-1]
    return module_path(str(value[0] if isinstance(value, (tuple, list)) else value))


def _graph_from_export(model: nn.Module, inputs: tuple, fx_error: str) -> ModelGraph:
    try:
        with eval_mode(model):
            ep = torch.export.export(model, inputs, strict=False)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TraceError(
            f"neither torch.fx ({fx_error}) nor torch.export ({type(exc).__name__}: {msg}) could trace "
            f"{type(model).__name__}; check that the example inputs are what forward() takes, or fold "
            "an ExportedProgram (.pt2) instead"
        ) from exc
    modules = dict(model.named_modules())
    sig = ep.graph_signature
    param_of = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    user_inputs = set(sig.user_inputs)
    nodes: list[GNode] = []
    # fx node -> GNode that produces its value (several ATen nodes map to one module node)
    value_of: dict[torch.fx.Node, GNode] = {}
    current: GNode | None = None
    current_key: tuple[str, str] | None = None
    current_members: set[torch.fx.Node] = set()

    def add(g: GNode) -> GNode:
        nodes.append(g)
        return g

    for n in ep.graph.nodes:
        if n.op == "placeholder":
            if n.name in param_of:
                g = add(GNode(name=n.name, op="attr", target=param_of[n.name], fx_node=n))
            elif n.name in user_inputs or True:
                g = add(GNode(name=n.name, op="input", target=n.name, fx_node=n))
            value_of[n] = g
            continue
        if n.op == "output":
            g = add(GNode(name="output", op="output", target="output", fx_node=n))
            g.args = [value_of[a] for a in _tensor_nodes(n.args) if a in value_of]
            continue
        leaf = _innermost_leaf(n, modules)
        reads = [a for a in _tensor_nodes((n.args, n.kwargs))]
        if leaf is not None:
            if current is not None and current_key == leaf:
                current_members.add(n)
                value_of[n] = current
                ins = [value_of[a] for a in reads if a in value_of and a not in current_members
                       and value_of[a] is not current and value_of[a].op != "attr"]
                for i in ins:
                    if i not in current.args:
                        current.args.append(i)
                _set_shape(current, n)
                continue
            g = add(GNode(name=n.name, op="module", target=leaf[0], fx_node=n))
            g.args = [value_of[a] for a in reads if a in value_of and value_of[a].op != "attr"]
            _set_shape(g, n)
            value_of[n] = g
            current, current_key, current_members = g, leaf, {n}
            continue
        current, current_key, current_members = None, None, set()
        g = add(GNode(name=n.name, op="function", target=n.target, fx_node=n))
        g.args = [value_of[a] for a in reads if a in value_of]
        _set_shape(g, n)
        value_of[n] = g
    for g in nodes:
        for a in g.args:
            if g not in a.users:
                a.users.append(g)
    graph = ModelGraph(model, nodes, "export", graph_module=None, fx_error=fx_error)
    # Inside a module's own call, reads of its own parameters are not "external".
    graph.attr_reads = {}
    return graph


def _set_shape(g: GNode, n: torch.fx.Node) -> None:
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            g.shape = tuple(int(s) for s in val.shape)
        except Exception:  # symbolic sizes
            g.shape = None
        g.dtype = val.dtype
