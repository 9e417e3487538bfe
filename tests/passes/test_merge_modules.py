"""merge_modules: a merged block that computes a chain comes back as nn.Sequential of the very modules.

Each case is merged twice: as the pass returns it, and with the GraphModule the merge wrote kept
(merged_block_module replaced by the identity). The two must give equal outputs bit for bit
(torch.equal: same ops, same order, same tensors), and the result must pass nf.verify against the
original, unmerged model. Blocks that are not chains keep the GraphModule. Then the safe format: timm
Rep* models whose merged blocks became Sequentials save as safetensors + recipe and load back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normfold as nf
import normfold.passes.merge_branches as merge_branches_module
from normfold.io import load_model, save_model
from normfold.passes.merge_branches import merge_branches
from tests.conftest import randomize_bn_stats
from tests.passes.test_merge_branches import MobileOneStyle, Net, RepVGGBlock, _convbn, _prepare, _x


class SE(nn.Module):
    """Squeeze-excite written out: a mean, two 1x1 convs, a ReLU module, a functional sigmoid, a product."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class Branchy(nn.Module):
    """3x3 conv+BN + 1x1 conv+BN + identity BN, then ``tail(block, sum, x)``: what runs after the add."""

    def __init__(self, tail: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor], c: int = 8) -> None:
        super().__init__()
        self.dense = _convbn(c, c, 3, padding=1)
        self.pointwise = _convbn(c, c, 1)
        self.identity = nn.BatchNorm2d(c)
        self.se = SE(c)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.linspace(-1.0, 2.0, c).reshape(c, 1, 1))
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self, self.dense(x) + self.pointwise(x) + self.identity(x), x)


def _both(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, nn.Module]:
    """(the pass's result, the result with the merge's GraphModules kept), both from ``model`` untouched."""
    plain = merge_branches(model).module
    with monkeypatch.context() as m:
        m.setattr(merge_branches_module, "merged_block_module", lambda gm, block=None: gm)
        graph = merge_branches(model).module
    return plain, graph


def _outputs_equal_and_verified(got: nn.Module, graph: nn.Module, original: nn.Module, x: tuple) -> None:
    with torch.no_grad():
        assert torch.equal(got(*x), graph(*x)), "the Sequential and the GraphModule differ"
    v = nf.verify(original, got, x)
    assert v.passed, v


def test_a_chain_block_becomes_a_sequential_of_its_own_modules_under_their_names(monkeypatch):
    model = _prepare(Net(RepVGGBlock(8, 8), RepVGGBlock(8, 8, stride=2), MobileOneStyle(8)))
    x = _x(2, 3, 12, 12)
    got, graph = _both(model, monkeypatch)
    for i in range(3):
        block = got.body[i]
        assert type(block) is nn.Sequential and list(block._modules) == ["merged_conv", "act"]
        assert isinstance(graph.body[i], torch.fx.GraphModule)
    assert type(got) is Net  # the outer class stays
    assert {"body.0.merged_conv.weight", "body.0.merged_conv.bias", "body.2.merged_conv.weight"} \
        <= set(got.state_dict())
    _outputs_equal_and_verified(got, graph, model, x)

    # the very objects: with inplace=True the user's activation module is the one the Sequential holds
    act = model.body[0].act
    r = merge_branches(model, inplace=True)
    assert r.module.body[0].act is act


@pytest.mark.parametrize("tail, name, cls, attrs", [
    (lambda b, y, x: F.relu(y), "relu", nn.ReLU, {"inplace": False}),
    (lambda b, y, x: F.relu(y, inplace=True), "relu", nn.ReLU, {"inplace": True}),
    (lambda b, y, x: torch.relu(y), "relu", nn.ReLU, {}),
    (lambda b, y, x: y.relu(), "relu", nn.ReLU, {}),
    (lambda b, y, x: F.gelu(y, approximate="tanh"), "gelu", nn.GELU, {"approximate": "tanh"}),
    (lambda b, y, x: F.gelu(y), "gelu", nn.GELU, {"approximate": "none"}),
    (lambda b, y, x: F.silu(y), "silu", nn.SiLU, {}),
    (lambda b, y, x: torch.sigmoid(y), "sigmoid", nn.Sigmoid, {}),
    (lambda b, y, x: y.sigmoid(), "sigmoid", nn.Sigmoid, {}),
    (lambda b, y, x: torch.tanh(y), "tanh", nn.Tanh, {}),
    (lambda b, y, x: F.hardswish(y), "hardswish", nn.Hardswish, {}),
    (lambda b, y, x: F.hardsigmoid(y), "hardsigmoid", nn.Hardsigmoid, {}),
    (lambda b, y, x: F.dropout(y, 0.3, b.training), "dropout", nn.Identity, {}),  # traced in eval: the identity
    (lambda b, y, x: F.dropout2d(y, 0.0, True), "dropout2d", nn.Identity, {}),  # p = 0: the identity
], ids=["F.relu", "F.relu-inplace", "torch.relu", "x.relu", "gelu-tanh", "gelu", "silu", "torch.sigmoid",
        "x.sigmoid", "tanh", "hardswish", "hardsigmoid", "dropout-eval", "dropout2d-p0"])
