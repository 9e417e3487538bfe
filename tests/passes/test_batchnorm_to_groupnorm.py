"""batchnorm_to_groupnorm: group rule, every BatchNorm kind, the warm start on a trained model, the pass contract."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normfold as nf
from normfold.errors import InputError, UsageError
from normfold.passes.batchnorm_to_groupnorm import default_num_groups
from normfold.verify import compare
from tests.conftest import assert_state_equal, randomize_bn_stats, run_eval, state_snapshot


@pytest.fixture
def one_thread():
    # tiny models: threads cost more than they give on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_default_group_rule() -> None:
    assert default_num_groups(64) == 32
    assert default_num_groups(48) == 24
    assert default_num_groups(16) == 16
    assert default_num_groups(7) == 7
    # 2-D (N, C): a group needs >= 3 values, never one channel per group
    assert default_num_groups(16, values_per_channel=1) == 4
    assert default_num_groups(64, values_per_channel=1) == 16
    assert default_num_groups(7, values_per_channel=1) == 1
    assert default_num_groups(2, values_per_channel=1) is None
    assert default_num_groups(16, values_per_channel=4) == 16


class _Sub2d(nn.BatchNorm2d):
    """A subclass that keeps BatchNorm's forward."""


def _kinds_model() -> tuple[nn.Module, torch.Tensor]:
    from timm.layers import BatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3)
            self.bn2d = nn.BatchNorm2d(16, eps=1e-3)
            self.sub = _Sub2d(16)
            self.sync = nn.SyncBatchNorm(16)
            self.bnact = BatchNormAct2d(16, act_layer=nn.GELU)
            self.frozen = FrozenBatchNorm2d(16)
            self.bn3d = nn.BatchNorm3d(16)
            self.bn1d_seq = nn.BatchNorm1d(16)
            self.fc = nn.Linear(16, 12)
            self.bn1d_flat = nn.BatchNorm1d(12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.frozen(self.bnact(self.sync(self.sub(self.bn2d(self.conv(x))))))
            x = self.bn3d(x.unsqueeze(2)).squeeze(2)
            x = self.bn1d_seq(x.flatten(2)).amax(2)  # (a mean would be 0: each channel is normalized)
            return self.bn1d_flat(self.fc(x))

    m = randomize_bn_stats(M(), seed=1).eval()
    return m, torch.randn(4, 3, 10, 10) * 2 + 0.5


def test_every_kind_becomes_groupnorm_computing_group_norm_with_copied_affine() -> None:
    from timm.layers import GroupNormAct

    model, x = _kinds_model()
    r = nf.batchnorm_to_groupnorm(model, example_inputs=(x,))
    assert not r.skipped, [str(s) for s in r.skipped]
    out = r.module
    assert type(out) is type(model)
    groups = {c.paths[0]: c.details["groups"] for c in r.changes}
    assert groups == {"bn2d": 16, "sub": 16, "sync": 16, "bnact": 16, "frozen": 16, "bn3d": 16, "bn1d_seq": 16,
                      "bn1d_flat": 4}  # 12 features on (N, 12): 12/32 -> 12 would be one value per group
    assert isinstance(out.bnact, GroupNormAct) and isinstance(out.bnact.act, nn.GELU)
    assert out.bn2d.eps == 1e-3
    # each converted layer computes exactly F.group_norm(x, G, gamma, beta, eps) (+ act) on its own input
    inputs: dict[str, torch.Tensor] = {}
    hooks = [getattr(out, p).register_forward_pre_hook(lambda m, a, p=p: inputs.__setitem__(p, a[0]))
             for p in groups]
    final = run_eval(out, (x,))
    for h in hooks:
        h.remove()
    for path, g in groups.items():
        orig, new = getattr(model, path), getattr(out, path)
        assert isinstance(new, nn.GroupNorm) and new.num_groups == g
        assert torch.equal(new.weight, orig.weight) and torch.equal(new.bias, orig.bias)  # copied, bit for bit
        xin = inputs[path]
        want = F.group_norm(xin, g, orig.weight.detach(), orig.bias.detach(), orig.eps)
        if path == "bnact":
            want = F.gelu(want)
        with torch.no_grad():
            assert torch.equal(new(xin), want), path  # the same op on the same tensors
    # the frozen BatchNorm's replacement stays frozen; the others train
    assert not out.frozen.weight.requires_grad and out.bn2d.weight.requires_grad
    assert torch.isfinite(final).all() and final.std(0).min() > 0  # the 2-D layer did not collapse


def test_two_d_input_never_one_value_per_group() -> None:
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2), nn.BatchNorm1d(2))
    randomize_bn_stats(model).eval()
    x = torch.randn(8, 5)
    r = nf.batchnorm_to_groupnorm(model, example_inputs=(x,))
    assert [c.details["groups"] for c in r.changes] == [4]
    [skip] = r.skipped
    assert skip.paths == ("4",) and "no GroupNorm group" in skip.reason
    assert isinstance(r.module[4], nn.BatchNorm1d)
    # explicit num_groups equal to C on (N, C): skipped with the fix, not silently zeroing the output
    r16 = nf.batchnorm_to_groupnorm(model, num_groups=16, example_inputs=(x,))
    reasons = {s.paths[0]: s.reason for s in r16.skipped}
    assert "bias alone" in reasons["1"] and "pass num_groups=4" in reasons["1"]
    assert isinstance(r16.module[1], nn.BatchNorm1d)
    # G = C would give a constant layer output (the bias): check that is what we avoided
    gn = nn.GroupNorm(16, 16)
    # torch's GroupNorm with one element per group: the bias plus rounding (a property of the op, not a rewrite)
    assert gn(torch.randn(8, 16)).abs().max() < 1e-4


