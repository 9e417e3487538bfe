"""normfold's generic branch merge beside timm's hand-written re-parameterization, on timm's Rep* models.

For each model (random weights, BatchNorm statistics and affine parameters randomized, eval)
it builds, in one run:

* ``timm``      ``timm.utils.model.reparameterize_model(model)``: each block's own
                ``reparameterize()`` / ``fuse()``;
* ``fold``      ``nf.fold_batchnorm(model)`` alone (what normfold deployed before the merge);
* ``normfold``  ``nf.fold_batchnorm`` then ``nf.merge_branches``: the generic merge from the graph.

and measures for each: eager latency (batch 1, ``torch.set_num_threads(1)``, median of
interleaved runs after a warm-up), convolution and batch_norm ops as they run (ATen
dispatch), and the error relative to the original's output scale
(``max |y - y_ref| / max |y_ref|``). ``ratio`` is normfold's latency over timm's.

Usage::

    python benchmarks/reparameterize.py                    # the default list (all five families)
    python benchmarks/reparameterize.py repvgg_a0 fastvit_t8 --runs 30
    python benchmarks/reparameterize.py --all --no-latency --size 64   # every Rep* model in timm: counts, error

Prints one line per model as it goes, then the markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normfold as nf  # noqa: E402
from normfold.passes.merge_branches import merge_branches  # noqa: E402
from tests.conftest import output_error, randomize_bn_stats  # noqa: E402

MODELS = ["repvgg_a0", "repvgg_b0", "mobileone_s0", "mobileone_s1", "fastvit_t8", "fastvit_sa12",
          "repvit_m0_9", "repvit_m1_1", "repghostnet_050", "repghostnet_100"]


class _OpCounter(TorchDispatchMode):
    """Counts the convolution and batch_norm ATen ops of one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = 0
        self.bn = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        name = str(func)
        if func is torch.ops.aten.convolution.default:
            self.conv += 1
        elif "batch_norm" in name and "backward" not in name:
            self.bn += 1
        return func(*args, **(kwargs or {}))


def _count(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    with torch.no_grad(), _OpCounter() as c:
        y = model(x)
    return y, c.conv, c.bn


def _latencies(models: dict[str, nn.Module], x: torch.Tensor, runs: int) -> dict[str, float]:
    """Median seconds per forward, runs interleaved so that load on the machine hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(3):
                m(x)
        for _ in range(runs):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench(name: str, runs: int, size: int | None = None) -> dict[str, object]:
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_bn_stats(timm.create_model(name, pretrained=False)).eval()
    size = size or (256 if name.startswith("fastvit") else 224)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref, conv0, bn0 = _count(model, x)

    t0 = time.perf_counter()
    theirs = reparameterize_model(model).eval()
    t_timm = time.perf_counter() - t0
    t0 = time.perf_counter()
    folded = nf.fold_batchnorm(model).module
    t_fold = time.perf_counter() - t0
    work = nf.fold_batchnorm(model).module  # merged in place: the deployment pipeline copies once
    t0 = time.perf_counter()
    merged = merge_branches(work, inplace=True)
    t_merge = time.perf_counter() - t0

    variants = {"timm": theirs, "fold": folded, "normfold": merged.module}
    row: dict[str, object] = {"model": name, "input": size, "conv0": conv0, "bn0": bn0,
                              "t_timm": t_timm, "t_normfold": t_fold + t_merge, "merged": len(merged.changes)}
    for k, m in variants.items():
        y, conv, bn = _count(m, x)
        row[f"conv_{k}"], row[f"bn_{k}"] = conv, bn
        row[f"err_{k}"] = output_error(y, ref)[1]
    lat = _latencies({"original": model, **variants}, x, runs) if runs else {k: float("nan") for k in
                                                                            ("original", *variants)}
    for k, v in lat.items():
        row[f"ms_{k}"] = v * 1e3
    row["ratio"] = lat["normfold"] / lat["timm"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--runs", type=int, default=20, help="timed forwards per variant (default 20)")
    parser.add_argument("--no-latency", action="store_true", help="counts and errors only")
    parser.add_argument("--size", type=int, default=None, help="input size (default 224, 256 for fastvit)")
    parser.add_argument("--all", action="store_true", help="every repvgg/mobileone/fastvit/repvit/repghostnet in timm")
    args = parser.parse_args(argv)
    if args.all:
        import timm
        args.models = [m for p in ("repvgg*", "mobileone*", "fastvit*", "repvit*", "repghostnet*")
                       for m in timm.list_models(p)]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models:
        r = bench(name, 0 if args.no_latency else args.runs, args.size)
        rows.append(r)
        print(f"{name}: timm {r['ms_timm']:.2f} ms, normfold {r['ms_normfold']:.2f} ms ({r['ratio']:.3f}x), "
              f"conv {r['conv_timm']}/{r['conv_normfold']}, bn {r['bn_timm']}/{r['bn_normfold']}", flush=True)
    print()
    print("| model | input | original ms | fold ms | timm ms | normfold ms | normfold / timm "
          "| conv ops orig / fold / timm / normfold | BN ops orig / fold / timm / normfold "
          "| rel err timm / normfold | blocks merged | pass s timm / normfold |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['ms_original']:.2f} | {r['ms_fold']:.2f} | {r['ms_timm']:.2f} "
              f"| {r['ms_normfold']:.2f} | {r['ratio']:.3f} "
              f"| {r['conv0']} / {r['conv_fold']} / {r['conv_timm']} / {r['conv_normfold']} "
              f"| {r['bn0']} / {r['bn_fold']} / {r['bn_timm']} / {r['bn_normfold']} "
              f"| {r['err_timm']:.1e} / {r['err_normfold']:.1e} | {r['merged']} "
              f"| {r['t_timm']:.2f} / {r['t_normfold']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
