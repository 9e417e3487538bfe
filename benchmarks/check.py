"""Benchmark: `normfold check` (export + every probe) beside a bare torch.onnx.export; ORT vs eager latency.

Usage::

    python benchmarks/check.py [--models resnet50,vit_b_16] [--repeats 3] [--iters 20] [--size 224]
                               [--batch 2] [--threads 1]

For each torchvision model (random weights; BatchNorm statistics and affine
parameters randomized with the test suite's ``randomize_bn_stats``; eval):

1. **check vs export, cold** (what a CI job pays): fresh processes, each
   building the model from the same state_dict file, median of ``--repeats``:

   * ``normfold check MODEL --arch torchvision.models:<name> --input-shape
     B,3,S,S`` (exports the model with a dynamic batch, runs the original,
     onnxruntime and every probe: batch independence at 1, 2 and 8 in PyTorch
     and onnxruntime, training mode, batch dimension, norm-op lint);
   * a bare ``torch.onnx.export(model, (x,), path, dynamo=True)`` of the same
     model and input (the exporter's default: a fixed batch);
   * the same bare export with a dynamic batch (``dynamic_shapes``), which is
     the export the check does.

   Wall time and CPU time (``getrusage(RUSAGE_CHILDREN)``: user + system of
   the child, not inflated by other processes on a shared machine) are
   reported; the ratio check / bare export is the target (issue 3: <= 1.5x).
   ``OMP_NUM_THREADS`` and the check's onnxruntime threads are ``--threads``.

2. **latency**: median time of one forward at batch 1 (``--iters`` calls
   after a warm-up, the candidates interleaved call by call so that load on
   the machine hits them alike): eager PyTorch (original and folded) and the
   folded model exported by ``normfold.export_onnx`` in onnxruntime on the CPU
   provider, ``--threads`` intra-op threads each. With one thread the time is
   the process's CPU time per call.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BARE = """
import sys, warnings, torch, torchvision
warnings.simplefilter("ignore")
name, weights, out, b, s, dyn = sys.argv[1:7]
model = getattr(torchvision.models, name)()
model.load_state_dict(torch.load(weights, weights_only=True))
model.eval()
x = torch.randn(int(b), 3, int(s), int(s))
kw = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)} if dyn == "1" else {}
torch.onnx.export(model, (x,), out, dynamo=True, verbose=False, **kw)
"""


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, cpu) seconds of a child process; raises if it fails."""
    c0, t0 = _child_cpu(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, cpu


def _build(name: str) -> torch.nn.Module:
    import torchvision

    from tests.conftest import randomize_bn_stats

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(torchvision.models, name)().eval()
    randomize_bn_stats(model, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # ViT's head starts at zero: every output would be 0
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
    return model


def bench_check(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    weights = tmp / f"{name}.pt"
    torch.save(_build(name).state_dict(), weights)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONWARNINGS="ignore")
    shape = f"{args.batch},3,{args.size},{args.size}"
    runs: dict[str, list[tuple[float, float]]] = {"check": [], "bare": [], "bare_dyn": []}
    for _ in range(args.repeats):  # interleaved, so that load on the machine hits all three alike
        runs["check"].append(_timed([sys.executable, "-m", "normfold.cli", "check", str(weights), "--arch",
                                     f"torchvision.models:{name}", "--input-shape", shape, "--threads",
                                     str(args.threads), "-q"], env))
        for key, dyn in (("bare", "0"), ("bare_dyn", "1")):
            runs[key].append(_timed([sys.executable, "-c", BARE, name, str(weights), str(tmp / f"{name}.onnx"),
                                     str(args.batch), str(args.size), dyn], env))
    med = {f"{k}_{i}": statistics.median(r[i] for r in v) for k, v in runs.items() for i in (0, 1)}
    return med


def bench_latency(name: str, args: argparse.Namespace) -> dict[str, float]:
    import normfold as nf
    from normfold.check.runtime import create_session

    torch.set_num_threads(args.threads)
    model = _build(name)
    x = torch.randn(1, 3, args.size, args.size) * 2 + 0.5
    folded = nf.fold_batchnorm(model, example_inputs=(x,)).module
    proto = nf.export_onnx(folded, (x,)).model_proto
    rt = create_session(proto, ("cpu",), threads=args.threads, spinning=True)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    fns = {
        "eager original": lambda: model(x),
        "eager folded": lambda: folded(x),
        "onnxruntime folded": lambda: rt.run([x]),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(args.iters):
            for k, fn in fns.items():
                t0 = clock()
                fn()
                times[k].append(clock() - t0)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,vit_b_16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-latency", action="store_true")
    args = p.parse_args()
    names = [n for n in args.models.split(",") if n]
    print(f"torch {torch.__version__}; input {args.batch}x3x{args.size}x{args.size}; threads {args.threads}; "
          f"median of {args.repeats} cold runs\n")
    print("| model | normfold check (wall / CPU s) | bare export, fixed batch | bare export, dynamic batch | "
          "check / bare (CPU) | check / bare dynamic (CPU) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            m = bench_check(name, args, Path(d))
            print(f"| {name} | {m['check_0']:.1f} / {m['check_1']:.1f} | {m['bare_0']:.1f} / {m['bare_1']:.1f} | "
                  f"{m['bare_dyn_0']:.1f} / {m['bare_dyn_1']:.1f} | {m['check_1'] / m['bare_1']:.2f}x | "
                  f"{m['check_1'] / m['bare_dyn_1']:.2f}x |", flush=True)
    if args.skip_latency:
        return
    print(f"\nlatency at batch 1, {args.size}x{args.size}, {args.threads} thread(s), median of {args.iters} "
          "(ms per forward)\n")
    print("| model | eager original | eager folded | onnxruntime folded (CPU provider) |")
    print("|---|---|---|---|")
    for name in names:
        lat = bench_latency(name, args)
        print(f"| {name} | {lat['eager original']:.1f} | {lat['eager folded']:.1f} | "
              f"{lat['onnxruntime folded']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
