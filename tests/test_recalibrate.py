"""nf.recalibrate: every estimator against an independent reference, the data forms, the promises, the errors.

The reference for "population" runs torch's own training-mode BatchNorm (so the
layers above normalize with batch statistics, as during recalibration), keeps
every BatchNorm input in float64 and computes the pooled mean and unbiased
variance directly. "cumulative" and "ema" are checked against torch's
training-mode updates with momentum=None and the layer's momentum.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import defaultdict
from typing import Any, Callable, Iterable

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normfold as nf
from tests.conftest import assert_state_equal, randomize_bn_stats, state_snapshot
from normfold.errors import InputError, NormfoldError, UsageError
from normfold.recalibrate import LayerShift, RecalibrationResult, recalibrate
from normfold.tolerances import RECALIBRATE

TOL32 = RECALIBRATE[torch.float32]
TOL64 = RECALIBRATE[torch.float64]


class Probe(nn.Module):
    """Records the training flag it had in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return x


class SmallNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.probe = Probe()
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(6, momentum=0.3)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.bn3 = nn.BatchNorm1d(10)
        self.head = nn.Linear(10, 3)
        randomize_bn_stats(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(torch.relu(self.bn1(self.conv1(x))))
        x = self.probe(x)
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(torch.relu(self.bn3(self.fc(x.flatten(1)))))


def shifted_data(n: int = 90, seed: int = 1, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 10, 10, generator=g, dtype=torch.float64) * 2.5 + 1.5).to(dtype)


def split(x: torch.Tensor, bs: int) -> list[torch.Tensor]:
    return [x[i:i + bs] for i in range(0, len(x), bs)]


def bn_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}


def reference_population(model: nn.Module, batches: Iterable[Any],
                         call: Callable[[nn.Module, Any], Any] = lambda m, b: m(b)) -> dict[str, tuple]:
    """Pooled float64 mean and unbiased variance of every BatchNorm input, with torch's training-mode BN."""
    ref = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name, m in bn_layers(ref).items():
        m.training = True  # the layer only: a timm BatchNormAct2d's drop child stays in eval
        m.register_forward_pre_hook(
            lambda mod, args, name=name: seen[name].append(args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)))
    with torch.no_grad():
        for b in batches:
            call(ref, b)
    out = {}
    for name, chunks in seen.items():
        allv = torch.cat(chunks, dim=1)
        out[name] = (allv.mean(1), allv.var(1, correction=1), allv.shape[1])
    return out


def reference_torch_training(model: nn.Module, batches: Iterable[torch.Tensor], *, reset: bool,
                             momentum: Any = "keep") -> nn.Module:
    """What torch's own training-mode BatchNorm leaves in the running statistics (only BNs in training mode)."""
    ref = copy.deepcopy(model).eval()
    for m in bn_layers(ref).values():
        if reset:
            m.reset_running_stats()
        if momentum != "keep":
            m.momentum = momentum
        m.training = True
    with torch.no_grad():
        for b in batches:
            ref(b)
    return ref


def assert_stats(model: nn.Module, expected: dict[str, tuple], tol) -> None:
    for name, m in bn_layers(model).items():
        mean, var = expected[name][0], expected[name][1]
        assert tol.allclose(m.running_mean, mean), (name, (m.running_mean.double() - mean).abs().max())
        assert tol.allclose(m.running_var, var), (name, (m.running_var.double() - var).abs().max())


# ----------------------------------------------------------------------------------------------
# estimators against references


def test_population_matches_pooled_statistics_with_uneven_batches() -> None:
    model = SmallNet()
    x = shifted_data(90)
    r = recalibrate(model, x, batch_size=32, progress=False)  # batches of 32, 32, 26
    assert isinstance(r, RecalibrationResult) and r.batches == 3 and r.samples == 90
    expected = reference_population(model, split(x, 32))
    assert_stats(r.model, expected, TOL32)
    for name, m in bn_layers(r.model).items():
        assert int(m.num_batches_tracked) == 3
        assert r.shift(name).count == expected[name][2]


