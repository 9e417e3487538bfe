"""Eager CPU speed of torchvision vit_b_16 before and after layernorm_to_rmsnorm, and LayerNorm vs RMSNorm alone.

Random weights (LayerNorm scales/shifts and the head randomized, as in the
tests). Prints two markdown tables: the whole model (original, exact
conversion, approximate conversion; median forward time and output error
against the original) and one normalization layer on a ViT-B activation
``(batch, 197, 768)``. Run::

    python benchmarks/rmsnorm.py [--batch 1 8] [--iters 15] [--threads 2]

Candidates are timed call by call in turn, and process CPU time is shown
beside wall time: on a machine shared with other work, compare CPU times
within one run, not runs on different machines.
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
def interleaved(fns: dict[str, Callable[[], object]], iters: int, warmup: int = 1) -> dict[str, tuple[float, float]]:
    """(median wall ms, median process-CPU ms) per call, timing the candidates one call each in turn.

    On a shared machine the load changes from second to second; alternating call by call (rotating
    who goes first) puts every candidate under the same load. Process CPU time (all threads) is
    shown beside wall time because it hardly changes with what other processes do.
    """
    keys = list(fns)
    for k in keys:
        for _ in range(warmup):
            fns[k]()
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(iters):
        order = keys[i % len(keys):] + keys[:i % len(keys)]
        for k in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[k]()
            wall[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.process_time() - c0) * 1e3)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=15, help="timed forwards per model")
    ap.add_argument("--threads", type=int, default=2)
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
    print("| batch | original ms (CPU ms) | exact RMSNorm ms (CPU ms) | CPU-time ratio | approx RMSNorm ms (CPU ms) "
          "| exact max abs err | approx max abs err |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for b in args.batch:
        x = x1.expand(b, -1, -1, -1).contiguous()
        t = interleaved({"orig": lambda: original(x), "exact": lambda: exact.module(x),  # noqa: B023
                         "approx": lambda: approx.module(x)}, args.iters)  # noqa: B023
        with torch.inference_mode():
            ref = original(x)
            e_exact = (exact.module(x) - ref).abs().max().item()
            e_approx = (approx.module(x) - ref).abs().max().item()
        (ow, oc), (ew, ec), (aw, ac) = t["orig"], t["exact"], t["approx"]
        print(f"| {b} | {ow:.0f} ({oc:.0f}) | {ew:.0f} ({ec:.0f}) | {ec / oc:.3f} | {aw:.0f} ({ac:.0f}) | "
              f"{e_exact:.2e} | {e_approx:.2e} |")

    print("\nOne normalization layer on a (batch, 197, 768) activation:\n")
    print("| batch | LayerNorm us (CPU us) | RMSNorm us (CPU us) | RMSNorm + bias us (CPU us) | RMSNorm / LayerNorm CPU |")
    print("|---:|---:|---:|---:|---:|")
    ln = nn.LayerNorm(768, eps=1e-6)
    rms = nn.RMSNorm(768, eps=1e-6)
    rmsb = RMSNormWithBias(768, eps=1e-6)
    for b in args.batch:
        a = torch.randn(b, 197, 768)
        t = interleaved({"ln": lambda: ln(a), "rms": lambda: rms(a), "rmsb": lambda: rmsb(a)},  # noqa: B023
                        args.iters * 20, warmup=5)
        (lw, lc), (rw, rc), (bw, bc) = t["ln"], t["rms"], t["rmsb"]
        print(f"| {b} | {lw * 1e3:.0f} ({lc * 1e3:.0f}) | {rw * 1e3:.0f} ({rc * 1e3:.0f}) | {bw * 1e3:.0f} "
              f"({bc * 1e3:.0f}) | {rc / lc:.2f} |")


if __name__ == "__main__":
    main()
