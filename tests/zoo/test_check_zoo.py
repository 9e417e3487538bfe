"""No false alarms: the checker passes a clean fold + export of every torchvision classification model.

For every model in ``torchvision.models.list_models(module=torchvision.models)``
(``NORMFOLD_ZOO=full``; by default, and in CI, the 22 of :data:`CI_MODELS`, one of
each family, the others reported as skipped with that reason) (random weights, BatchNorm statistics and affine parameters randomized with
:func:`tests.conftest.randomize_bn_stats`, eval), at the smallest input size
it accepts: fold with :func:`normfold.fold_batchnorm`, then run the full
checker (:func:`normfold.check`: export with the dynamo exporter, onnxruntime
with providers cuda then cpu, every probe) at the DEFAULT tolerances. Every
check must pass.

Cost. Measured: 1000 s of CPU for the 80 models (:data:`COST`), about 70% of
it in the dynamo exporter itself (torch.export with a symbolic batch,
decompositions, translation, onnxscript's optimizer: 2.5 s for resnet18, 13 s
for swin_t, 24 s for vit_h_14), the rest mostly forward passes of the
224-pixel models (ViTs, MaxViT) for the outputs and the batch-independence
probe; vit_h_14 alone takes 117 s. pytest-xdist is not a test dependency, so
the models run in two worker processes started once for the session
(spawned; one torch and one onnxruntime thread each), longest first by the
measured cost, and each model is still its own parametrized test that waits
for its result: 8 min 42 s measured on two otherwise idle cores for all 80
(15 min on a loaded day, which is why CI checks :data:`CI_MODELS`). The two models
over 2 GB of weights (exported with external data) go to the same worker so
that they are never in memory at the same time; their check peaks at 11 GB
and is skipped, saying so, on a machine with less than :data:`HUGE_RAM_GB`
available. ``NORMFOLD_ZOO_WORKERS`` sets the number of workers (1 runs them
one after another).

Every model passes at the default tolerance: the largest error of a clean
fold + export is 4.0e-6 of the output's scale (swin_v2_b), against the
default 2e-5 (:data:`normfold.tolerances.POLICY`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
import warnings
from typing import Any

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.zoo

#: square input sizes tried in order; the first the model accepts is used (small keeps the zoo affordable)
SIZES = (32, 64, 75, 224)

#: batch of the checked inputs (>= 2, so that the batch-independence probe has a sample and its batch-mates)
BATCH = 2

#: measured CPU seconds per model (build + fold + check with export and every probe, one thread, in a warm
#: worker), used only to balance the workers; a model missing here counts as :data:`DEFAULT_COST`
COST: dict[str, float] = {
    "alexnet": 5.4, "convnext_base": 12.5, "convnext_large": 18.1, "convnext_small": 9.7, "convnext_tiny": 7.1,
    "densenet121": 13.4, "densenet161": 16.2, "densenet169": 17.9, "densenet201": 20.7, "efficientnet_b0": 6.1,
    "efficientnet_b1": 6.2, "efficientnet_b2": 8.0, "efficientnet_b3": 6.9, "efficientnet_b4": 10.8,
    "efficientnet_b5": 10.4, "efficientnet_b6": 13.5, "efficientnet_b7": 15.1, "efficientnet_v2_l": 28.0,
    "efficientnet_v2_m": 13.1, "efficientnet_v2_s": 9.8, "googlenet": 3.9, "inception_v3": 6.7, "maxvit_t": 31.4,
    "mnasnet0_5": 2.8, "mnasnet0_75": 3.7, "mnasnet1_0": 3.6, "mnasnet1_3": 3.6, "mobilenet_v2": 6.2,
    "mobilenet_v3_large": 6.5, "mobilenet_v3_small": 7.0, "regnet_x_16gf": 5.6, "regnet_x_1_6gf": 3.5,
    "regnet_x_32gf": 8.8, "regnet_x_3_2gf": 5.3, "regnet_x_400mf": 4.4, "regnet_x_800mf": 3.1, "regnet_x_8gf": 5.6,
    "regnet_y_16gf": 9.7, "regnet_y_1_6gf": 6.3, "regnet_y_32gf": 16.5, "regnet_y_3_2gf": 6.0,
    "regnet_y_400mf": 5.3, "regnet_y_800mf": 4.1, "regnet_y_8gf": 7.1, "resnet101": 6.7, "resnet152": 9.2,
    "resnet18": 2.5, "resnet34": 3.4, "resnet50": 4.2, "resnext101_32x8d": 10.5, "resnext101_64x4d": 7.9,
    "resnext50_32x4d": 5.1, "shufflenet_v2_x0_5": 3.8, "shufflenet_v2_x1_0": 5.3, "shufflenet_v2_x1_5": 3.8,
    "shufflenet_v2_x2_0": 4.7, "squeezenet1_0": 2.7, "squeezenet1_1": 2.9, "swin_b": 29.5, "swin_s": 28.4,
    "swin_t": 13.6, "swin_v2_b": 37.1, "swin_v2_s": 30.3, "swin_v2_t": 16.6, "vgg11": 6.6, "vgg11_bn": 11.7,
    "vgg13": 6.0, "vgg13_bn": 10.9, "vgg16": 6.7, "vgg16_bn": 12.1, "vgg19": 7.8, "vgg19_bn": 11.7,
    "vit_b_16": 19.2, "vit_b_32": 15.3, "vit_l_16": 53.2, "vit_l_32": 38.0, "wide_resnet101_2": 10.2,
    "wide_resnet50_2": 4.3, "vit_h_14": 116.5, "regnet_y_128gf": 28.0,
}
DEFAULT_COST = 10.0

#: models whose weights exceed 2 GB (ONNX external data): scheduled on the same worker
HUGE = ("vit_h_14", "regnet_y_128gf")
#: memory a huge model's check needs (measured peak resident size of the worker on vit_h_14: 11.1 GB: the model,
#: its folded copy, and onnxruntime's session with its pre-packed weights)
HUGE_RAM_GB = 12.0


def _available_gb() -> float | None:
    """MemAvailable from /proc/meminfo (Linux), in GB; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        return None
    return None

