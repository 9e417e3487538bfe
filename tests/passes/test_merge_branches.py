"""merge_branches: each merge rule and each refusal on hand-built blocks, outputs compared with the original.

The blocks are written here from their papers, not taken from timm: a RepVGG block,
ACNet's kxk + 1xk + kx1, DBB's four branches, a RepViT-style depthwise block, a
FastViT-style RepMixer (a subtraction under a layer scale), MobileOne's ``sum`` of
branches. Every BatchNorm gets random statistics (a merge that drops or misplaces
one must fail), every model runs in eval.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import normfold as nf
from normfold.passes.merge_branches import merge_branches
from tests.conftest import (assert_models_close, assert_state_equal, randomize_bn_stats, run_counting_ops,
                            state_snapshot)


def _bn_count(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())


def _conv_count(m: nn.Module) -> int:
    return sum(isinstance(x, nn.modules.conv._ConvNd) for x in m.modules())


def _prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():  # random conv biases too: a dropped or misplaced bias must show
        if isinstance(m, nn.modules.conv._ConvNd) and m.bias is not None:
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return randomize_bn_stats(model, seed).eval()


def _x(*shape: int) -> tuple[torch.Tensor]:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(1)),)


def _convbn(cin: int, cout: int, k, stride: int = 1, padding=0, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    """RepVGG (Ding et al. 2021): 3x3 conv+BN + 1x1 conv+BN + identity BN, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.dense = _convbn(cin, cout, 3, stride, 1, groups)
        self.pointwise = _convbn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class ACBlock(nn.Module):
    """ACNet (Ding et al. 2019): square kxk + horizontal 1xk + vertical kx1, each with its BN."""

    def __init__(self, c: int, k: int = 3) -> None:
        super().__init__()
        self.square = _convbn(c, c, k, padding=k // 2)
        self.hor = _convbn(c, c, (1, k), padding=(0, k // 2))
        self.ver = _convbn(c, c, (k, 1), padding=(k // 2, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.square(x) + self.hor(x) + self.ver(x))


class DBBlock(nn.Module):
    """Diverse Branch Block (Ding et al. 2021): kxk, 1x1, 1x1 -> avg-pool, 1x1 -> kxk, each ending in BN.

    The pointwise convs before the avg-pool and the kxk have no bias and no BN in between, so
    the zero padding of the second op sees what the merged conv sees (DBB pads with the BN
    value instead: :class:`DBBPadBlock`; with a bias here the merge is refused, see the refusal test).
    """

    def __init__(self, c: int, k: int = 3) -> None:
        super().__init__()
        self.origin = _convbn(c, c, k, padding=k // 2)
        self.one = _convbn(c, c, 1)
        self.avg = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.AvgPool2d(k, 1, k // 2), nn.BatchNorm2d(c))
        self.kxk = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, k, 1, k // 2, bias=False),
                                 nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.origin(x) + self.one(x) + self.avg(x) + self.kxk(x)


class RepDW(nn.Module):
    """RepViT's token mixer: depthwise 3x3+BN + depthwise 1x1 + identity, then a BN after the add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = _convbn(c, c, 3, padding=1, groups=c)
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class LayerScale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(-1.0, 2.0, c).reshape(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class RepMixer(nn.Module):
    """FastViT's RepMixer: ``x + gamma * (mixer(x) - norm(x))``, mixer = depthwise conv+BN + identity BN."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.mixer = _convbn(c, c, 3, padding=1, groups=c)
        self.mixer_id = nn.BatchNorm2d(c)
        self.norm = nn.BatchNorm2d(c)
        self.layer_scale = LayerScale(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale((self.mixer(x) + self.mixer_id(x)) - self.norm(x))


class MobileOneStyle(nn.Module):
    """MobileOne: ``out = scale(x) + identity(x); for conv in convs: out += conv(x)`` (a sum over a list)."""

    def __init__(self, c: int, n: int = 3) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.scale = _convbn(c, c, 1)
        self.convs = nn.ModuleList(_convbn(c, c, 3, padding=1) for _ in range(n))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.scale(x) + self.identity(x)
        for conv in self.convs:
            out += conv(x)
        return self.act(out)


class SumOfList(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_convbn(c, c, 3, padding=1), _convbn(c, c, 1), nn.BatchNorm2d(c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum([b(x) for b in self.branches])


class Net(nn.Module):
    """An outer model of the user's own class holding blocks at nested paths."""

    def __init__(self, *blocks: nn.Module, cin: int = 3, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(cin, c, 3, padding=1)
        self.body = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


def _merged(model: nn.Module, inputs: tuple, **kw) -> nf.PassResult:
    """Run the pass, compare outputs with the original, return the result."""
    r = merge_branches(model, **kw)
    assert_models_close(r.module, model, inputs, what="merged")
    return r


# ---------------------------------------------------------------------------------------------- merge rules


def test_repvgg_block_from_scratch_becomes_one_conv_per_block():
    model = _prepare(Net(RepVGGBlock(8, 8), RepVGGBlock(8, 8, stride=2), RepVGGBlock(8, 8)))
    r = _merged(model, _x(2, 3, 16, 16))
    assert type(r.module) is Net  # the user's class stays
    assert _bn_count(r.module) == 0
    assert _conv_count(r.module) == 2 + 3  # stem, head, one conv per block
    assert [c.details["block"] for c in r.changes] == ["body.0", "body.1", "body.2"]
    assert r.changes[0].details["branches"] == 3 and r.changes[1].details["branches"] == 2
    block = r.module.body[1]
    assert isinstance(block, nn.Sequential) and list(block._modules) == ["merged_conv", "act"]  # what came after the add
    assert isinstance(block.act, nn.ReLU)
    assert block.merged_conv.stride == (2, 2) and block.merged_conv.kernel_size == (3, 3)
    assert "body.0.identity" in r.changes[0].paths and not r.skipped


def test_grouped_repvgg_identity_is_a_one_hot_grouped_kernel():
    model = _prepare(Net(RepVGGBlock(8, 8, groups=4)))
    r = _merged(model, _x(2, 3, 12, 12))
    conv = r.module.body[0].merged_conv
    assert conv.groups == 4 and conv.weight.shape == (8, 2, 3, 3)


def test_acnet_asymmetric_kernels_pad_to_the_square():
    model = _prepare(Net(ACBlock(8), ACBlock(8, k=5)))
    r = _merged(model, _x(2, 3, 11, 13))
    assert [c.details["kernel"] for c in r.changes] == [(3, 3), (5, 5)]
    assert _bn_count(r.module) == 0


def test_dbb_four_branches_with_avg_pool_and_1x1_kxk_chains():
    model = _prepare(Net(DBBlock(8)))
    r = _merged(model, _x(2, 3, 10, 10))
    assert _conv_count(r.module.body) == 1 and _bn_count(r.module) == 0
    assert not any(isinstance(m, nn.AvgPool2d) for m in r.module.modules())


class BNAndPadLayer(nn.Module):
    """DBB's BNAndPadLayer (DingXiaoH/DiverseBranchBlock): a BN whose output is padded with its own bias.

    ``wrong=True`` writes the border with ``beta`` instead of ``beta - mean * gamma / sqrt(var + eps)``.
    """

    def __init__(self, pad_pixels: int, num_features: int, wrong: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels
        self.wrong = wrong

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self.bn(input)
        if self.pad_pixels > 0:
            if self.wrong:
                pad_values = self.bn.bias.detach()
            else:
                pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / \
                    torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0:self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels:, :] = pad_values
            output[:, :, :, 0:self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels:] = pad_values
        return output


class DBBPadBlock(nn.Module):
    """DBB as its authors wrote it: the 1x1 -> avg-pool and 1x1 -> kxk branches pad with the BN value
    (BNAndPadLayer) and the avg-pool and kxk conv after it have padding 0."""

    def __init__(self, c: int, k: int = 3, wrong: bool = False) -> None:
        super().__init__()
        self.dbb_origin = _convbn(c, c, k, padding=k // 2)
        self.dbb_1x1 = _convbn(c, c, 1)
        self.dbb_avg = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), BNAndPadLayer(k // 2, c),
                                     nn.AvgPool2d(k, 1, 0), nn.BatchNorm2d(c))
        self.dbb_1x1_kxk = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), BNAndPadLayer(k // 2, c, wrong),
                                         nn.Conv2d(c, c, k, 1, 0, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dbb_origin(x) + self.dbb_1x1(x) + self.dbb_avg(x) + self.dbb_1x1_kxk(x)


def test_dbb_border_value_padding_makes_the_1x1_kxk_chain_one_conv():
    chain = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), BNAndPadLayer(2, 8), nn.Conv2d(8, 8, 5, bias=False),
                          nn.BatchNorm2d(8))
    model = _prepare(Net(chain, DBBPadBlock(8), DBBPadBlock(8, k=5)))
    x = _x(2, 3, 11, 9)
    r = merge_branches(model)
    v = nf.verify(model, r.module, x)
    assert v.passed, v.describe()
    _, bn_ops, conv_ops = run_counting_ops(r.module, x)
    assert bn_ops == 0 and conv_ops == 2 + 3  # stem, head, one conv per block
    assert [m.padding for m in r.module.body.modules() if isinstance(m, nn.Conv2d)] == [(2, 2), (1, 1), (2, 2)]
    assert not r.skipped and _bn_count(r.module) == 0


def test_dbb_border_value_other_than_the_bias_is_left():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.origin = _convbn(8, 8, 3, padding=1)
            self.kxk = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), BNAndPadLayer(1, 8, wrong=True),
                                     nn.Conv2d(8, 8, 3, bias=False), nn.BatchNorm2d(8))

        def forward(self, x):
            return self.origin(x) + self.kxk(x)

    r = _left(_prepare(Net(Block())), _x(2, 3, 6, 6), "pads with border value")
    assert not r.modified
    reason = next(s.reason for s in r.skipped if "border value" in s.reason)
    assert "body.0.kxk.1" in reason and "where its input's bias is" in reason
    # in the full block the other three branches still merge, and the kxk branch is left with its reason
    model = _prepare(Net(DBBPadBlock(8, wrong=True)))
    r = _left(model, _x(2, 3, 6, 6), "pads with border value")
    assert nf.verify(model, r.module, _x(2, 3, 6, 6)).passed
    assert r.changes[0].details["branches"] == 3


def test_depthwise_branches_identity_and_bn_after_the_add_stay_depthwise():
    model = _prepare(Net(RepDW(8)))
    r = _merged(model, _x(2, 3, 9, 9))
    conv = r.module.body[0].merged_conv
    assert conv.groups == 8 and conv.weight.shape == (8, 1, 3, 3) and _bn_count(r.module) == 0


def test_subtraction_under_a_layer_scale_merges():
    model = _prepare(Net(RepMixer(8)))
    r = _merged(model, _x(2, 3, 9, 9))
    assert _conv_count(r.module.body) == 1 and _bn_count(r.module) == 0
    assert not hasattr(r.module.body[0], "layer_scale")  # gamma went into the kernel


def test_in_place_add_loop_and_sum_of_a_list():
    model = _prepare(Net(MobileOneStyle(8), SumOfList(8)))
    r = _merged(model, _x(2, 3, 8, 8))
    assert [c.details["branches"] for c in r.changes] == [5, 3]
    assert _bn_count(r.module) == 0


def test_avg_pool_branch_on_the_identity():
    class PoolBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.pool = nn.AvgPool2d(3, 1, 1)

        def forward(self, x):
            return self.conv(x) + self.pool(x) - 0.5 * x

    model = _prepare(Net(PoolBlock()))
    r = _merged(model, _x(2, 3, 7, 7))
    assert _conv_count(r.module.body) == 1


def test_pool_and_identity_alone_need_the_channel_count_from_example_inputs():
    class PoolOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AvgPool2d(3, 1, 1)

        def forward(self, x):
            return x + self.pool(x)

    model = Net(PoolOnly()).eval()
    x = _x(2, 3, 7, 7)
    r = _merged(model, x)
    assert not r.modified and "channel count" in r.skipped[0].reason
    r = _merged(model, x, example_inputs=x)
    assert r.modified and r.module.body[0].merged_conv.groups == 8


def test_pointwise_then_kxk_chain_composes_when_cheaper():
    chain = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
    model = _prepare(Net(chain))
    r = _merged(model, _x(2, 3, 8, 8))
    assert _conv_count(r.module.body) == 1 and "composed" in r.changes[0].message


def test_dilated_branches_share_the_dilation():
    class Dilated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = _convbn(8, 8, 3, padding=2)
            self.a[0].dilation = (2, 2)
            self.b = _convbn(8, 8, 1)

        def forward(self, x):
            return self.a(x) + self.b(x) + x

    model = _prepare(Net(Dilated()))
    r = _merged(model, _x(2, 3, 9, 9))
    assert r.module.body[0].merged_conv.dilation == (2, 2)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d(dims: int):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dims]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.k = nn.Sequential(conv(4, 4, 3, padding=1, bias=False), bn(4))
            self.p = nn.Sequential(conv(4, 4, 1, bias=False), bn(4))
            self.id = bn(4)

        def forward(self, x):
            return self.k(x) + self.p(x) + self.id(x)

    model = _prepare(nn.Sequential(Block()))
    r = _merged(model, _x(2, 4, *([6] * dims)))
    assert isinstance(r.module[0].merged_conv, conv)


def test_after_fold_batchnorm():
    model = _prepare(Net(RepVGGBlock(8, 8), ACBlock(8), DBBlock(8), RepDW(8), RepMixer(8), MobileOneStyle(8)))
    x = _x(2, 3, 10, 10)
    folded = nf.fold_batchnorm(model).module
    r = merge_branches(folded)
    assert_models_close(r.module, model, x, what="fold + merge")
    assert _bn_count(r.module) == 0 and _conv_count(r.module.body) == 6


def test_model_level_branches_keep_the_model_class():
    """A model that is one block: merging would replace the user's class, so its branches are left, saying so."""
    model = _prepare(RepVGGBlock(8, 8))
    r = merge_branches(model)
    assert type(r.module) is RepVGGBlock and not r.changes
    assert any("own forward" in s.reason and "RepVGGBlock" in s.reason for s in r.skipped)
    # traced, the model is a GraphModule, whose class is generated: that one merges
    traced = torch.fx.symbolic_trace(model)
    assert merge_branches(traced).changes


def test_inplace_false_leaves_the_input_untouched_and_inplace_true_edits_it():
    model = _prepare(Net(RepVGGBlock(8, 8)))
    snap, block = state_snapshot(model), model.body[0]
    r = merge_branches(model)
    assert_state_equal(model, snap)
    assert model.body[0] is block and r.module is not model
    r = merge_branches(model, inplace=True)
    assert r.module is model and isinstance(model.body[0], nn.Sequential)


# ---------------------------------------------------------------------------------------------- refusals


def _left(model: nn.Module, inputs: tuple, fragment: str) -> nf.PassResult:
    r = _merged(model, inputs)
    assert any(fragment in s.reason for s in r.skipped), [str(s) for s in r.skipped]
    return r


def test_nonlinear_branch_is_left_with_its_reason():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.b = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    r = _left(_prepare(Net(Block())), _x(2, 3, 6, 6), "not linear")
    assert not r.modified and "body.0.a.1" in r.skipped[0].reason


def test_resnet_residual_is_not_reported():
    class Basic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = _convbn(8, 8, 3, padding=1), _convbn(8, 8, 3, padding=1)

        def forward(self, x):
            return torch.relu(x + self.c2(torch.relu(self.c1(x))))

    r = _merged(_prepare(Net(Basic())), _x(2, 3, 6, 6))
    assert not r.modified and not r.skipped


def test_batchnorm_in_training_mode_is_left():
    model = _prepare(Net(RepVGGBlock(8, 8)))
    model.body[0].identity.train()
    r = _left(model, _x(4, 3, 6, 6), "training mode")
    # the two conv branches still merge; the identity BatchNorm stays, still training
    assert r.changes[0].details["branches"] == 2 and r.module.body[0].identity.training


def test_dilations_that_differ_are_left():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
            self.b = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    _left(_prepare(Net(Block())), _x(2, 3, 8, 8), "dilations differ")


def test_paddings_that_do_not_line_up_are_left():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.b = nn.Conv2d(8, 8, 2, stride=2)  # the same output size on even inputs only

        def forward(self, x):
            return self.a(x) + self.b(x)

    _left(_prepare(Net(Block())), _x(2, 3, 8, 8), "paddings do not line up")


def test_branch_output_read_elsewhere_is_left():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            a = self.a(x)
            return (a + self.b(x)) * torch.sigmoid(a)

    _left(_prepare(Net(Block())), _x(2, 3, 6, 6), "also read by")


def test_biased_pointwise_before_a_padded_kxk_is_left():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.origin = _convbn(8, 8, 3, padding=1)
            self.kxk = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8),
                                     nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

        def forward(self, x):
            return self.origin(x) + self.kxk(x)

    r = _left(_prepare(Net(Block())), _x(2, 3, 6, 6), "border")
    assert not r.modified


def test_forward_hook_on_a_branch_is_left():
    model = _prepare(Net(RepVGGBlock(8, 8)))
    model.body[0].pointwise[0].register_forward_hook(lambda *a: None)
    r = _left(model, _x(2, 3, 6, 6), "hooks")
    assert not r.modified


class InPlaceAfterBranches(nn.Module):
    """Two branches of ``x``, then ``x.mul_(2)``: what the branches read changes after them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.a(x) + self.b(x)
        x.mul_(2.0)
        return y + x


def test_in_place_op_on_the_shared_input_is_left():
    r = _left(_prepare(Net(InPlaceAfterBranches())), _x(2, 3, 6, 6), "in place")
    assert not r.modified


def test_a_dense_pointwise_after_a_depthwise_merge_is_not_composed():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
            self.pw = nn.Conv2d(8, 32, 1)

        def forward(self, x):
            return self.pw(x + self.dw(x))

    model = _prepare(Net(Block(), nn.Conv2d(32, 8, 1)))
    r = _merged(model, _x(2, 3, 9, 9))
    block = r.module.body[0]
    assert block.merged_conv.groups == 8 and isinstance(block.pw, nn.Conv2d)  # dw + identity only


def test_a_merge_that_costs_more_than_its_branches_is_left():
    class Block(nn.Module):  # a dense 1x1 plus a depthwise 3x3 pool: one dense 3x3 would cost more
        def __init__(self) -> None:
            super().__init__()
            self.pw, self.pool = nn.Conv2d(8, 8, 1), nn.AvgPool2d(3, 1, 1)

        def forward(self, x):
            return self.pw(x) + self.pool(x)

    r = _left(_prepare(Net(Block())), _x(2, 3, 6, 6), "multiply-adds")
    assert not r.modified


def test_a_conv_then_pool_chain_alone_is_not_rewritten():
    """DenseNet's transition (1x1 conv, then a 2x2 avg-pool) is a chain, not a branch merge: left as it is."""
    model = _prepare(Net(nn.Sequential(nn.Conv2d(8, 8, 1), nn.AvgPool2d(2, 2))))
    r = _merged(model, _x(2, 3, 8, 8))
    assert not r.modified and not r.skipped


def test_residuals_around_mlps_and_opaque_modules_are_not_reported():
    class Mlp(nn.Module):  # ConvNeXt-like: dw conv, then two linears around a GELU
        def __init__(self) -> None:
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            y = self.fc2(self.act(self.fc1(self.dw(x).permute(0, 2, 3, 1))))
            return x + y.permute(0, 3, 1, 2)

    class Opaque(nn.Module):  # an attention-like module the tracer keeps whole (a leaf with convs inside)
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

        def forward(self, x):
            y = self.main(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape_as(x)
            return x + y

    model = _prepare(Net(Mlp(), Opaque()))
    torch.fx.symbolic_trace(model)  # it traces: the silence below is the rule's, not a failed trace
    r = _merged(model, _x(2, 3, 8, 8))
    assert not r.modified and not r.skipped


# ---------------------------------------------------------------------------------------------- property


class _RandomBlock(nn.Module):
    """Branches drawn by hypothesis, added or subtracted, optionally a BN and a ReLU after the sum."""

    def __init__(self, branches: nn.ModuleList, signs: list[float], post: nn.Module) -> None:
        super().__init__()
        self.branches, self.signs, self.post = branches, signs, post

    def forward(self, x):
        y = self.branches[0](x) * self.signs[0]
        for sign, b in zip(self.signs[1:], self.branches[1:]):
            y = y + b(x) if sign > 0 else y - b(x)
        return self.post(y)


class _Scale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(-2.0, 1.5, c).reshape(1, c, 1, 1))

    def forward(self, x):
        return x * self.gamma


try:
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
except ImportError:  # pragma: no cover
    st = None


if st is not None:
    @st.composite
    def _blocks(draw):
        c = draw(st.sampled_from([2, 4, 6]))
        stride = draw(st.sampled_from([1, 2]))
        dil = draw(st.sampled_from([1, 1, 2]))
        divisors = [g for g in (1, 2, c) if c % g == 0]
        branches, has_pool, has_module = [], False, False
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["conv", "conv", "chain", "identity", "pool", "scale"]))
            if kind in ("identity", "scale") and stride != 1:
                kind = "conv"
            if kind == "conv":
                k = (draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3])))
                pad = tuple(dil * (kk - 1) // 2 for kk in k)
                conv = nn.Conv2d(c, c, k, stride, pad, dilation=dil, groups=draw(st.sampled_from(divisors)),
                                 bias=draw(st.booleans()))
                b = nn.Sequential(conv, nn.BatchNorm2d(c)) if draw(st.booleans()) else conv
            elif kind == "chain":  # 1x1 (no bias) -> kxk: exact with zero padding
                b = nn.Sequential(nn.Conv2d(c, c, 1, bias=False),
                                  nn.Conv2d(c, c, 3, stride, dil, dilation=dil), nn.BatchNorm2d(c))
            elif kind == "identity":
                b = nn.BatchNorm2d(c) if draw(st.booleans()) else nn.Identity()
                has_module = has_module or isinstance(b, nn.BatchNorm2d)
            elif kind == "pool":
                has_pool = has_module = True
                b = nn.AvgPool2d(3, stride, 1)
            else:
                b = _Scale(c)
            has_module = has_module or kind in ("conv", "chain")
            branches.append(b)
        signs = [draw(st.sampled_from([1.0, -1.0])) for _ in branches]
        post = draw(st.sampled_from(["none", "bn", "relu"]))
        post_m = {"none": nn.Identity(), "bn": nn.BatchNorm2d(c), "relu": nn.ReLU()}[post]
        size = (draw(st.integers(5, 9)), draw(st.integers(5, 9)))
        # identities and constants alone stay as written; a pool and a dilated conv do not line up
        mergeable = len(branches) > 1 and has_module and not (has_pool and dil > 1)
        return c, _RandomBlock(nn.ModuleList(branches), signs, post_m), size, mergeable

    # no shrinking: a failure prints its drawn block, and the shared CI machine keeps its minutes
    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    @given(_blocks(), st.integers(0, 2**16))
    def test_random_branch_sets_merge_exactly_or_are_left(spec, seed):
        c, block, size, mergeable = spec
        model = _prepare(nn.Sequential(nn.Conv2d(3, c, 1), block), seed)
        r = _merged(model, (torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed)),),
                    example_inputs=(torch.randn(1, 3, *size),))
        if mergeable:  # merged, or left because one conv would cost more than the branches
            assert r.modified or any("multiply-adds" in s.reason for s in r.skipped), [str(s) for s in r.skipped]