def test_population_is_exact_in_float64_and_not_an_average_of_averages() -> None:
    """One BatchNorm on the input: a big batch N(0, 1) and a tiny batch N(5, 1) pool by their sizes."""
    bn = nn.BatchNorm1d(4).double()
    g = torch.Generator().manual_seed(0)
    big = torch.randn(60, 4, generator=g, dtype=torch.float64)
    tiny = torch.randn(3, 4, generator=g, dtype=torch.float64) + 5
    r = recalibrate(bn, [big, tiny], progress=False)
    pooled = torch.cat([big, tiny])
    assert TOL64.allclose(r.model.running_mean, pooled.mean(0))
    assert TOL64.allclose(r.model.running_var, pooled.var(0, correction=1))
    averaged = (big.mean(0) + tiny.mean(0)) / 2
    assert (r.model.running_mean - averaged).abs().min() > 1.0, "population must not average per-batch averages"
    c = recalibrate(bn, [big, tiny], estimator="cumulative", progress=False)
    assert TOL64.allclose(c.model.running_mean, averaged)


def test_cumulative_matches_torch_momentum_none() -> None:
    model = SmallNet()
    x = shifted_data(90)
    r = recalibrate(model, x, estimator="cumulative", batch_size=16, progress=False)
    ref = reference_torch_training(model, split(x, 16), reset=True, momentum=None)
    for name, m in bn_layers(r.model).items():
        rm = bn_layers(ref)[name]
        assert TOL32.allclose(m.running_mean, rm.running_mean), name
        assert TOL32.allclose(m.running_var, rm.running_var), name
        assert int(m.num_batches_tracked) == int(rm.num_batches_tracked) == 6


def test_ema_matches_torch_training_with_the_layers_momentum_and_no_reset() -> None:
    model = SmallNet()
    model.bn3.momentum = None  # continues the cumulative average from num_batches_tracked
    model.bn3.num_batches_tracked.fill_(4)
    x = shifted_data(90)
    r = recalibrate(model, x, estimator="ema", batch_size=16, progress=False)
    ref = reference_torch_training(model, split(x, 16), reset=False)
    for name, m in bn_layers(r.model).items():
        rm = bn_layers(ref)[name]
        assert TOL32.allclose(m.running_mean, rm.running_mean), name
        assert TOL32.allclose(m.running_var, rm.running_var), name
        assert int(m.num_batches_tracked) == int(rm.num_batches_tracked)
    assert int(r.model.bn3.num_batches_tracked) == 4 + 6
    assert r.model.bn2.momentum == 0.3 and r.model.bn3.momentum is None


