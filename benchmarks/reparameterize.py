"""normfold's generic branch merge beside timm's hand-written re-parameterization, on timm's Rep* models.

For each model (random weights, BatchNorm statistics and affine parameters randomized, eval)
it builds, in one run:

* ``timm``      ``timm.utils.model.reparameterize_model(model)``: each block's own
                ``reparameterize()`` / ``fuse()``;
* ``fold``      ``nf.fold_batchnorm(model)`` alone (what normfold deployed before the merge);
* ``normfold``  ``nf.fold_batchnorm(model, merge_branches=True)``: the folds, then the generic
                branch merge from the graph.

and measures for each: convolution, batch_norm and all ATen ops as they run (dispatch level),
the error relative to the original's output scale (``max |y - y_ref| / max |y_ref|``), and eager
latency at batch 1 with ``torch.set_num_threads(1)``.

Latency is measured for a machine shared with other work: it is process CPU time
(``time.process_time``), which time spent descheduled does not inflate, and timm's and normfold's
models are timed as pairs, one forward of each per round, the order alternating between rounds so
that neither always runs on the other's warm cache. ``normfold / timm`` is the median over rounds of
the per-round ratio, with its interquartile range (``q1-q3``) as the spread; a drift in the machine's
load moves both members of a pair alike and cancels in the ratio. The milliseconds are the medians of
each model's own CPU times (``--wall`` also prints the wall-clock ratio, which load does inflate).
``original`` and ``fold`` are timed in the first ``--fold-runs`` rounds only: they are context, not
the comparison.

Usage::

    python benchmarks/reparameterize.py                    # the default list (all five families)
    python benchmarks/reparameterize.py repvgg_a0 fastvit_t8 --runs 100
    python benchmarks/reparameterize.py --all --no-latency --size 64   # every Rep* model in timm: counts, error
    python benchmarks/reparameterize.py mobileone_s0 --profile         # top ops by CPU time, timm vs normfold

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normfold as nf  # noqa: E402
from normfold.passes.merge_branches import PASS_NAME as MERGE_PASS  # noqa: E402
from normfold.tolerances import for_dtype  # noqa: E402
from tests.conftest import ConvAndBatchNormOpCounter, output_error, randomize_bn_stats  # noqa: E402

MODELS = ["repvgg_a0", "repvgg_b0", "mobileone_s0", "mobileone_s1", "fastvit_t8", "fastvit_sa12",
          "repvit_m0_9", "repvit_m1_1", "repghostnet_050", "repghostnet_100"]


def _count(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ConvAndBatchNormOpCounter]:
    with torch.no_grad(), ConvAndBatchNormOpCounter() as c:
        y = model(x)
    return y, c


def _quantile(v: list[float], q: float) -> float:
    return statistics.quantiles(v, n=4, method="inclusive")[{0.25: 0, 0.75: 2}[q]] if len(v) > 1 else v[0]


def _latencies(timm_model: nn.Module, ours: nn.Module, context: dict[str, nn.Module], x: torch.Tensor,
               runs: int, context_runs: int) -> dict[str, float]:
    """CPU and wall seconds per forward (medians) and the paired normfold / timm ratio's median and quartiles.

    Each round runs one forward of timm's model and one of ours, in alternating order; the ratio of a
    round's two CPU times is one sample. ``context`` models run in the first ``context_runs`` rounds.
    """
    cpu: dict[str, list[float]] = {k: [] for k in ("timm", "normfold", *context)}
    wall: dict[str, list[float]] = {k: [] for k in cpu}
    ratios, wall_ratios = [], []
    models = {"timm": timm_model, "normfold": ours, **context}
    with torch.no_grad():
        for m in models.values():
            for _ in range(3):
                m(x)
        for i in range(runs):
            order = ["timm", "normfold"] if i % 2 == 0 else ["normfold", "timm"]
            if i < context_runs:
                order += list(context)
            for k in order:
                c0, w0 = time.process_time(), time.perf_counter()
                models[k](x)
                cpu[k].append(time.process_time() - c0)
                wall[k].append(time.perf_counter() - w0)
            ratios.append(cpu["normfold"][-1] / cpu["timm"][-1])
            wall_ratios.append(wall["normfold"][-1] / wall["timm"][-1])
    out = {f"ms_{k}": statistics.median(v) * 1e3 for k, v in cpu.items()}
    out |= {f"wall_ms_{k}": statistics.median(v) * 1e3 for k, v in wall.items()}
    out |= {"ratio": statistics.median(ratios), "ratio_q1": _quantile(ratios, 0.25),
            "ratio_q3": _quantile(ratios, 0.75), "wall_ratio": statistics.median(wall_ratios)}
    return out


def _profile(models: dict[str, nn.Module], x: torch.Tensor, runs: int = 10) -> None:
    """Print the ops that take the most CPU time in each model (torch.profiler, ``runs`` forwards)."""
    from torch.profiler import ProfilerActivity, profile

    for k, m in models.items():
        with torch.no_grad():
            m(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(runs):
                    m(x)
        print(f"--- {k}: top ops by self CPU time over {runs} forwards")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def bench(name: str, runs: int, size: int | None = None, context_runs: int = 5,
          profile_ops: bool = False) -> dict[str, object]:
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(0)
    model = randomize_bn_stats(timm.create_model(name, pretrained=False)).eval()
    size = size or (256 if name.startswith("fastvit") else 224)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref, c0 = _count(model, x)

    t0 = time.perf_counter()
    theirs = reparameterize_model(model).eval()
    t_timm = time.perf_counter() - t0
    folded = nf.fold_batchnorm(model).module
    t0 = time.perf_counter()
    result = nf.fold_batchnorm(model, merge_branches=True)
    t_normfold = time.perf_counter() - t0

    variants = {"timm": theirs, "fold": folded, "normfold": result.module}
    row: dict[str, object] = {"model": name, "input": size, "conv0": c0.conv, "bn0": c0.count, "ops0": c0.total,
                              "t_timm": t_timm, "t_normfold": t_normfold,
                              "merged": sum(1 for c in result.changes if c.pass_name == MERGE_PASS)}
    for k, m in variants.items():
        y, c = _count(m, x)
        row[f"conv_{k}"], row[f"bn_{k}"], row[f"ops_{k}"] = c.conv, c.count, c.total
        row[f"err_{k}"] = output_error(y, ref)[1]
    if runs:
        row |= _latencies(theirs, result.module, {"original": model, "fold": folded}, x, runs, context_runs)
    else:
        row |= {k: float("nan") for k in ("ms_timm", "ms_normfold", "ms_original", "ms_fold", "ratio", "ratio_q1",
                                          "ratio_q3", "wall_ratio")}
    if profile_ops:
        _profile({"timm": theirs, "normfold": result.module}, x)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=MODELS)
    parser.add_argument("--runs", type=int, default=60, help="timed rounds (one forward of timm's and of "
                        "normfold's model each; default 60)")
    parser.add_argument("--fold-runs", type=int, default=5, help="rounds that also time the original and the "
                        "fold-only model (default 5)")
    parser.add_argument("--no-latency", action="store_true", help="counts and errors only")
    parser.add_argument("--size", type=int, default=None, help="input size (default 224, 256 for fastvit)")
    parser.add_argument("--all", action="store_true", help="every repvgg/mobileone/fastvit/repvit/repghostnet in timm")
    parser.add_argument("--wall", action="store_true", help="also print the wall-clock ratio")
    parser.add_argument("--profile", action="store_true", help="print each model's top ops (torch.profiler)")
    args = parser.parse_args(argv)
    if args.all:
        import timm
        args.models = [m for p in ("repvgg*", "mobileone*", "fastvit*", "repvit*", "repghostnet*")
                       for m in timm.list_models(p)]
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rtol = for_dtype(torch.float32).scaled
    rows = []
    for name in args.models:
        r = bench(name, 0 if args.no_latency else args.runs, args.size, args.fold_runs, args.profile)
        rows.append(r)
        print(f"{name}: timm {r['ms_timm']:.2f} ms, normfold {r['ms_normfold']:.2f} ms CPU, ratio {r['ratio']:.3f} "
              f"({r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}; wall {r['wall_ratio']:.3f}), conv {r['conv_timm']}/"
              f"{r['conv_normfold']}, bn {r['bn_timm']}/{r['bn_normfold']}, aten ops {r['ops_timm']}/"
              f"{r['ops_normfold']}", flush=True)
    print()
    print("| model | input | original ms | fold ms | timm ms | normfold ms | normfold / timm (q1-q3) "
          + ("| wall ratio " if args.wall else "")
          + "| conv ops orig / fold / timm / normfold | BN ops orig / fold / timm / normfold "
          "| ATen ops timm / normfold | rel err timm / normfold | blocks merged | pass s timm / normfold |")
    print("|---|---:|---:|---:|---:|---:|---|" + ("---:|" if args.wall else "") + "---|---|---|---|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['ms_original']:.2f} | {r['ms_fold']:.2f} | {r['ms_timm']:.2f} "
              f"| {r['ms_normfold']:.2f} | {r['ratio']:.3f} ({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}) "
              + (f"| {r['wall_ratio']:.3f} " if args.wall else "")
              + f"| {r['conv0']} / {r['conv_fold']} / {r['conv_timm']} / {r['conv_normfold']} "
              f"| {r['bn0']} / {r['bn_fold']} / {r['bn_timm']} / {r['bn_normfold']} "
              f"| {r['ops_timm']} / {r['ops_normfold']} "
              f"| {r['err_timm']:.1e} / {r['err_normfold']:.1e} | {r['merged']} "
              f"| {r['t_timm']:.2f} / {r['t_normfold']:.2f} |")
    slow = [r["model"] for r in rows if r["ratio"] > 1.05]
    if slow:
        print(f"\nabove 1.05x timm's latency: {', '.join(slow)}")
    wrong = [r["model"] for r in rows if r["err_normfold"] > rtol or r["bn_normfold"] > r["bn_timm"]
             or r["conv_normfold"] > r["conv_timm"]]
    if wrong:
        print(f"\nmore BatchNorms or convs than timm, or an error above {rtol:.1e}: {', '.join(wrong)}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
