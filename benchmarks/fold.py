"""Benchmark: normfold.fold_batchnorm beside torch.fx.experimental.optimization.fuse.

Usage::

    python benchmarks/fold.py [--models resnet50,mobilenet_v3_large,efficientnet_b0,densenet121]
                              [--repeats 5] [--iters 30] [--threads 1] [--size 224]
    python benchmarks/fold.py --first-call [--repeats 3]

``--first-call`` times only the fold, as a command-line user pays for it: each
tool's first call in a fresh process (imports done and the model built before
the timer, CPU time), the median over ``--repeats`` processes; it prints one
row per model with the ratio to fuse (target, issue 10: at most 0.5).

For each torchvision model (random weights, BatchNorm statistics and affine
parameters randomized with the test suite's ``randomize_bn_stats``, eval) it
prints one markdown table row per tool:

* **fold time**: time of ``nf.fold_batchnorm(model, inplace=True,
  example_inputs=x)`` on a fresh copy of the model (copying is not timed: in
  place needs no copy), and of ``fuse(model)`` as users call it (fuse
  deep-copies; ``fuse(model, inplace=True)`` is shown too). The median of
  ``--repeats`` runs, after one warm-up run of each. With one thread (the
  default) times are the process's CPU time (``time.process_time``), which on
  an idle machine is the wall time and on a shared one is not inflated by
  other processes; with more threads, wall time.
* **peak extra memory**: the rise of the process's peak resident set size
  during the call, measured in a fresh child process per (model, tool) so that
  one measurement's allocator state cannot leak into the next. The child builds
  the same model, warms the tool up once on another copy, then: the garbage
  collector runs, glibc's ``malloc_trim(0)`` hands freed heap pages back to the
  OS, the kernel's peak counter is reset (``echo 5 > /proc/self/clear_refs``,
  Linux >= 4.0), the call runs, and ``VmHWM - VmRSS(before)`` from
  ``/proc/self/status`` counts every byte it touched: tensors (torch's CPU
  allocator is invisible to tracemalloc), the traced graph and other Python
  objects. ``MALLOC_MMAP_THRESHOLD_=131072`` makes glibc map every large
  block afresh, so a reused freed block cannot hide an allocation. Compared with the
  **folded layers' size**: the bytes of the weights and biases of the layers
  that received a fold.
* **BN ops folded**: batch_norm ops that run in a forward pass (counted at the
  ATen dispatch level) before minus after. A fuse result whose output is not
  within ``normfold.tolerances.ZOO`` of the original would have its folds
  counted as 0 (and flagged).
* **max rel err**: max |output - original| / max |original| on one seeded input,
  against the float32 original (what a user compares) and against the original
  run in float64 (the exact answer: float32 forward rounding dominates the first
  number and hides which fold is closer). The error target is judged on the
  float64 column.
* **latency**: median eager CPU forward time at batch 1 (CPU time with one
  thread, as above), ``--threads`` intra-op threads (1 by default: on a shared
  2-core machine OpenMP's spinning threads make 2-thread timings meaningless),
  the models timed interleaved.

Targets (issues 2 and 10): fold time <= half of fuse's (first call as well as
warm), peak extra memory <= the folded layers' size (and so far below fuse's),
error no worse than fuse's, latency no worse than fuse's. Errors of 1e-7 are
float32 forward rounding: the "original (unfolded)" row shows the original's
own distance to its float64 run.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.conftest's helpers

import normfold as nf  # noqa: E402
from normfold.tolerances import ZOO  # noqa: E402
from tests.conftest import output_error, randomize_bn_stats, run_counting  # noqa: E402

MODELS = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "densenet121"]

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: peak memory is still measured, just less tightly
    _LIBC = None


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """(fn(), peak extra resident bytes during the call) — see the module docstring."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS:")
    except OSError:
        base = None
    out = fn()
    peak = _status("VmHWM:")
    return out, (peak - base) if base is not None and peak is not None else None


#: the clock: CPU time with one thread (immune to other processes), wall time otherwise (set in main)
CLOCK: Callable[[], float] = time.process_time


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = CLOCK()
    out = fn()
    return out, CLOCK() - t0


