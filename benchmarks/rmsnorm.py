"""Deployment speed of layernorm_to_rmsnorm: onnxruntime CPU latency of the converted model beside the original.

Models (``transformers``, random weights, LayerNorm scales/shifts randomized):
a ViT-S/16 (hidden 384, 12 layers, 224x224 images) and a GPT-2-small-sized
decoder (hidden 768, 12 layers, vocabulary 50257, tied head, sequence 128).
Each is converted with ``mode="auto"`` (both convert every LayerNorm exactly),
then the original (LayerNormalization) and the converted model
(RMSNormalization, opset 23) are exported with :func:`normfold.hf.export_onnx`
and timed in onnxruntime on the CPU provider with one thread, at each batch
size, call by call in turn. Prints a markdown table: median wall and process
CPU milliseconds, the CPU-time ratio, and the max abs difference between the
two ONNX models' outputs. Run::

    python benchmarks/rmsnorm.py [--models vit gpt2] [--batch 1 8] [--iters 10] [--eager]

``--eager`` adds the same comparison in eager PyTorch (1 thread). On a machine
shared with other work, compare CPU times within one run, not runs on
different machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from normfold import hf, layernorm_to_rmsnorm


@torch.no_grad()
def randomize_layernorms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def vit_small(batch: int) -> tuple[nn.Module, Callable[[int], dict]]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                 intermediate_size=1536, image_size=224, patch_size=16, num_labels=1000)
    model = randomize_layernorms(transformers.ViTForImageClassification(cfg))

    def inputs(b: int) -> dict:
        return {"pixel_values": torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(1))}
    return model, inputs


def gpt2_small(batch: int, seq: int = 128) -> tuple[nn.Module, Callable[[int], dict]]:
    import transformers

    torch.manual_seed(0)
    model = randomize_layernorms(transformers.GPT2LMHeadModel(transformers.GPT2Config()))  # 124M, use_cache=True

    def inputs(b: int) -> dict:
        g = torch.Generator().manual_seed(1)
        return {"input_ids": torch.randint(0, 50257, (b, seq), generator=g),
                "attention_mask": torch.ones(b, seq, dtype=torch.long)}
    return model, inputs


MODELS = {"vit": ("ViT-S/16 (transformers ViT, 224x224)", vit_small),
          "gpt2": ("GPT-2 small (124M, sequence 128)", gpt2_small)}


def interleaved(fns: dict[str, Callable[[], object]], iters: int, warmup: int = 1) -> dict[str, tuple[float, float]]:
    """(median wall ms, median process-CPU ms) per call, timing the candidates one call each in turn.

    On a shared machine the load changes from second to second; alternating call by call (rotating
    who goes first) puts every candidate under the same load. Process CPU time is shown beside wall
    time because it hardly changes with what other processes do.
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


def session(path: str) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=10, help="timed runs per model and batch")
    ap.add_argument("--eager", action="store_true", help="also time eager PyTorch")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__} CPUExecutionProvider, 1 thread, "
          "random weights\n")
    rows = []
    tmp = tempfile.mkdtemp(prefix="normfold-rmsnorm-")
    for key in args.models:
        title, build = MODELS[key]
        model, make = build(max(args.batch))
        example = make(2)
        t0 = time.perf_counter()
        r = layernorm_to_rmsnorm(model, mode="auto", example_inputs=example)
        t_conv = time.perf_counter() - t0
        actions = [c.action for c in r.changes]
        print(f"{title}: {r.metrics['layers_exact']} LayerNorms exact, {r.metrics['layers_approx']} approx, "
              f"{actions.count('untie')} untied, {actions.count('centre_op')} centring ops; output max abs error "
              f"{r.metrics['output_max_abs_error']:.2e}; conversion {t_conv:.1f} s")
        paths = {}
        for name, m in (("original", model), ("rmsnorm", r.module)):
            p = os.path.join(tmp, f"{key}-{name}.onnx")
            res = hf.export_onnx(m, example, p)
            paths[name] = p
            print(f"  {name}: opset {res.opset}, {res.size_bytes / 2**20:.0f} MiB, inputs "
                  f"{', '.join(res.input_names)} (dims {res.batch_dims}), export {res.seconds:.0f} s")
        sessions = {k: session(p) for k, p in paths.items()}
        for b in args.batch:
            feeds = {k: v.numpy() for k, v in make(b).items()}
            t = interleaved({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, args.iters)
            outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
            err = float(np.abs(outs["rmsnorm"] - outs["original"]).max())
            rows.append((title, "onnxruntime", b, t["original"], t["rmsnorm"], err))
            if args.eager:
                x = make(b)
                with torch.inference_mode():
                    te = interleaved({"original": lambda: model(**x), "rmsnorm": lambda: r.module(**x)},  # noqa: B023
                                     args.iters)
                rows.append((title, "eager PyTorch", b, te["original"], te["rmsnorm"], float("nan")))
    print("\n| model | runtime | batch | LayerNorm ms (CPU ms) | RMSNorm ms (CPU ms) | CPU-time ratio | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for title, runtime, b, (ow, oc), (nw, nc), err in rows:
        print(f"| {title} | {runtime} | {b} | {ow:.1f} ({oc:.1f}) | {nw:.1f} ({nc:.1f}) | {nc / oc:.3f} | "
              f"{'' if err != err else f'{err:.1e}'} |")


if __name__ == "__main__":
    main()