def test_a_model_that_does_not_trace_whole_is_merged_block_by_block():
    class Untraceable(Net):
        def forward(self, x):
            y = self.body(self.stem(x))
            if y.sum() > 0:  # data-dependent control flow: no fx trace of the whole model
                y = y * 2
            return self.head(y)

    model = _prepare(Untraceable(RepVGGBlock(8, 8), ACBlock(8)))
    x = _x(2, 3, 6, 6)
    r = _merged(model, x)
    assert type(r.module) is Untraceable and [c.details["block"] for c in r.changes] == ["body.1", "body.0"]


# ---------------------------------------------------------------------------------------------- Linears


class DistilledHead(nn.Module):
    """RepViT's classifier: ``(head(x) + head_dist(x)) / 2``, each head a BatchNorm1d then a Linear."""

    def __init__(self, c: int = 8, n: int = 5) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.0)
        self.head = nn.Sequential(nn.BatchNorm1d(c), nn.Linear(c, n))
        self.head_dist = nn.Sequential(nn.BatchNorm1d(c), nn.Linear(c, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(x)
        return (self.head(x) + self.head_dist(x)) / 2


class PooledNet(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x).mean((2, 3)))


def test_distillation_head_becomes_one_linear_after_the_fold():
    """The folds put each head's BatchNorm1d into its Linear (an Identity stays where it was); the two
    Linears of one input, summed and halved, are one Linear, as timm's RepViT ``fuse()`` writes it."""
    model = _prepare(PooledNet(DistilledHead()))
    x = _x(2, 3, 6, 6)
    r = nf.fold_batchnorm(model, merge_branches=True, example_inputs=x)
    assert_models_close(r.module, model, x, what="fold + merge")
    linears = [m for m in r.module.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and r.module.head.merged_linear is linears[0]
    merge = next(c for c in r.changes if c.action == "merge_branches")
    assert merge.details["block"] == "head" and {"head.head.1", "head.head_dist.1"} <= set(merge.paths)
    assert "one Linear" in merge.message and not r.skipped


def test_linears_of_a_token_tensor_merge_but_not_with_a_channel_op():
    """A sum of Linears is one Linear on a tensor of any rank (they act on the last axis); a BatchNorm1d
    acts on axis 1, which is another axis on (N, L, C): that sum is left, with the reason."""
    class Tokens(nn.Module):
        def __init__(self, bn: bool) -> None:
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(8, 8), nn.Linear(8, 8), nn.BatchNorm1d(8) if bn else None

        def forward(self, x):
            if self.bn is not None:
                return self.a(x) + self.bn(x)
            return self.a(x) - self.b(x) + x

    x = _x(2, 8, 8)  # L = C: only the axis tells the BatchNorm's channels from the Linear's
    r = _merged(_prepare(nn.Sequential(Tokens(bn=False))), x)
    assert len(r.changes) == 1 and r.changes[0].details["branches"] == 3
    r = _left(_prepare(nn.Sequential(Tokens(bn=True))), x, "acts on the last axis")
    assert not r.modified


def test_a_pointwise_conv_after_a_pass_through_merges():
    """A 1x1 conv behind an Identity (where a folded BatchNorm was) or an eval dropout reads the branch
    input itself: it merges like a bare 1x1 conv."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Conv2d(8, 8, 3, padding=1)
            self.pointwise = nn.Sequential(nn.Identity(), nn.Dropout(0.1), nn.Conv2d(8, 8, 1))

        def forward(self, x):
            return self.dense(x) + self.pointwise(x)

    r = _merged(_prepare(Net(Block())), _x(2, 3, 6, 6))
    assert r.changes[0].details["branches"] == 2 and not r.skipped


def test_branches_in_the_model_forward_that_is_not_a_chain_keep_the_model_class():
    """A region in the model's own forward (LeViT's distillation head) would hand back a GraphModule in place
    of the user's class: it is left, with that reason; a model that is one block still merges (above)."""
    class Distilled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head, self.head_dist = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            x = self.body(x)
            return (self.head(x) + self.head_dist(x)) / 2

    model = Distilled().eval()
    r = merge_branches(model)
    assert type(r.module) is Distilled and not r.changes
    assert any("own forward" in s.reason and "(Distilled)" in s.reason and s.paths[1:] == ("head", "head_dist")
               for s in r.skipped)
    assert nf.verify(model, r.module, _x(2, 3, 6, 6)).passed


def test_a_forward_that_caches_in_a_dict_traces_again():
    """timm's LeViT caches ``attention_biases[:, idxs]`` in a dict in eval: traced, the dict kept a Proxy of the
    whole-model trace, and tracing the block again read it back ('does not belong to this Graph')."""
    class Caching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.biases = nn.Parameter(torch.randn(8, 4))
            self.register_buffer("idxs", torch.tensor([3, 0, 2, 1]), persistent=False)
            self.cache: dict[str, torch.Tensor] = {}

        def forward(self, x):
            key = str(x.device)  # traced, a Proxy's name: the next trace of this module looks the same key up
            if key not in self.cache:
                self.cache[key] = self.biases[:, self.idxs]
            return x + self.cache[key].sum(1)

    class Distilled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = Caching()
            self.head, self.head_dist = nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            x = self.body(x)
            return (self.head(x) + self.head_dist(x)) / 2

    model = nn.Sequential(Distilled()).eval()
    x = _x(2, 8)
    r = nf.fold_batchnorm(model, example_inputs=x, merge_branches=True)
    assert [c.details["block"] for c in r.changes] == ["0"]
    assert nf.verify(model, r.module, x).passed


def test_a_branch_left_beside_merged_ones_keeps_its_reason():
    """Two Linears merge; the BatchNorm added to them acts on another axis and is left, with its reason
    (the reason was dropped once the Linears had merged)."""
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(8, 8), nn.Linear(8, 8), nn.BatchNorm1d(8)

        def forward(self, x):
            return self.a(x) + self.b(x) + self.bn(x)

    model = _prepare(nn.Sequential(Mixed()))
    r = merge_branches(model)
    assert len(r.changes) == 1 and set(r.changes[0].paths[1:]) == {"0.a", "0.b"}
    assert any("0.bn" in s.paths and "axis" in s.reason for s in r.skipped), [str(s) for s in r.skipped]
    assert nf.verify(model, r.module, _x(2, 8)).passed