def test_real_architecture_population_matches_reference() -> None:
    """torchvision resnet18 with random weights and statistics: 20 BatchNorms, residual additions."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn_stats(torchvision.models.resnet18(num_classes=5), 1)
    x = torch.randn(12, 3, 32, 32) * 1.5 + 0.3
    r = recalibrate(model, x, batch_size=6, progress=False)
    expected = reference_population(model, split(x, 6))
    assert len(r.shifts) == len(expected) == len(bn_layers(model)) == 20
    assert_stats(r.model, expected, TOL32)


def test_timm_batchnormact2d_keeps_its_act_and_drop_and_matches_reference() -> None:
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), layers.BatchNormAct2d(6, act_layer=nn.ReLU, drop_layer=nn.Dropout),
                          nn.Conv2d(6, 4, 3), layers.BatchNormAct2d(4, act_layer=nn.SiLU)).eval()
    randomize_bn_stats(model, 2)
    x = shifted_data(30)
    r = recalibrate(model, x, batch_size=10, progress=False)
    assert_stats(r.model, reference_population(model, split(x, 10)), TOL32)
    assert type(r.model[1]).__name__ == "BatchNormAct2d" and "training mode" not in r.changes[0].message


# ----------------------------------------------------------------------------------------------
# what happens to the model


def test_only_batchnorm_statistics_change_dropout_stays_off_and_flags_come_back() -> None:
    model = SmallNet()
    model.train()
    model.fc.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    snap = state_snapshot(model)
    x = shifted_data(64)
    r1 = recalibrate(model, x, batch_size=32, progress=False)
    r2 = recalibrate(model, x, batch_size=32, progress=False)
    # dropout on would make two runs differ (and differ from the reference, which has it off)
    for name, m in bn_layers(r1.model).items():
        assert torch.equal(m.running_mean, bn_layers(r2.model)[name].running_mean)
    assert model.probe.seen == [] and r1.model.probe.seen == [False, False]
    assert {n: m.training for n, m in r1.model.named_modules()} == flags
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert_state_equal(model, snap)  # inplace=False: the input is untouched
    changed = {k for k, v in r1.model.state_dict().items() if not torch.equal(v, snap[k])}
    assert changed == {f"{b}.{s}" for b in ("bn1", "bn2", "bn3") for s in ("running_mean", "running_var",
                                                                            "num_batches_tracked")}
    assert r1.model.bn2.momentum == 0.3 and r1.model.bn1.momentum == 0.1


def test_inplace_edits_and_returns_the_same_object() -> None:
    model = SmallNet()
    before = model.bn1.running_mean.clone()
    r = recalibrate(model, shifted_data(40), inplace=True, progress=False)
    assert r.model is model and r.module is model
    assert not torch.equal(model.bn1.running_mean, before)


def test_recalibration_recovers_eval_outputs_on_the_new_domain() -> None:
    """After recalibration, eval BN outputs on the new data are standardized per channel again."""
    model = SmallNet()
    x = shifted_data(200)
    r = recalibrate(model, x, progress=False)
    feats = {}
    r.model.bn1.register_forward_hook(lambda m, a, out: feats.setdefault("bn1", (a[0] - m.running_mean[:, None, None])
                                                                        / torch.sqrt(m.running_var[:, None, None] + m.eps)))
    with torch.no_grad():
        r.model.eval()(x)
    z = feats["bn1"].transpose(0, 1).reshape(8, -1)
    # a statistical property of the features (standardized per channel), not a comparison of two models
    assert z.mean(1).abs().max() < 1e-4 and (z.var(1) - 1).abs().max() < 1e-3


def test_shift_reports_how_far_the_domain_moved() -> None:
    bn = nn.BatchNorm1d(3)  # running stats mean 0, var 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 3, generator=g) * 2 + 3
    r = recalibrate(bn, x, progress=False)
    s = r.shift("<model>")
    assert isinstance(s, LayerShift) and s.path == "<model>"
    z = (r.model.running_mean.double() - 0) / math.sqrt(1 + bn.eps)
    assert math.isclose(s.mean_shift, float(z.pow(2).mean().sqrt()), rel_tol=1e-6)
    assert 2.8 < s.mean_shift < 3.2 and 1.2 < s.var_shift < 1.6  # ln(4) = 1.39
    # the same data again: nothing moves
    again = recalibrate(r.model, x, progress=False)
    assert again.shifts[0].mean_shift < 1e-6 and again.shifts[0].var_shift < 1e-5  # a reported metric at rounding level
    assert "mean moved" in str(r.changes[0]) and r.to_dict()["shifts"][0]["path"] == "<model>"


def test_batchnorm_called_twice_pools_both_calls() -> None:
    class Siamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(a)).mean() + self.bn(self.conv(b) * 3 + 1).mean()

    torch.manual_seed(0)
    model = Siamese().eval()
    a, b = shifted_data(20, 2), shifted_data(20, 3)
    r = recalibrate(model, (a, b), batch_size=10, progress=False)
    with torch.no_grad():
        ca, cb = model.conv(a).double(), (model.conv(b) * 3 + 1).double()
    pooled = torch.cat([ca.transpose(0, 1).reshape(4, -1), cb.transpose(0, 1).reshape(4, -1)], 1)
    assert TOL32.allclose(r.model.bn.running_mean, pooled.mean(1))
    assert TOL32.allclose(r.model.bn.running_var, pooled.var(1))
    assert r.shifts[0].calls == 4 and "called 2 times per forward" in r.changes[0].message


def test_syncbatchnorm_on_cpu_without_distributed_matches_plain_batchnorm() -> None:
    model = SmallNet()
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(sync.bn1, nn.SyncBatchNorm)
    x = shifted_data(50)
    r_plain = recalibrate(model, x, batch_size=25, progress=False)
    r_sync = recalibrate(sync, x, batch_size=25, progress=False)
    for name in ("bn1", "bn2"):
        assert torch.equal(getattr(r_sync.model, name).running_mean, getattr(r_plain.model, name).running_mean)
    with torch.no_grad():
        assert torch.equal(r_sync.model.eval()(x), r_plain.model.eval()(x))  # bitwise: the same statistics


def test_batchnorm_subclass_with_its_own_forward_runs_in_training_mode() -> None:
    class ScaledBN(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBN(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    x = shifted_data(30)
    r = recalibrate(model, x, batch_size=10, progress=False)
    assert_stats(r.model, reference_population(model, split(x, 10)), TOL32)
    assert "own forward run in training mode" in r.changes[0].message
    assert not r.model[1].training


def test_frozen_untracked_and_uncalled_batchnorms_are_skipped_with_reasons() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.frozen = FrozenBatchNorm2d(4)
            self.untracked = nn.BatchNorm2d(4, track_running_stats=False)
            self.bn = nn.BatchNorm2d(4)
            self.unused = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.untracked(self.frozen(self.conv(x))))

    model = Mixed().eval()
    randomize_bn_stats(model, 3)
    unused = state_snapshot(model.unused)
    r = recalibrate(model, shifted_data(20), progress=False)
    reasons = {s.paths[0]: s.reason for s in r.skipped}
    assert set(reasons) == {"frozen", "untracked", "unused"}
    assert "convert it to BatchNorm2d" in reasons["frozen"]
    assert "track_running_stats=False" in reasons["untracked"]
    assert "not called" in reasons["unused"]
    assert [s.path for s in r.shifts] == ["bn"]
    assert_state_equal(r.model.unused, unused)
    assert torch.equal(r.model.frozen.running_mean, model.frozen.running_mean)


# ----------------------------------------------------------------------------------------------
# data forms


def test_every_data_form_gives_the_same_statistics() -> None:
    model = SmallNet()
    x = shifted_data(48)
    expected = recalibrate(model, x, batch_size=16, progress=False)

    def gen():
        yield from split(x, 16)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(48)), batch_size=16)
    runs = {
        "list of batches": recalibrate(model, split(x, 16), progress=False),
        "generator": recalibrate(model, gen(), progress=False),
        "numpy": recalibrate(model, x.numpy(), batch_size=16, progress=False),
        "tuple": recalibrate(model, (x,), batch_size=16, progress=False),
        "dict": recalibrate(model, {"x": x}, batch_size=16, progress=False),
        "DataLoader + forward_fn": recalibrate(model, loader, forward_fn=lambda m, b: m(b[0]), progress=False),
        "infinite + max_batches": recalibrate(model, itertools.cycle(split(x, 16)), max_batches=3, progress=False),
    }
    for form, r in runs.items():
        assert r.batches == 3, form
        for name, m in bn_layers(r.model).items():
            assert TOL32.allclose(m.running_mean, bn_layers(expected.model)[name].running_mean), form
            assert TOL32.allclose(m.running_var, bn_layers(expected.model)[name].running_var), form


def test_tuple_and_dict_data_are_positional_and_keyword_arguments() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn_a = nn.BatchNorm1d(3)
            self.bn_b = nn.BatchNorm1d(2)

        def forward(self, a: torch.Tensor, b: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return self.bn_a(a).sum(1) + self.bn_b(b * scale).sum(1)

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 3, generator=g) + 2, torch.randn(40, 2, generator=g) * 3
    r = recalibrate(TwoInputs(), (a, b), batch_size=8, progress=False)
    assert TOL32.allclose(r.model.bn_a.running_mean, a.double().mean(0))
    assert TOL32.allclose(r.model.bn_b.running_var, b.double().var(0))
    r = recalibrate(TwoInputs(), {"b": b, "a": a}, batch_size=8, progress=False)
    assert TOL32.allclose(r.model.bn_b.running_mean, b.double().mean(0))
    r = recalibrate(TwoInputs(), [{"a": a[:20], "b": b[:20], "scale": 2.0}], progress=False)
    assert TOL32.allclose(r.model.bn_b.running_mean, (2 * b[:20]).double().mean(0))


def test_progress_bar_appears_on_long_runs_only(monkeypatch, capsys) -> None:
    import normfold.recalibrate as _  # noqa: F401  (the module, not the function of the same name)
    import sys

    mod = sys.modules["normfold.recalibrate"]
    started = []
    real = mod._Progress.update

    def spy(self, done):
        real(self, done)
        if self.bar is not None:
            started.append(done)

    monkeypatch.setattr(mod._Progress, "update", spy)
    recalibrate(SmallNet(), shifted_data(40), batch_size=10, progress=True)
    assert started == []  # a short run stays quiet
    monkeypatch.setattr(mod, "_PROGRESS_DELAY", 0.0)
    recalibrate(SmallNet(), shifted_data(40), batch_size=10, progress=False)
    assert started == []
    recalibrate(SmallNet(), shifted_data(40), batch_size=10, progress=True)
    assert started == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("kwargs, data, error, fix", [
    ({"estimator": "median"}, None, UsageError, "use one of 'population', 'cumulative', 'ema'"),
    ({"max_batches": 0}, None, UsageError, "positive integer"),
    ({"batch_size": 0}, None, UsageError, "positive integer"),
    ({"forward_fn": 3}, None, UsageError, "callable forward_fn(model, batch)"),
    ({"batch_size": 4}, "list", UsageError, "drop batch_size"),
    ({}, torch.zeros(0, 3, 10, 10), InputError, "0 samples"),
    ({}, [], InputError, "yielded no batch"),
    ({}, 42, InputError, "pass a tensor, a tuple or dict of tensors, or an iterable"),
    ({}, torch.randn(8, 5, 10, 10), InputError, "does not fit the model"),
    ({}, torch.randn(8, 3, 2, 2), InputError, "pass data of the shape and dtype the model expects"),
    ({}, (torch.randn(8, 3, 10, 10), torch.randn(7, 3, 10, 10)), InputError, "give them the same length"),
    ({}, (torch.randn(8, 3, 10, 10), "flag"), InputError, "pass a list or DataLoader of ready batches"),
    ({}, "loader", InputError, "forward_fn=lambda model, batch: model(batch[0])"),
    ({}, "nan", InputError, "non-finite statistics"),
])
def test_bad_input_raises_an_error_that_names_the_fix(kwargs, data, error, fix) -> None:
    model = SmallNet()
    snap = state_snapshot(model)
    if data is None:
        data = shifted_data(8)
    elif isinstance(data, str) and data == "list":
        data = [shifted_data(8)]
    elif isinstance(data, str) and data == "nan":
        bad = shifted_data(8, 2)
        bad[1, 2, 3, 3] = float("nan")
        data = [shifted_data(8), bad]  # the first batch has already changed the buffers when the NaN comes
    elif isinstance(data, str) and data == "loader":
        x = shifted_data(8)
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(8)), batch_size=4)
    with pytest.raises(error) as info:
        recalibrate(model, data, progress=False, inplace=True, **kwargs)
    assert isinstance(info.value, NormfoldError)
    assert fix in str(info.value)
    assert_state_equal(model, snap)


def test_batch_of_one_value_per_channel_is_refused() -> None:
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(InputError, match="use a batch size of 2 or more"):
        recalibrate(bn, torch.randn(5, 3), batch_size=1, progress=False)


def test_a_failure_midway_leaves_the_model_as_it_was() -> None:
    model = SmallNet()
    model.train()
    flags = {n: m.training for n, m in model.named_modules()}
    snap = state_snapshot(model)
    batches = [shifted_data(8), shifted_data(8, 2), torch.randn(8, 4, 10, 10)]
    with pytest.raises(InputError, match="expects 3 channels|does not fit"):
        recalibrate(model, batches, inplace=True, progress=False)
    assert_state_equal(model, snap)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_model_without_batchnorm_is_refused_with_the_reason() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    with pytest.raises(InputError, match="no BatchNorm with running statistics"):
        recalibrate(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), torch.randn(4, 3), progress=False)
    with pytest.raises(InputError, match="convert it to BatchNorm2d"):
        recalibrate(nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2d(3)), torch.randn(4, 3, 4, 4), progress=False)


def test_public_api() -> None:
    assert nf.recalibrate is recalibrate
    assert nf.RecalibrationResult is RecalibrationResult
    with pytest.raises(NormfoldError, match="expected a torch.nn.Module"):
        recalibrate("model.pt", torch.randn(2, 3))  # type: ignore[arg-type]