def folded_layers_bytes(result: nf.PassResult) -> int:
    """Bytes of the parameters of every Conv/Linear a fold wrote into."""
    modules = dict(result.module.named_modules())
    total, seen = 0, set()
    for change in result.changes:
        for path in change.paths:
            m = modules.get(path)
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and path not in seen:
                seen.add(path)
                total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
    return total


def latency(models: dict[str, nn.Module], x: torch.Tensor, iters: int) -> dict[str, float]:
    """Median forward time of each model, timed interleaved so that load changes hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(3):
                m(x)
        for _ in range(iters):
            for k, m in models.items():
                t0 = CLOCK()
                m(x)
                times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _model_and_input(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).eval()
    randomize_bn_stats(model, seed=1)
    x = (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 + 0.5)
    return model, x


_TOOLS: dict[str, Callable[[nn.Module, torch.Tensor], Any]] = {
    "normfold": lambda m, x: nf.fold_batchnorm(m, inplace=True, example_inputs=(x,)),
    "fuse": lambda m, x: fuse(m),
    "fuse_inplace": lambda m, x: fuse(m, inplace=True),
}


def memory_child(name: str, tool: str, size: int) -> None:
    """Runs in a child process: print the peak extra bytes of one tool on a fresh copy of one model."""
    model, x = _model_and_input(name, size)
    fn = _TOOLS[tool]
    fn(copy.deepcopy(model), x)  # warm-up: imports, first-call caches
    work = copy.deepcopy(model)
    _, mem = measure_peak(lambda: fn(work, x))
    print(f"MEMORY {mem if mem is not None else -1}")


def first_call_child(name: str, tool: str, size: int) -> None:
    """Runs in a fresh child process: print the CPU time of the tool's first call (imports done before)."""
    model, x = _model_and_input(name, size)
    fn = _TOOLS[tool]
    work = copy.deepcopy(model)
    gc.collect()
    _, t = timed(lambda: fn(work, x))
    print(f"SECONDS {t}")


def first_call_time(name: str, tool: str, args: argparse.Namespace) -> float:
    """Median over ``--repeats`` fresh processes of the tool's first-call time (what a CLI user pays)."""
    import os
    import subprocess

    times = []
    for _ in range(args.repeats):
        cmd = [sys.executable, __file__, "--first-call-child", name, tool, "--size", str(args.size),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False).stdout
        times += [float(line.split()[1]) for line in out.splitlines() if line.startswith("SECONDS ")]
    return statistics.median(times) if times else float("nan")


def measure_in_child(name: str, tool: str, args: argparse.Namespace) -> int | None:
    import os
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, __file__, "--memory-child", name, tool, "--size", str(args.size),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False).stdout
    for line in out.splitlines():
        if line.startswith("MEMORY "):
            v = int(line.split()[1])
            return None if v < 0 else v
    return None


def bench_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model, x = _model_and_input(name, args.size)
    ref, n_ops = run_counting(model, (x,))
    ref64, _ = run_counting(copy.deepcopy(model).double(), (x.double(),))

    def nf_fold(m: nn.Module) -> nf.PassResult:
        return nf.fold_batchnorm(m, inplace=True, example_inputs=(x,))

    # warm-up: imports, first-call caches
    nf_fold(copy.deepcopy(model))
    fuse(model)

    rows = []
    # normfold, in place on a fresh copy each time (the copy is not timed)
    nf_times = []
    for _ in range(args.repeats):
        work = copy.deepcopy(model)
        result, t = timed(lambda: nf_fold(work))
        nf_times.append(t)
        del work, result
    nf_mem = measure_in_child(name, "normfold", args)
    work = copy.deepcopy(model)
    result = nf_fold(work)
    folded = result.module
    out, n_after = run_counting(folded, (x,))
    _, nf_err = output_error(out, ref)
    _, nf_err64 = output_error(out, ref64)
    rows.append(dict(model=name, tool="normfold (inplace=True)", time=statistics.median(nf_times), mem=nf_mem,
                     layers=folded_layers_bytes(result), folded=n_ops - n_after, ops=n_ops, err=nf_err,
                     err64=nf_err64))

    # fuse as users call it (deep copy inside), and in place on a fresh copy
    fuse_times, fuse_ip_times = [], []
    for _ in range(args.repeats):
        fused, t = timed(lambda: fuse(model))
        fuse_times.append(t)
        del fused
        work = copy.deepcopy(model)
        fused, t = timed(lambda: fuse(work, inplace=True))
        fuse_ip_times.append(t)
        del fused, work
    fuse_mem = measure_in_child(name, "fuse", args)
    fused = fuse(model)
    out_f, n_f = run_counting(fused, (x,))
    _, fuse_err = output_error(out_f, ref)
    _, fuse_err64 = output_error(out_f, ref64)
    fuse_folds = n_ops - n_f if fuse_err <= ZOO.rtol else 0
    rows.append(dict(model=name, tool="fuse", time=statistics.median(fuse_times), mem=fuse_mem, layers=None,
                     folded=fuse_folds, ops=n_ops, err=fuse_err, err64=fuse_err64))
    fuse_ip_mem = measure_in_child(name, "fuse_inplace", args)
    rows.append(dict(model=name, tool="fuse (inplace=True)", time=statistics.median(fuse_ip_times),
                     mem=fuse_ip_mem, layers=None, folded=fuse_folds, ops=n_ops, err=fuse_err, err64=fuse_err64))

    lat = latency({"original": model, "normfold": folded, "fuse": fused}, x, args.iters)
    rows[0]["latency"], rows[1]["latency"], rows[2]["latency"] = lat["normfold"], lat["fuse"], lat["fuse"]
    _, orig_err64 = output_error(ref, ref64)
    rows.append(dict(model=name, tool="original (unfolded)", time=None, mem=None, layers=None, folded=0,
                     ops=n_ops, err=0.0, err64=orig_err64, latency=lat["original"]))
    return rows