def test_a_function_after_the_add_becomes_its_nn_module(tail, name: str, cls: type, attrs: dict[str, Any],
                                                        monkeypatch):
    model = _prepare(Net(Branchy(tail)))
    x = _x(2, 3, 10, 10)
    got, graph = _both(model, monkeypatch)
    block = got.body[0]
    assert type(block) is nn.Sequential and list(block._modules) == ["merged_conv", name]
    assert type(block[1]) is cls and all(getattr(block[1], k) == v for k, v in attrs.items())
    _outputs_equal_and_verified(got, graph, model, x)


def test_a_child_that_ran_whole_is_taken_whole_under_its_name(monkeypatch):
    """An SE traced through (its nodes inlined in the block's graph) comes back as the user's SE module."""
    model = _prepare(Net(Branchy(lambda b, y, x: b.act(b.se(y)))))
    x = _x(2, 3, 10, 10)
    got, graph = _both(model, monkeypatch)
    block = got.body[0]
    assert type(block) is nn.Sequential and list(block._modules) == ["merged_conv", "se", "act"]
    assert type(block.se) is SE and isinstance(block.act, nn.GELU)
    assert {"body.0.se.fc1.weight", "body.0.se.fc2.bias"} <= set(got.state_dict())
    _outputs_equal_and_verified(got, graph, model, x)
    se = model.body[0].se
    assert merge_branches(model, inplace=True).module.body[0].se is se


@pytest.mark.parametrize("tail", [
    lambda b, y, x: b.act(y) + x,  # a residual outside the merge: a second read of the input
    lambda b, y, x: b.act(y) * b.gamma,  # a parameter of the block read outside a child module
    lambda b, y, x: b.act(b.act(y)),  # a module called twice
    lambda b, y, x: b.se(b.se(y)),  # a child called twice
    lambda b, y, x: F.leaky_relu(y, 0.2),  # a function with no mapping here
    lambda b, y, x: F.relu(y) * y,  # two values of the chain meet
], ids=["residual", "parameter", "module-twice", "child-twice", "unmapped-function", "two-values"])
def test_what_is_not_a_chain_keeps_the_graph_module(tail, monkeypatch):
    model = _prepare(Net(Branchy(tail)))
    x = _x(2, 3, 10, 10)
    r = merge_branches(model)
    assert r.changes, r.skipped  # merged, kept as the merge wrote it
    assert isinstance(r.module.body[0], torch.fx.GraphModule)
    v = nf.verify(model, r.module, x)
    assert v.passed, v


def _residual_net() -> nn.Module:
    return Net(Branchy(_residual_tail))


def _residual_tail(b: nn.Module, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return b.act(y) + x


def test_a_block_that_stays_a_graph_module_is_refused_by_the_safe_format_with_its_one_line(tmp_path: Path):
    src = tmp_path / "model.pt"
    torch.save(_prepare(_residual_net()).state_dict(), src)
    loaded = load_model(src, arch=f"{__name__}:_residual_net")
    r = merge_branches(loaded.module.eval())
    assert isinstance(r.module.body[0], torch.fx.GraphModule)
    with pytest.raises(nf.NormfoldError, match=r"GraphModule.*--pickle"):
        save_model(r.module, tmp_path / "out.safetensors", source=loaded)


@pytest.mark.parametrize("name", ["repvgg_a0", "fastvit_t8", "repvit_m0_9"])
def test_timm_rep_models_merged_save_as_safetensors_and_load_back(name: str, tmp_path: Path):
    """fold + merge, every merged block a Sequential, written without pickling and read back equal.

    (mobileone_s0 goes through the command line in test_fold_merge.py.)
    """
    import timm

    original = randomize_bn_stats(timm.create_model(name, pretrained=False), 0).eval()
    src = tmp_path / "model.pt"
    torch.save(original.state_dict(), src)
    loaded = load_model(src, arch=f"timm:{name}")
    loaded.module.eval()
    x = _x(1, 3, 64, 64)
    r = nf.fold_batchnorm(loaded.module, example_inputs=x, merge_branches=True)
    assert any(c.action == "merge_branches" for c in r.changes)
    assert not any(isinstance(m, torch.fx.GraphModule) for m in r.module.modules())
    assert any(type(m) is nn.Sequential and "merged_conv" in m._modules for m in r.module.modules())
    out = save_model(r.module, tmp_path / "model.safetensors", source=loaded)
    back = nf.load(out, arch=f"timm:{name}")
    assert type(back) is type(original)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in back.modules())
    assert back.state_dict().keys() == r.module.state_dict().keys()
    v = nf.verify(original, back, x)
    assert v.passed, v


def test_a_child_with_hooks_is_not_taken():
    """The block's trace went through the SE without its hook; a Sequential calling the SE would run it."""
    model = _prepare(Net(Branchy(lambda b, y, x: b.act(b.se(y)))))
    calls: list[int] = []
    model.body[0].se.register_forward_hook(lambda m, a, o: calls.append(1))
    r = merge_branches(model)
    assert r.changes and isinstance(r.module.body[0], torch.fx.GraphModule)