def test_rank_unknown_falls_back_to_the_kind() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(8)
            self.bn2 = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                return self.bn(x)
            return self.bn(x)

    model = Untraceable().eval()
    r = nf.batchnorm_to_groupnorm(model)  # no example inputs, no first layer to infer them from
    groups = {c.paths[0]: (c.details["groups"], c.details["rank"]) for c in r.changes}
    assert groups["bn"][0] == 2 and "possibly a 2-D" in groups["bn"][1]  # assumed (N, C): >= 3 values/group
    assert groups["bn2"][0] == 8 and "BatchNorm2d kind" in groups["bn2"][1]


def test_a_batchnorm_registered_twice_is_replaced_everywhere() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.norm = nn.BatchNorm2d(8)
            self.alias = self.norm  # the same module under a second name, called through it

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.alias(self.conv(x))

    for fn in (nf.batchnorm_to_groupnorm, nf.to_syncbn, nf.freeze_batchnorm):
        out = fn(Shared().eval()).module
        assert out.norm is out.alias and not isinstance(out.alias, nn.BatchNorm2d), fn.__name__
    seq = nf.batchnorm_to_groupnorm(Shared().eval(), calibration_data=torch.randn(4, 3, 6, 6), sequential=True)
    assert isinstance(seq.module.alias, nn.GroupNorm) and seq.module.norm is seq.module.alias


def test_bad_num_groups() -> None:
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12))
    r = nf.batchnorm_to_groupnorm(model, num_groups=5)
    assert not r.modified and "does not divide its 12 channels" in r.skipped[0].reason
    with pytest.raises(UsageError):
        nf.batchnorm_to_groupnorm(model, num_groups=0)


def test_custom_forward_subclass_is_skipped() -> None:
    class Odd(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Odd(8))
    r = nf.batchnorm_to_groupnorm(model)
    assert not r.modified and "own forward()" in r.skipped[0].reason


def test_contract_inplace_flags_dtype_requires_grad() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    model = randomize_bn_stats(model).double()
    model.train()
    model[4].eval()
    model[1].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    snap = state_snapshot(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    r = nf.batchnorm_to_groupnorm(model, calibration_data=x)
    assert_state_equal(model, snap)
    assert isinstance(model[1], nn.BatchNorm2d) and model.training and not model[4].training
    out = r.module
    assert out.training and out[1].training and not out[4].training
    assert out[1].weight.dtype == torch.float64 and not out[1].weight.requires_grad
    assert out[4].weight.requires_grad
    r2 = nf.batchnorm_to_groupnorm(model, inplace=True)
    assert r2.module is model and isinstance(model[1], nn.GroupNorm)


def test_calibration_data_forms_and_errors() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    model = randomize_bn_stats(nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8))).eval()
    x = torch.randn(16, 1, 6, 6)
    ref = nf.batchnorm_to_groupnorm(model, calibration_data=x).module[1]
    loader = DataLoader(TensorDataset(x, torch.zeros(16)), batch_size=5)
    via_loader = nf.batchnorm_to_groupnorm(model, calibration_data=loader).module[1]
    # the same least-squares fit from batches instead of one tensor: the policy's rule, as for any rewrite
    for got, want in ((via_loader.weight, ref.weight), (via_loader.bias, ref.bias)):
        v = compare(want, got)
        assert v.passed, v.describe()
    with pytest.raises(InputError, match="do not fit the model"):
        nf.batchnorm_to_groupnorm(model, calibration_data=torch.randn(4, 3, 6, 6))
    with pytest.raises(InputError, match="no batch"):
        nf.batchnorm_to_groupnorm(model, calibration_data=[])