def _fmt_mb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--first-call", action="store_true",
                   help="time only: each tool's first call in a fresh process, median of --repeats processes")
    p.add_argument("--memory-child", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    p.add_argument("--first-call-child", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.threads == 1 else time.perf_counter
    if args.memory_child:
        memory_child(*args.memory_child, args.size)
        return 0
    if args.first_call_child:
        first_call_child(*args.first_call_child, args.size)
        return 0
    if args.first_call:
        print("| model | normfold first call (ms) | fuse first call (ms) | ratio |")
        print("|---|---:|---:|---:|")
        ok = True
        for name in args.models.split(","):
            t_nf, t_fuse = first_call_time(name, "normfold", args), first_call_time(name, "fuse", args)
            ok &= t_nf <= t_fuse / 2
            print(f"| {name} | {t_nf * 1e3:.0f} | {t_fuse * 1e3:.0f} | {t_nf / t_fuse:.2f} |", flush=True)
        return 0 if ok else 1

    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        print(f"... {name}", file=sys.stderr, flush=True)
        rows.extend(bench_model(name, args))

    clock = "CPU time" if args.threads == 1 else "wall time"
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), {clock}, input 1x3x{args.size}x{args.size}, "
          f"median of {args.repeats} fold runs / {args.iters} forward passes\n")
    print("| model | tool | fold time (ms) | peak extra memory (MiB) | folded layers (MiB) | BN ops folded "
          "| max rel err vs original | vs float64 original | latency (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = "" if r["time"] is None else f"{r['time'] * 1e3:.0f}"
        mem = "" if r["tool"].startswith("original") else _fmt_mb(r["mem"])
        layers = "" if r["layers"] is None else _fmt_mb(r["layers"])
        folded = "" if r["tool"].startswith("original") else f"{r['folded']}/{r['ops']}"
        err = "" if r["tool"].startswith("original") else f"{r['err']:.1e}"
        print(f"| {r['model']} | {r['tool']} | {t} | {mem} | {layers} | {folded} | {err} | {r['err64']:.1e} "
              f"| {r['latency'] * 1e3:.1f} |")

    # targets, per model
    print()
    ok_all = True
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["tool"]] = r
    for name, d in by_model.items():
        n, f = d["normfold (inplace=True)"], d["fuse"]
        checks = {
            "fold time <= fuse/2": n["time"] <= f["time"] / 2,
            "peak memory <= folded layers": n["mem"] is not None and n["mem"] <= n["layers"],
            "error (vs float64) <= fuse's": n["err64"] <= f["err64"],
            "latency <= fuse's (+3% noise)": n["latency"] <= f["latency"] * 1.03,
            "folds >= fuse's": n["folded"] >= f["folded"],
        }
        ok_all &= all(checks.values())
        print(f"{name}: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
