"""Eager CPU speed of torchvision vit_b_16 before and after layernorm_to_rmsnorm, and LayerNorm vs RMSNorm alone.

Random weights (LayerNorm scales/shifts and the head randomized, as in the
tests). Prints two markdown tables: the whole model (original, exact
conversion, approximate conversion; median forward time and output error
against the original) and one normalization layer on a ViT-B activation
``(batch, 197, 768)``. Run::

    python benchmarks/rmsnorm.py [--batch 1 8] [--iters 20] [--threads 2]

Numbers depend on the machine and on what else runs on it: compare the
columns of one run, not runs on different machines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torchvision
from torch import nn

from normfold import RMSNormWithBias, layernorm_to_rmsnorm


@torch.no_grad()
def randomized_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(num_classes=1000).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    for p in model.heads.parameters():
        p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


@torch.inference_mode()
def median_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], iters: int, rounds: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median over rounds that alternate the candidates, so a load change on the machine hits all of them."""
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            per[k].append(median_ms(fn, max(1, iters // rounds), warmup=warmup))
    # the median of per-round medians: robust to another process taking the cores for a while
    return {k: statistics.median(v) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=15, help="timed forwards per model (split over 3 rounds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median over rounds is shown)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    original = randomized_vit()
    x1 = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    t0 = time.perf_counter()
    exact = layernorm_to_rmsnorm(original, mode="exact", example_inputs=x1)
    t_exact = time.perf_counter() - t0
    approx = layernorm_to_rmsnorm(original, mode="approx", example_inputs=x1)
    kinds = {type(m).__name__ for m in exact.module.modules() if isinstance(m, nn.RMSNorm)}

    print(f"torch {torch.__version__}, {args.threads} thread(s), vit_b_16 random weights, eager, inference_mode")
    print(f"conversion (mode='exact', incl. graph + 2 measuring forwards): {t_exact:.1f} s; "
          f"{exact.metrics['layers_exact']} LayerNorms exact, {len(exact.skipped)} skipped; norm classes: "
          f"{', '.join(sorted(kinds))}\n")
    print("| batch | original ms | exact RMSNorm ms | speed-up | approx RMSNorm ms | exact max abs err | approx max abs err |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batch:
        x = x1.expand(b, -1, -1, -1).contiguous()
        t = interleaved({"orig": lambda: original(x), "exact": lambda: exact.module(x),
                         "approx": lambda: approx.module(x)}, args.iters, rounds=args.rounds)  # noqa: B023
        with torch.inference_mode():
            ref = original(x)
            e_exact = (exact.module(x) - ref).abs().max().item()
            e_approx = (approx.module(x) - ref).abs().max().item()
        print(f"| {b} | {t['orig']:.1f} | {t['exact']:.1f} | {t['orig'] / t['exact']:.3f}x | {t['approx']:.1f} | "
              f"{e_exact:.2e} | {e_approx:.2e} |")

    print("\nOne normalization layer on a (batch, 197, 768) activation:\n")
    print("| batch | LayerNorm us | RMSNorm us | RMSNorm + bias us | RMSNorm speed-up |")
    print("|---:|---:|---:|---:|---:|")
    ln = nn.LayerNorm(768, eps=1e-6)
    rms = nn.RMSNorm(768, eps=1e-6)
    rmsb = RMSNormWithBias(768, eps=1e-6)
    for b in args.batch:
        a = torch.randn(b, 197, 768)
        t = interleaved({"ln": lambda: ln(a), "rms": lambda: rms(a), "rmsb": lambda: rmsb(a)},  # noqa: B023
                        args.iters * 20, rounds=args.rounds, warmup=5)
        print(f"| {b} | {t['ln'] * 1e3:.0f} | {t['rms'] * 1e3:.0f} | {t['rmsb'] * 1e3:.0f} | {t['ln'] / t['rms']:.2f}x |")


if __name__ == "__main__":
    main()