MODELS = torchvision.models.list_models(module=torchvision.models)

#: what the default run (CI) checks: one model of each family, the families' distinct ops all covered
#: (BatchNorm folds into plain, grouped, depthwise and dilated convs, SE blocks, channel shuffle, inception
#: branches, dense concatenation, LayerNorm/attention in ViT, Swin V2 and MaxViT); about a fifth of the
#: full sweep's CPU time (:data:`COST`)
CI_MODELS = ("alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
             "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_large", "regnet_x_400mf",
             "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1",
             "swin_v2_t", "vgg11_bn", "vit_b_32", "wide_resnet50_2")

#: ``NORMFOLD_ZOO=full`` checks all 80 models (about 15 minutes on two cores); the default is :data:`CI_MODELS`
FULL = os.environ.get("NORMFOLD_ZOO", "").lower() == "full"
SELECTED = MODELS if FULL else [n for n in MODELS if n in CI_MODELS]


def _build(name: str) -> torch.nn.Module:
    """The model with seeded random weights, in eval; no weight left at zero (ViT's zero-initialized head
    would make every output 0 and every comparison pass trivially)."""
    from tests.conftest import fast_random_init

    kw: dict[str, Any] = {}
    if name in {"googlenet", "inception_v3"}:
        kw = {"init_weights": True, "aux_logits": False}  # the aux heads only run in training mode
    torch.manual_seed(0)
    with fast_random_init(seed=0):
        model = torchvision.models.get_model(name, **kw).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and w is not None and not w.any():
                w.copy_(torch.randn(w.shape, generator=g) / max(1, w[0].numel()) ** 0.5)
    return model


