"""normfold.graph: the dataflow passes analyse, from torch.fx or (fallback) torch.export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normfold.errors import InputError, NormfoldError, TraceError
from normfold.graph import build_graph, describe_node, eval_mode, is_leaf_type, is_norm_module


class Simple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = F.relu(y) + y  # y has two users
        return self.fc(z.mean((2, 3)))


class Branchy(Simple):
    """Shape-dependent control flow: symbolic tracing fails, torch.export does not."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        if x.shape[-1] > 2:
            y = self.bn(y)  # the BatchNorm is called twice
        return self.fc(y.mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def _module_node(graph, path):
    (node,) = graph.calls[path]
    return node


def test_fx_graph_dataflow() -> None:
    graph = build_graph(Simple().eval(), X)
    assert graph.source == "fx" and graph.graph_module is not None
    conv, bn, fc = (_module_node(graph, p) for p in ("conv", "bn", "fc"))
    assert bn.args == [conv] and conv.users == [bn]
    assert len(bn.users) == 2  # relu and add
    assert graph.call_count("bn") == 1 and graph.call_count("missing") == 0
    assert conv.shape == (2, 4, 6, 6) and fc.shape == (2, 2) and conv.dtype == torch.float32
    assert describe_node(graph, conv) == "conv (Conv2d)"
    assert describe_node(graph, graph.nodes[0]) == "the model input"
    assert graph.external_param_reads("conv") == []


def test_shapes_are_deferred_until_needed() -> None:
    model = Simple().eval()
    graph = build_graph(model, X, shapes=False)
    conv = _module_node(graph, "conv")
    assert conv.shape is None
    assert graph.ensure_shapes() and conv.shape == (2, 4, 6, 6)
    # without inputs nothing can be propagated
    graph = build_graph(model, shapes=False)
    assert graph.ensure_shapes() is False and _module_node(graph, "conv").shape is None
    assert graph.ensure_shapes(X) and _module_node(graph, "conv").shape == (2, 4, 6, 6)


def test_parameter_read_outside_its_module_is_seen() -> None:
    class Reads(Simple):
        def forward(self, x):
            return self.fc(self.bn(self.conv(x)).mean((2, 3))) * self.conv.weight.mean()

    graph = build_graph(Reads().eval(), X)
    assert graph.external_param_reads("conv") == ["conv.weight"]
    assert graph.external_param_reads("bn") == []


def test_norm_subclasses_and_conv_subclasses_stay_leaves() -> None:
    timm_layers = pytest.importorskip("timm.layers")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = timm_layers.Conv2dSame(3, 4, 3, stride=2)
            self.bn = timm_layers.BatchNormAct2d(4)
            self.frozen = __import__("torchvision").ops.misc.FrozenBatchNorm2d(4)
            self.gn = nn.GroupNorm(2, 4)

        def forward(self, x):
            return self.gn(self.frozen(self.bn(self.conv(x))))

    model = Net().eval()
    graph = build_graph(model, X)
    assert [n.target for n in graph.module_nodes()] == ["conv", "bn", "frozen", "gn"]
    assert all(is_leaf_type(m) for m in (model.conv, model.bn, model.frozen, model.gn))
    assert is_norm_module(model.frozen) and not is_norm_module(model.conv)


def test_export_fallback_maps_aten_nodes_to_modules() -> None:
    model = Branchy().eval()
    graph = build_graph(model, X)
    assert graph.source == "export" and graph.graph_module is None
    assert "symbolically traced variables" in graph.fx_error
    assert graph.call_count("conv") == 1 and graph.call_count("bn") == 2 and graph.call_count("fc") == 1
    conv = _module_node(graph, "conv")
    first_bn, second_bn = graph.calls["bn"]
    assert first_bn.args == [conv] and conv.users == [first_bn]
    assert second_bn.args == [first_bn]
    assert conv.shape == (2, 4, 6, 6)


def test_export_fallback_needs_inputs_and_says_so() -> None:
    with pytest.raises(TraceError, match=r"pass example_inputs \(or --input-shape\)") as info:
        build_graph(Branchy().eval())
    assert isinstance(info.value, NormfoldError) and "Branchy" in str(info.value)
    with pytest.raises(TraceError, match="torch.fx could not trace"):
        build_graph(Branchy().eval(), X, allow_export=False)


def test_neither_tracer_works() -> None:
    with pytest.raises(TraceError, match=r"neither torch.fx .* nor torch.export .*example inputs"):
        build_graph(Branchy().eval(), torch.randn(2, 5, 8, 8))  # 5 channels: the conv takes 3


def test_inputs_that_do_not_fit_are_an_input_error() -> None:
    with pytest.raises(InputError, match="do not fit the model"):
        build_graph(Simple().eval(), torch.randn(2, 5, 8, 8))


def test_build_graph_does_not_change_training_flags_or_statistics() -> None:
    model = Simple().train()
    model.conv.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    stats = model.bn.running_mean.clone()
    build_graph(model, X)
    build_graph(Branchy().train(), X)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert torch.equal(model.bn.running_mean, stats) and int(model.bn.num_batches_tracked) == 0


def test_eval_mode_restores_flags_after_an_error() -> None:
    model = Simple().train()
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    assert all(m.training for m in model.modules())