def _digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return x[perm[:1300]], y[perm[:1300]], x[perm[1300:]], y[perm[1300:]]


def test_warm_start_on_a_trained_cnn(one_thread) -> None:
    """A BatchNorm CNN trained on digits, converted naively and warm-started (one pass and sequential).

    Measured (seed 0, 60 steps of training): accuracy 0.95 trained, ~0.1 naive, ~0.7-0.9 warm-started.
    """
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = _digits()
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / 60)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        idx = torch.randint(0, len(x_tr), (64,), generator=g)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()

    def score(m: nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            out = m(x_te)
        return (out.argmax(1) == y_te).float().mean().item(), ((out - ref).norm() / ref.norm()).item()

    with torch.no_grad():
        ref = model(x_te)
    calib = x_tr[:256]
    naive = nf.batchnorm_to_groupnorm(model)
    warm = nf.batchnorm_to_groupnorm(model, calibration_data=calib)
    seq = nf.batchnorm_to_groupnorm(model, calibration_data=calib, sequential=True)
    acc, _ = score(model)
    acc_naive, err_naive = score(naive.module)
    acc_warm, err_warm = score(warm.module)
    acc_seq, err_seq = score(seq.module)
    assert acc > 0.9
    # least squares: every layer fits its target at least as well as gamma/beta on the data it was fitted on
    for r in (warm, seq):
        for path, m in r.metrics["calibration"].items():
            assert m["fitted_rmse"] <= m["naive_rmse"] * (1 + 1e-9), path
    # and the whole model is much closer to the trained one than the naive conversion
    assert err_warm < err_naive and err_seq < err_naive
    assert acc_warm > acc_naive + 0.2 and acc_seq > acc_naive + 0.2, (acc_naive, acc_warm, acc_seq)
    assert all(c.details["warm_start"] for c in warm.changes)


@pytest.mark.zoo
def test_torchvision_resnet_all_layers_converted_and_warm_start_helps(one_thread) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = randomize_bn_stats(resnet18(num_classes=10), seed=2).eval()
    x = torch.randn(8, 3, 32, 32)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    naive = nf.batchnorm_to_groupnorm(model)
    warm = nf.batchnorm_to_groupnorm(model, calibration_data=x)
    assert len(naive.changes) == n_bn == 20 and not naive.skipped
    assert not any(isinstance(m, nn.BatchNorm2d) for m in warm.module.modules())
    ref = run_eval(model, (x,))
    e_naive = (run_eval(naive.module, (x,)) - ref).norm() / ref.norm()
    e_warm = (run_eval(warm.module, (x,)) - ref).norm() / ref.norm()
    assert e_warm < e_naive


@pytest.mark.zoo
def test_timm_efficientnet_norm_act_layers(one_thread) -> None:
    import timm
    from timm.layers import BatchNormAct2d, GroupNormAct

    model = randomize_bn_stats(timm.create_model("efficientnet_b0", pretrained=False, num_classes=5)).eval()
    acts = {p: type(m.act) for p, m in model.named_modules() if isinstance(m, BatchNormAct2d)}
    r = nf.batchnorm_to_groupnorm(model, example_inputs=(torch.randn(1, 3, 32, 32),))
    assert not r.skipped and len(r.changes) == len(acts) > 40
    mods = dict(r.module.named_modules())
    for p, act in acts.items():
        assert isinstance(mods[p], GroupNormAct) and type(mods[p].act) is act
    out = run_eval(r.module, (torch.randn(2, 3, 32, 32),))
    assert torch.isfinite(out).all()
