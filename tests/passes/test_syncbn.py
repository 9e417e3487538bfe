"""to_syncbn / from_syncbn: every kind both ways, exact round trips, the graph route for foreign conversions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normfold as nf
from normfold.passes.syncbn import ORIGINAL_CLASS_ATTR
from normfold.tolerances import RECALIBRATE
from normfold.verify import compare
from tests.conftest import assert_state_equal, randomize_bn_stats, run_eval, state_snapshot


class _MyBN2d(nn.BatchNorm2d):
    """A user subclass with an attribute of its own and BatchNorm's forward."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.tag = "mine"


def _model() -> nn.Module:
    from timm.layers import BatchNormAct2d

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn2d = nn.BatchNorm2d(8, eps=1e-3, momentum=None)
            self.mine = _MyBN2d(8)
            self.bnact = BatchNormAct2d(8, act_layer=nn.SiLU)
            self.noaff = nn.BatchNorm2d(8, affine=False, momentum=0.3)
            self.bn3d = nn.BatchNorm3d(8)
            self.bn1d_seq = nn.BatchNorm1d(8)
            self.fc = nn.Linear(8, 6)
            self.bn1d = nn.BatchNorm1d(6)
            self.nostats = nn.BatchNorm1d(6, track_running_stats=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.noaff(self.bnact(self.mine(self.bn2d(self.conv(x)))))
            x = self.bn3d(x.unsqueeze(2)).squeeze(2)
            x = self.bn1d_seq(x.flatten(2)).amax(2)
            return self.nostats(self.bn1d(self.fc(x)))

    m = randomize_bn_stats(M(), seed=3)
    for i, bn in enumerate(b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)):
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(10 + i)
    return m.eval()


X = torch.randn(4, 3, 9, 9) * 2 + 0.5

BN_PATHS = ("bn2d", "mine", "bnact", "noaff", "bn3d", "bn1d_seq", "bn1d", "nostats")


def _classes(m: nn.Module) -> dict[str, type]:
    return {p: type(x) for p, x in m.named_modules()}


def _bn_attrs(m: nn.Module) -> dict[str, tuple]:
    return {p: (x.num_features, x.eps, x.momentum, x.affine, x.track_running_stats, x.training)
            for p, x in m.named_modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)}


def test_to_syncbn_converts_every_kind_keeping_state_and_outputs() -> None:
    from timm.layers.norm_act import SyncBatchNormAct

    model = _model()
    model.bn1d.train()  # a mixed train/eval model: flags come back as given
    snap = state_snapshot(model)
    r = nf.to_syncbn(model)
    assert_state_equal(model, snap)  # inplace=False: the input is untouched
    assert isinstance(model.bn2d, nn.BatchNorm2d)
    s = r.module
    assert {c.paths[0] for c in r.changes} == set(BN_PATHS) and not r.skipped
    for p in BN_PATHS:
        assert isinstance(getattr(s, p), nn.SyncBatchNorm), p
    assert isinstance(s.bnact, SyncBatchNormAct) and isinstance(s.bnact.act, nn.SiLU)
    assert s.mine.tag == "mine"
    assert _bn_attrs(s) == _bn_attrs(model)
    assert s.state_dict().keys() == model.state_dict().keys()
    assert_state_equal(s, snap)
    assert torch.equal(run_eval(s, (X,)), run_eval(model, (X,)))


def test_round_trip_is_exact_classes_and_state_dict() -> None:
    model = _model()
    model.train()
    model.bn3d.eval()
    there = nf.to_syncbn(model).module
    back = nf.from_syncbn(there)
    assert len(back.changes) == len(BN_PATHS) and not back.skipped
    assert _classes(back.module) == _classes(model)
    assert _bn_attrs(back.module) == _bn_attrs(model)
    assert_state_equal(back.module, state_snapshot(model))
    assert back.module.mine.tag == "mine"
    assert not any(hasattr(m, ORIGINAL_CLASS_ATTR) or hasattr(m, "process_group") for m in back.module.modules())
    assert torch.equal(run_eval(back.module, (X,)), run_eval(model, (X,)))


def test_training_forward_on_cpu_without_process_group_matches_batchnorm() -> None:
    # Without an initialized process group SyncBatchNorm falls back to BatchNorm's own training forward;
    # the multi-process synchronisation itself needs GPUs (test_training_forward_on_gpu below).
    model = _model().train()
    sync = nf.to_syncbn(model).module
    out_bn, out_sync = model(X), sync(X)
    assert torch.equal(out_bn, out_sync)
    assert_state_equal(sync, state_snapshot(model))  # same running-stat updates, same num_batches_tracked


