"""nf.recalibrate across 2 real processes (gloo on 127.0.0.1) against one process over the same batches.

One spawn runs every scenario, to keep the test fast: population and
cumulative on plain BatchNorm, a DistributedDataParallel-wrapped model
(unwrapped), population on a model converted to
nn.SyncBatchNorm (eval on CPU), "ema" refused, and a bad batch on one rank
that must fail both ranks (no hang) and leave both models untouched.
Each rank writes what it ended with to a file; the parent compares.
"""

from __future__ import annotations

import copy
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from normfold.errors import InputError, NormfoldError, UsageError
from normfold.recalibrate import recalibrate
from normfold.tolerances import RECALIBRATE
from normfold.verify import compare

pytestmark = pytest.mark.distributed

WORLD = 2
#: batch sizes of the whole data set, in order; rank 0 runs the first three, rank 1 the last two
SIZES = [16, 16, 12, 16, 7]
SHARDS = {0: [0, 1, 2], 1: [3, 4]}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.Conv2d(8, 6, 3, stride=2), nn.BatchNorm2d(6, momentum=0.2), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3),
    ).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def all_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(n, 3, 10, 10, generator=g) * 2 + 1 for n in SIZES]


def probe_input() -> torch.Tensor:
    return torch.randn(5, 3, 10, 10, generator=torch.Generator().manual_seed(3)) * 2 + 1


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        mine = [all_batches()[i] for i in SHARDS[rank]]
        out: dict[str, object] = {}
        for estimator in ("population", "cumulative"):
            r = recalibrate(build_model(), mine, estimator=estimator, progress=False)
            out[estimator] = _bn_state(r.model)
            out[f"{estimator}.world_size"] = r.world_size
            out[f"{estimator}.count"] = [s.count for s in r.shifts]
        ddp = nn.parallel.DistributedDataParallel(build_model())
        r = recalibrate(ddp, mine, progress=False)
        out["ddp"] = _bn_state(r.model)
        out["ddp.kind"] = type(r.model).__name__
        sync = nn.SyncBatchNorm.convert_sync_batchnorm(build_model())
        r = recalibrate(sync, mine, progress=False)
        out["sync.kinds"] = sorted({type(m).__name__ for m in r.model.modules() if "Norm" in type(m).__name__})
        out["sync"] = _bn_state(r.model)
        with torch.no_grad():
            out["sync.output"] = r.model.eval()(probe_input())
        try:
            recalibrate(build_model(), mine, estimator="ema", progress=False)
        except UsageError as exc:
            out["ema.error"] = str(exc)
        model = build_model()
        before = _bn_state(model)
        bad = mine if rank == 0 else mine[:1] + [torch.randn(4, 5, 10, 10)]
        try:
            recalibrate(model, bad, inplace=True, progress=False)
        except NormfoldError as exc:
            out["failure.error"] = f"{type(exc).__name__}: {exc}"
        out["failure.untouched"] = all(torch.equal(v, _bn_state(model)[k]) for k, v in before.items())
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    outdir = tmp_path_factory.mktemp("recalibrate_dist")
    for attempt in range(3):
        try:
            torch.multiprocessing.spawn(_worker, args=(_free_port(), str(outdir)), nprocs=WORLD, join=True)
            break
        except torch.multiprocessing.ProcessRaisedException as exc:
            # another process on this machine may take the free port between the probe and the bind
            if "address already in use" not in str(exc).lower() or attempt == 2:
                raise
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single_process(estimator: str, model: nn.Module | None = None):
    return recalibrate(model if model is not None else build_model(), all_batches(), estimator=estimator,
                       progress=False)


@pytest.mark.parametrize("estimator", ["population", "cumulative"])
def test_every_rank_ends_with_the_single_process_statistics(ranks: list[dict], estimator: str) -> None:
    single = _single_process(estimator)
    expected = _bn_state(single.model)
    tol = RECALIBRATE[torch.float32]
    for rank, out in enumerate(ranks):
        assert out[f"{estimator}.world_size"] == WORLD
        got = out[estimator]
        assert set(got) == set(expected)
        for k, v in expected.items():
            if "num_batches" in k:
                assert int(got[k]) == int(v) == len(SIZES), (rank, k)
            else:
                assert tol.allclose(got[k], v), (rank, k, (got[k].double() - v.double()).abs().max())
        assert out[f"{estimator}.count"] == [s.count for s in single.shifts]
    # all-reduced sums: every rank computes the same numbers, bit for bit
    for k in expected:
        assert torch.equal(ranks[0][estimator][k], ranks[1][estimator][k]), k


def test_a_ddp_wrapped_model_is_unwrapped_and_recalibrated_like_the_plain_one(ranks: list[dict]) -> None:
    for out in ranks:
        assert out["ddp.kind"] == "Sequential"  # the inner module (a copy of it: inplace=False)
        for k, v in out["population"].items():
            assert torch.equal(out["ddp"][k], v), k


def test_population_differs_from_averaging_the_ranks(ranks: list[dict]) -> None:
    """Rank 0 holds 44 samples, rank 1 holds 23: an average of the two ranks' statistics would be wrong."""
    per_rank = [_bn_state(recalibrate(build_model(), [all_batches()[i] for i in SHARDS[r]], progress=False).model)
                for r in range(WORLD)]
    key = "9.running_mean"
    averaged = (per_rank[0][key] + per_rank[1][key]) / 2
    # the average fails the rule recalibrated statistics are held to (RECALIBRATE), against the population ones
    assert not RECALIBRATE[torch.float32].allclose(averaged, ranks[0]["population"][key])


def test_syncbatchnorm_model_recalibrates_on_cpu_and_matches_one_process(ranks: list[dict]) -> None:
    single = _single_process("population")
    with torch.no_grad():
        expected_out = single.model.eval()(probe_input())
    tol = RECALIBRATE[torch.float32]
    for out in ranks:
        assert out["sync.kinds"] == ["SyncBatchNorm"]
        for k, v in _bn_state(single.model).items():
            assert tol.allclose(out["sync"][k], v), k
        v = compare(expected_out, out["sync.output"])  # the model's outputs: normfold.verify's rule, the policy
        assert v.passed, v.describe()


def test_ema_is_refused_across_processes(ranks: list[dict]) -> None:
    for out in ranks:
        assert "use 'population' (recommended) or 'cumulative'" in out["ema.error"]


def test_a_bad_batch_on_one_rank_fails_every_rank_and_touches_nothing(ranks: list[dict]) -> None:
    assert ranks[1]["failure.error"].startswith("InputError") and "does not fit" in ranks[1]["failure.error"]
    assert ranks[0]["failure.error"].startswith("NormfoldError") and "failed on another rank" in ranks[0]["failure.error"]
    assert ranks[0]["failure.untouched"] and ranks[1]["failure.untouched"]