def check_one(name: str, *, threads: int = 1) -> dict[str, Any]:
    """Build, fold and check one torchvision model; a plain dict (it crosses a process boundary)."""
    import normfold as nf
    from tests.conftest import randomize_bn_stats

    torch.set_num_threads(threads)
    if name in HUGE:
        free = _available_gb()
        if free is not None and free < HUGE_RAM_GB:
            return {"name": name, "skip": f"needs about {HUGE_RAM_GB:.0f} GB of free memory (its check peaks at 11 GB), "
                                          f"this machine has {free:.1f} GB available"}
    times: dict[str, float] = {}
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build(name)
    randomize_bn_stats(model, seed=1)
    times["build"] = time.perf_counter() - t0
    x = None
    errors = []
    for size in SIZES:
        g = torch.Generator().manual_seed(size)
        cand = (torch.randn(BATCH, 3, size, size, generator=g) * 2 + 0.5,)
        try:
            with torch.no_grad():
                model(*cand)
        except Exception as exc:  # too small for this architecture: try the next size
            errors.append(f"{size}: {type(exc).__name__}")
            continue
        x = cand
        break
    if x is None:
        return {"name": name, "error": "no input size works: " + "; ".join(errors)}
    t0 = time.perf_counter()
    folded = nf.fold_batchnorm(model, example_inputs=x)
    times["fold"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = nf.check(model, candidate=folded.module, inputs=x, threads=threads)
    times["check"] = time.perf_counter() - t0
    times["cpu"] = time.process_time() - cpu0
    outputs = [c for r in report.checks if r.group == "outputs" for c in r.comparisons]
    return {
        "name": name, "size": x[0].shape[-1], "passed": report.passed, "text": report.to_text(),
        "final_line": report.final_line(), "folds": len(folded.changes), "times": times,
        "export_seconds": report.onnx.get("export_seconds"), "provider": report.provider,
        "max_abs": max((c.max_abs for c in outputs), default=0.0),
        "max_scaled": max((c.scaled_error for c in outputs), default=0.0),
        "atol_needed": max((c.atol_needed for c in outputs), default=0.0),
        "rtol_needed": max((c.rtol_needed for c in outputs), default=0.0),
        "scale": max((c.scale for c in outputs), default=0.0),
        "batch_max_abs": max((r.batch.max_abs for r in report.checks if r.batch is not None), default=0.0),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def _worker(names: list[str], results: Any) -> None:
    parent = os.getppid()
    for name in names:
        if os.getppid() != parent:  # the test session is gone (killed): do not keep computing for nobody
            return
        t0 = time.perf_counter()
        try:
            res = check_one(name)
        except Exception:  # reported by the model's own test, with the traceback
            res = {"name": name, "error": traceback.format_exc(limit=20)}
        res["seconds"] = time.perf_counter() - t0
        results.put(res)


def schedule(names: list[str], workers: int) -> list[list[str]]:
    """Longest first onto the least loaded worker; the huge models all on worker 0."""
    lanes: list[list[str]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for n in [n for n in HUGE if n in names]:
        lanes[0].append(n)
        load[0] += COST.get(n, DEFAULT_COST)
    rest = sorted((n for n in names if n not in HUGE), key=lambda n: -COST.get(n, DEFAULT_COST))
    for n in rest:
        i = min(range(workers), key=lambda k: load[k])
        lanes[i].append(n)
        load[i] += COST.get(n, DEFAULT_COST)
    return [lane for lane in lanes if lane]


class ZooRunner:
    """Runs the selected models in worker processes; :meth:`result` waits for one of them."""

    def __init__(self, names: list[str], workers: int) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.done: dict[str, dict[str, Any]] = {}
        self.procs = [ctx.Process(target=_worker, args=(lane, self.results), daemon=True)
                      for lane in schedule(names, workers)]
        for p in self.procs:
            p.start()

    def result(self, name: str, timeout: float = 1800.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while name not in self.done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{name}: no result after {timeout:.0f}s")
            try:
                res = self.results.get(timeout=min(remaining, 10.0))
            except queue.Empty:
                if not any(p.is_alive() for p in self.procs):
                    raise RuntimeError(f"{name}: the zoo workers exited without a result "
                                       f"(exit codes {[p.exitcode for p in self.procs]}: out of memory?)") from None
                continue
            self.done[res["name"]] = res
        return self.done[name]

    def close(self) -> None:
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="session")
def zoo(request: pytest.FixtureRequest):
    selected = [item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_checker_passes_clean_fold_and_export"
                and hasattr(item, "callspec") and item.callspec.params["name"] in SELECTED]
    workers = int(os.environ.get("NORMFOLD_ZOO_WORKERS", "2"))
    runner = ZooRunner(selected, max(1, workers))
    yield runner
    runner.close()


@pytest.mark.parametrize("name", MODELS)
def test_checker_passes_clean_fold_and_export(name: str, request: pytest.FixtureRequest) -> None:
    if name not in SELECTED:
        pytest.skip("the default run checks one model of each family (CI_MODELS); NORMFOLD_ZOO=full checks all 80")
    zoo: ZooRunner = request.getfixturevalue("zoo")
    res = zoo.result(name)
    if "skip" in res:
        pytest.skip(f"{name}: {res['skip']}")
    assert "error" not in res, f"{name}: the check could not run:\n{res['error']}"
    times = ", ".join(f"{k} {v:.1f}s" for k, v in res["times"].items())
    print(f"\n{name}: input {res['size']}, {res['folds']} folds, max abs error {res['max_abs']:.3g} "
          f"(scale {res['scale']:.3g}, scaled {res['max_scaled']:.2g}), batch probe {res['batch_max_abs']:.3g}; "
          f"{times}; export {res['export_seconds']:.1f}s; {res['seconds']:.1f}s in all")
    assert res["passed"], f"{name}: false alarm at the default tolerances:\n{res['text']}"
    assert res["final_line"].startswith("PASSED")
