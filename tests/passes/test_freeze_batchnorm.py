"""freeze_batchnorm / unfreeze_batchnorm: FrozenAffine outputs, no shared buffers, ONNX, exact round trips."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import normfold as nf
from normfold.passes.freeze_batchnorm import FrozenAffine
from tests.conftest import (assert_models_close, assert_outputs_close, assert_state_equal, randomize_bn_stats,
                            run_eval, state_snapshot)


def _model() -> nn.Module:
    from timm.layers import BatchNormAct2d

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn2d = nn.BatchNorm2d(8, eps=1e-3, momentum=None)
            self.bnact = BatchNormAct2d(8, act_layer=nn.Hardswish)
            self.noaff = nn.BatchNorm2d(8, affine=False)
            self.sync = nn.SyncBatchNorm(8)
            self.bn3d = nn.BatchNorm3d(8)
            self.bn1d_seq = nn.BatchNorm1d(8)
            self.fc = nn.Linear(8, 6)
            self.bn1d = nn.BatchNorm1d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.sync(self.noaff(self.bnact(self.bn2d(self.conv(x)))))
            x = self.bn3d(x.unsqueeze(2)).squeeze(2)
            x = self.bn1d_seq(x.flatten(2)).amax(2)
            return self.bn1d(self.fc(x))

    m = randomize_bn_stats(M(), seed=5)
    for i, bn in enumerate(b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)):
        bn.num_batches_tracked.fill_(3 + i)
    return m.eval()


X = torch.randn(4, 3, 9, 9) * 2 + 0.5
PATHS = ("bn2d", "bnact", "noaff", "sync", "bn3d", "bn1d_seq", "bn1d")


def _classes(m: nn.Module) -> dict[str, type]:
    return {p: type(x) for p, x in m.named_modules()}


def test_freeze_every_kind_matches_eval_and_shares_no_storage() -> None:
    model = _model()
    snap = state_snapshot(model)
    r = nf.freeze_batchnorm(model)
    assert_state_equal(model, snap)
    assert {c.paths[0] for c in r.changes} == set(PATHS) and not r.skipped
    f = r.module
    for p in PATHS:
        assert isinstance(getattr(f, p), FrozenAffine), p
    assert isinstance(f.bnact.act, nn.Hardswish)
    assert_models_close(f, model, (X,))
    original_ptrs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    for p in PATHS:
        for name, b in getattr(f, p).named_buffers(recurse=False):
            assert b.data_ptr() not in original_ptrs, f"{p}.{name} shares storage with the BatchNorm"


def test_frozen_output_ignores_training_mode_and_has_nothing_to_train() -> None:
    model = _model().train()
    r = nf.freeze_batchnorm(model)
    f = r.module
    assert f.training and f.bn2d.training  # flags come back as given
    before = state_snapshot(f)
    out_train = f(X)
    assert_state_equal(f, before)  # no statistics moved
    assert torch.equal(out_train, run_eval(f, (X,)))
    trainable = {n for n, p in f.named_parameters() if p.requires_grad}
    assert trainable == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}


def test_round_trip_restores_the_same_batchnorms() -> None:
    model = _model()
    model.train()
    model.bn3d.eval()
    model.bn2d.weight.requires_grad_(False)
    frozen = nf.freeze_batchnorm(model).module
    back = nf.unfreeze_batchnorm(frozen)
    assert not back.skipped
    assert _classes(back.module) == _classes(model)
    assert_state_equal(back.module, state_snapshot(model))
    for p in PATHS:
        a, b = getattr(model, p), getattr(back.module, p)
        assert (a.eps, a.momentum, a.affine, a.track_running_stats, a.training) == \
            (b.eps, b.momentum, b.affine, b.track_running_stats, b.training), p
    assert not back.module.bn2d.weight.requires_grad and back.module.bn1d.weight.requires_grad
    assert back.module.sync.process_group is None
    assert torch.equal(run_eval(back.module, (X,)), run_eval(model, (X,)))
    # and the restored model trains its BatchNorms again
    back.module.train()
    back.module(X)
    assert back.module.bn1d.num_batches_tracked.item() == model.bn1d.num_batches_tracked.item() + 1


def test_unfreeze_without_statistics_rebuilds_by_dimensionality() -> None:
    model = _model()
    lean = nf.freeze_batchnorm(model, keep_statistics=False).module
    assert "bn_running_mean" not in dict(lean.bn2d.named_buffers())
    r = nf.unfreeze_batchnorm(lean, example_inputs=(X,))
    u = r.module
    assert not r.skipped
    want = {"bn2d": nn.BatchNorm2d, "noaff": nn.BatchNorm2d, "sync": nn.BatchNorm2d, "bn3d": nn.BatchNorm3d,
            "bn1d_seq": nn.BatchNorm1d, "bn1d": nn.BatchNorm1d}
    for p, cls in want.items():
        assert type(getattr(u, p)) is cls, p
    from timm.layers import BatchNormAct2d

    assert isinstance(u.bnact, BatchNormAct2d) and isinstance(u.bnact.act, nn.Hardswish)
    assert "no statistics were kept" in r.changes[0].message
    assert_models_close(u, model, (X,))


def test_hand_built_frozen_affine_gets_its_rank_from_a_forward() -> None:
    fa = FrozenAffine(4)
    with torch.no_grad():
        fa.scale.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        fa.shift.copy_(torch.tensor([0.1, 0.2, -0.3, 0.0]))
    model = nn.Sequential(nn.Linear(3, 4), fa)
    r = nf.unfreeze_batchnorm(model, example_inputs=(torch.randn(5, 3),))
    assert type(r.module[1]) is nn.BatchNorm1d
    assert_models_close(r.module, model, (torch.randn(7, 3),))
    model3d = nn.Sequential(nn.Conv3d(2, 4, 1), copy.deepcopy(fa))
    r3 = nf.unfreeze_batchnorm(model3d, example_inputs=(torch.randn(2, 2, 3, 3, 3),))
    assert type(r3.module[1]) is nn.BatchNorm3d


def test_vision_frozen_batchnorm_unfreezes_to_batchnorm2d() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = randomize_bn_stats(nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8)), seed=6).eval()
    r = nf.freeze_batchnorm(model)
    assert not r.modified and "already frozen" in r.skipped[0].reason
    u = nf.unfreeze_batchnorm(model).module
    assert type(u[1]) is nn.BatchNorm2d
    assert_models_close(u, model, (X,))


def test_skips_batchnorm_without_running_stats_and_custom_forward() -> None:
    class Odd(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).abs()

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), Odd(4))
    r = nf.freeze_batchnorm(model)
    reasons = {s.paths[0]: s.reason for s in r.skipped}
    assert "track_running_stats=False" in reasons["1"] and "own forward()" in reasons["2"]


def test_half_precision_keeps_dtype() -> None:
    model = randomize_bn_stats(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).eval().to(torch.bfloat16)
    f = nf.freeze_batchnorm(model).module
    assert f[1].scale.dtype == torch.bfloat16
    x = X.to(torch.bfloat16)
    assert_outputs_close(run_eval(f, (x,)), run_eval(model, (x,)))


def test_frozen_model_exports_to_onnx_and_matches_in_onnxruntime() -> None:
    import onnxruntime as ort

    model = _model()
    frozen = nf.freeze_batchnorm(model).module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(frozen, (X,), dynamo=True, verbose=False)
    proto = program.model_proto
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops and "Mul" in ops
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    (out,) = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})
    assert_outputs_close(torch.from_numpy(out), run_eval(model, (X,)))


@pytest.mark.zoo
def test_torchvision_resnet_freeze_and_back() -> None:
    from torchvision.models import resnet18

    model = randomize_bn_stats(resnet18(num_classes=10), seed=7).eval()
    x = torch.randn(2, 3, 32, 32)
    frozen = nf.freeze_batchnorm(model)
    assert len(frozen.changes) == 20
    assert_models_close(frozen.module, model, (x,))
    back = nf.unfreeze_batchnorm(frozen.module).module
    assert _classes(back) == _classes(model)
    assert_state_equal(back, state_snapshot(model))