def test_from_syncbn_after_torch_convert_uses_the_graph() -> None:
    model = _model()
    model.bnact = nn.BatchNorm2d(8)  # torch's converter does not know timm's norm-act layer
    foreign = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert not any(hasattr(m, ORIGINAL_CLASS_ATTR) for m in foreign.modules())
    r = nf.from_syncbn(foreign, example_inputs=(X,))
    assert not r.skipped, [str(s) for s in r.skipped]
    got = _classes(r.module)
    want = _classes(model)
    want["mine"] = nn.BatchNorm2d  # torch's converter already forgot the subclass
    assert got == want
    assert all("-D input in the graph" in c.message for c in r.changes)
    assert_state_equal(r.module, state_snapshot(model))
    assert torch.equal(run_eval(r.module, (X,)), run_eval(model, (X,)))


def test_from_syncbn_after_timm_convert_restores_batchnormact() -> None:
    from timm.layers import BatchNormAct2d
    from timm.layers.norm_act import convert_sync_batchnorm

    model = _model()
    foreign = convert_sync_batchnorm(copy.deepcopy(model))
    r = nf.from_syncbn(foreign, example_inputs=(X,))
    assert isinstance(r.module.bnact, BatchNormAct2d) and isinstance(r.module.bnact.act, nn.SiLU)
    assert isinstance(r.module.bn1d_seq, nn.BatchNorm1d) and isinstance(r.module.bn3d, nn.BatchNorm3d)
    assert torch.equal(run_eval(r.module, (X,)), run_eval(model, (X,)))


def test_from_syncbn_skips_what_it_cannot_place() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.SyncBatchNorm(4)
            self.unused = nn.SyncBatchNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x).mean((2, 3)) + self.bn(x.mean(3)).mean(2)

    r = nf.from_syncbn(Twice(), example_inputs=(torch.randn(2, 4, 5, 5),))
    reasons = {s.paths[0]: s.reason for s in r.skipped}
    assert "ranks [3, 4]" in reasons["bn"] and "not called" in reasons["unused"]
    assert not r.modified

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.SyncBatchNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x) if x.sum() > 0 else -self.bn(x)

    r = nf.from_syncbn(Untraceable())  # no example inputs and nothing to infer them from
    assert not r.modified and "example_inputs" in r.skipped[0].reason


def test_to_syncbn_skips_frozen_and_custom_forward() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    class Odd(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1

    model = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), Odd(4), nn.SyncBatchNorm(4))
    r = nf.to_syncbn(model)
    reasons = {s.paths[0]: s.reason for s in r.skipped}
    assert "frozen" in reasons["1"] and "own forward()" in reasons["2"] and "already" in reasons["3"]
    assert not r.modified


def test_inplace_keeps_parameter_objects_for_the_optimizer() -> None:
    model = _model()
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = nf.to_syncbn(model, inplace=True)
    assert r.module is model and isinstance(model.bn2d, nn.SyncBatchNorm)
    assert all(p is params[n] for n, p in model.named_parameters())
    before = model.nostats.weight.detach().clone()  # the last layer: nothing renormalizes after it
    model.train()
    model(X).square().mean().backward()
    opt.step()
    assert not torch.equal(model.nostats.weight, before)  # the optimizer still drives the converted layer


@pytest.mark.zoo
def test_torchvision_resnet_round_trip() -> None:
    from torchvision.models import resnet18

    model = randomize_bn_stats(resnet18(num_classes=10), seed=4).eval()
    x = torch.randn(2, 3, 32, 32)
    there = nf.to_syncbn(model)
    assert len(there.changes) == 20
    foreign_style = copy.deepcopy(there.module)
    for m in foreign_style.modules():  # forget the remembered classes: the graph route must do it alone
        if hasattr(m, ORIGINAL_CLASS_ATTR):
            delattr(m, ORIGINAL_CLASS_ATTR)
    for src in (there.module, foreign_style):
        back = nf.from_syncbn(src, example_inputs=(x,)).module
        assert _classes(back) == _classes(model)
        assert_state_equal(back, state_snapshot(model))
        assert torch.equal(run_eval(back, (x,)), run_eval(model, (x,)))


def test_training_forward_on_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("SyncBatchNorm's synchronised training forward needs a CUDA device (none here)")
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).cuda().train()
        sync = nf.to_syncbn(model).module
        x = X.cuda()
        v = compare(model(x), sync(x))  # outputs: normfold.verify's rule, the policy
        assert v.passed, v.describe()
        # batch statistics reduced another way: the rule recalibrated statistics are held to
        assert RECALIBRATE[torch.float32].allclose(sync[1].running_mean, model[1].running_mean)
    finally:
        dist.destroy_process_group()
