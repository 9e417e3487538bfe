"""Benchmark nf.recalibrate: accuracy recovered under domain shift, and throughput. Prints markdown tables.

A small BatchNorm CNN is trained here, in a few seconds, on scikit-learn's
bundled digits (8x8 grey images, 10 classes). The data are split into train
(1000), adaptation (397, labels never used) and test (400). Each shift
(contrast, brightness, Gaussian noise, blur, inversion) is applied to the
adaptation and test images; the BatchNorm statistics are re-estimated on the
shifted unlabeled images of the train+adaptation pool (never on the test
images) and accuracy is measured on the shifted test split, for:

* no recalibration,
* nf.recalibrate with each estimator (population, cumulative, ema),
* torch.optim.swa_utils.update_bn, which puts the whole model in training
  mode (dropout on: its statistics are measured on activations the eval model
  never sees), runs with autograd on, passes only ``batch[0]`` to the model,
  and resets every BatchNorm it is given even when forward never reaches it.

Then batch sizes 8..256 and 1..50 batches, and the recalibration throughput
beside a plain eval forward over the same data (target: at least 0.9x), on
the digits CNN and on torchvision's resnet18 and mobilenet_v3_small (random
weights). Timings are the best of several runs on one thread (the machine is
shared); accuracies use fixed seeds.

Run: python benchmarks/recalibrate.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import normfold as nf

SHIFTS = ("contrast", "brightness", "noise", "blur", "inversion")
METHODS = ("none", "population", "cumulative", "ema", "update_bn")


class DigitsNet(nn.Module):
    """Conv-BN-ReLU x3 with dropout between blocks and a BN1d head behind dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Dropout2d(0.1),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout2d(0.1),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 2 * 2, 64), nn.BatchNorm1d(64),
                                  nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------
# data and shifts


def load_splits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    idx = {"train": perm[:1000], "adapt": perm[1000:1397], "test": perm[1397:]}
    return {k: (x[v], y[v]) for k, v in idx.items()}


def shift(x: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """A shifted copy of images in [0, 1]; severities chosen so that the unadapted model clearly suffers."""
    if kind == "clean":
        return x.clone()
    if kind == "contrast":
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return m + (x - m) * 0.3
    if kind == "brightness":
        return x + 0.6
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return x + torch.randn(x.shape, generator=g) * 0.4
    if kind == "blur":
        k = torch.tensor([0.25, 0.5, 0.25])
        k2 = (k[:, None] * k[None, :]).view(1, 1, 3, 3)
        y = x
        for _ in range(2):
            y = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), k2)
        return y
    if kind == "inversion":
        return 1.0 - x
    raise ValueError(kind)


def train(splits, *, seed: int = 0, epochs: int = 30) -> tuple[DigitsNet, float]:
    torch.manual_seed(seed)
    model = DigitsNet()
    x, y = splits["train"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = {n: m.training for n, m in model.named_modules()}
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    for n, m in model.named_modules():
        m.training = was[n]
    return acc


def adaptation_batches(pool: torch.Tensor, kind: str, batch_size: int, num_batches: int, seed: int) -> list[torch.Tensor]:
    """``num_batches`` batches drawn without replacement while the pool lasts (then reshuffled), shifted."""
    g = torch.Generator().manual_seed(seed)
    out, order = [], torch.randperm(len(pool), generator=g)
    pos = 0
    for b in range(num_batches):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(pool), generator=g), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        out.append(shift(pool[idx], kind, seed=seed * 1000 + b))
    return out


def sorted_batches(pool: torch.Tensor, labels: torch.Tensor, kind: str, batch_size: int) -> list[torch.Tensor]:
    """The whole pool in label order, unshuffled: what a folder of class subfolders yields when read in order."""
    order = torch.argsort(labels, stable=True)
    x = shift(pool[order], kind, seed=5)
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def table_sorted(model, splits, pool, labels, *, sizes) -> str:
    xt, yt = splits["test"]
    tests = {k: shift(xt, k, seed=99) for k in SHIFTS}
    rows = []
    for bs in sizes:
        row = [str(bs)]
        for method in METHODS[1:]:
            accs = [accuracy(adapt(model, method, sorted_batches(pool, labels, k, bs)), tests[k], yt) for k in SHIFTS]
            row.append(pct(statistics.mean(accs)))
        rows.append(row)
    return md_table(["batch size"] + list(METHODS[1:]), rows)


@torch.no_grad()
def calibration_error(model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, float]:
    """How well the stored statistics match what each BatchNorm receives when ``model`` then runs in eval.

    Returns the mean over layers and channels of ``|running_mean - mean| / sd`` and of
    ``|ln(running_var / var)|``, where mean, var and sd are those of the layer's eval-time inputs over the
    same batches: 0 for statistics that standardize exactly what the deployed model sees.
    """
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for n, m in bns.items():
        seen[n] = []
        hooks.append(m.register_forward_pre_hook(
            lambda mod, a, n=n: seen[n].append(a[0].double().transpose(0, 1).reshape(a[0].shape[1], -1))))
    was = {n: m.training for n, m in model.named_modules()}
    model.eval()
    for b in batches:
        model(b)
    for h in hooks:
        h.remove()
    for n, m in model.named_modules():
        m.training = was[n]
    e_mean, e_var = [], []
    for n, m in bns.items():
        v = torch.cat(seen[n], 1)
        mu, var = v.mean(1), v.var(1)
        e_mean.append(float(((m.running_mean.double() - mu).abs() / (var + m.eps).sqrt()).mean()))
        e_var.append(float(torch.log((m.running_var.double() + m.eps) / (var + m.eps)).abs().mean()))
    return statistics.mean(e_mean), statistics.mean(e_var)


def table_calibration(model, pool, labels) -> str:
    rows = []
    n_all = math.ceil(len(pool) / 32)
    for label, make in (("shuffled, 32 x 44", lambda k: adaptation_batches(pool, k, 32, n_all, seed=8)),
                        ("sorted by label, 32 x 44", lambda k: sorted_batches(pool, labels, k, 32)),
                        ("sorted by label, 128 x 11", lambda k: sorted_batches(pool, labels, k, 128))):
        row = [label]
        for method in METHODS:
            errs = [calibration_error(adapt(model, method, make(k)), make(k)) for k in SHIFTS]
            row.append(f"{statistics.mean(e[0] for e in errs):.3f} / {statistics.mean(e[1] for e in errs):.3f}")
        rows.append(row)
    return md_table(["adaptation batches"] + list(METHODS), rows)


def adapt(model: nn.Module, method: str, batches: list[torch.Tensor]) -> nn.Module:
    if method == "none":
        return model
    if method == "update_bn":
        m = copy.deepcopy(model)
        torch.optim.swa_utils.update_bn(batches, m)
        return m
    return nf.recalibrate(model, batches, estimator=method, progress=False).model


# ----------------------------------------------------------------------------------------------
# tables


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pct(v: float) -> str:
    return f"{100 * v:.1f}"


def table_methods(model, splits, pool, *, batch_size: int, num_batches: int) -> str:
    xt, yt = splits["test"]
    rows = []
    means = {m: [] for m in METHODS}
    for kind in ("clean",) + SHIFTS:
        batches = adaptation_batches(pool, kind, batch_size, num_batches, seed=1)
        row = [kind]
        for method in METHODS:
            acc = accuracy(adapt(model, method, batches), shift(xt, kind, seed=99), yt)
            row.append(pct(acc))
            if kind != "clean":
                means[method].append(acc)
        rows.append(row)
    rows.append(["**mean of shifts**"] + [f"**{pct(statistics.mean(means[m]))}**" for m in METHODS])
    return md_table(["test data"] + [f"{m}" for m in METHODS], rows)


def table_grid(model, splits, pool, *, sizes, counts, method: str) -> str:
    xt, yt = splits["test"]
    tests = {k: shift(xt, k, seed=99) for k in SHIFTS}
    rows = []
    for bs in sizes:
        row = [str(bs)]
        for nb in counts:
            accs = [accuracy(adapt(model, method, adaptation_batches(pool, k, bs, nb, seed=2)), tests[k], yt)
                    for k in SHIFTS]
            row.append(pct(statistics.mean(accs)))
        rows.append(row)
    return md_table(["batch size \\ batches"] + [str(n) for n in counts], rows)


def table_estimators_by_size(model, splits, pool, *, configs) -> str:
    xt, yt = splits["test"]
    tests = {k: shift(xt, k, seed=99) for k in SHIFTS}
    rows = []
    for bs, nb in configs:
        row = [f"{bs} x {nb}"]
        for method in METHODS[1:]:
            accs = [accuracy(adapt(model, method, adaptation_batches(pool, k, bs, nb, seed=3)), tests[k], yt)
                    for k in SHIFTS]
            row.append(pct(statistics.mean(accs)))
        rows.append(row)
    return md_table(["batch size x batches"] + list(METHODS[1:]), rows)


# ----------------------------------------------------------------------------------------------
# what update_bn does differently


class WithMeta(nn.Module):
    """Two inputs: an image and a metadata vector with its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.meta_fc = nn.Linear(3, 4)
        self.meta_bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        h = self.bn(self.conv(x)).mean(dim=(2, 3))
        if meta is not None:
            h = h + self.meta_bn(self.meta_fc(meta))
        return h


def update_bn_differences(model: DigitsNet, pool: torch.Tensor) -> str:
    lines = []
    batches = adaptation_batches(pool, "clean", 64, 10, seed=4)
    # 1. dropout: statistics measured with dropout on do not match the eval model's activations
    bn = "head.3"
    rec = nf.recalibrate(model, batches, progress=False).model
    ub = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, ub)

    def seen_variance(m: nn.Module) -> torch.Tensor:
        """Per-channel variance of what ``bn`` receives when model ``m`` runs in eval on the batches."""
        got = []
        h = m.get_submodule(bn).register_forward_pre_hook(lambda mod, a: got.append(a[0].double()))
        with torch.no_grad():
            m.eval()
            for b in batches:
                m(b)
        h.remove()
        return torch.cat(got).var(0)

    ratio_ub = float((ub.get_submodule(bn).running_var / seen_variance(ub)).mean())
    ratio_rec = float((rec.get_submodule(bn).running_var / seen_variance(rec)).mean())
    lines.append(f"- dropout: BatchNorm1d `{bn}` sits behind Dropout(0.3). The variance update_bn stores (dropout on) "
                 f"is {ratio_ub:.2f}x the variance of what that layer receives when the model then runs in eval on "
                 f"the same data; nf.recalibrate's is {ratio_rec:.2f}x (the rest: upstream layers normalize with batch "
                 "statistics during recalibration, with population statistics in eval).")
    # 2. module modes come back flattened
    mixed = copy.deepcopy(model)
    mixed.train()
    mixed.features.eval()
    flags = {n: m.training for n, m in mixed.named_modules()}
    torch.optim.swa_utils.update_bn(batches, mixed)
    lost = sum(flags[n] != m.training for n, m in mixed.named_modules())
    mixed2 = copy.deepcopy(model)
    mixed2.train()
    mixed2.features.eval()
    r = nf.recalibrate(mixed2, batches, progress=False, inplace=True)
    lost2 = sum(flags[n] != m.training for n, m in r.model.named_modules())
    lines.append(f"- modes: a model in train mode with `features` in eval comes back from update_bn with {lost} "
                 f"module flag(s) changed (it calls model.train(was_training)); from nf.recalibrate with {lost2}.")
    # 3. autograd
    lines.append("- autograd: update_bn runs the forward with autograd on (it builds a graph per batch); "
                 "nf.recalibrate runs under torch.no_grad.")
    # 4. only input[0]
    torch.manual_seed(0)
    two = WithMeta().eval()
    with torch.no_grad():
        two.meta_bn.running_mean.fill_(0.7)
        two.meta_bn.running_var.fill_(2.0)
    g = torch.Generator().manual_seed(5)
    pairs = [(torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 3, generator=g) * 3 + 1) for _ in range(5)]
    ub2 = copy.deepcopy(two)
    torch.optim.swa_utils.update_bn(pairs, ub2)
    r2 = nf.recalibrate(two, pairs, progress=False)
    lines.append(f"- inputs: a model `forward(x, meta=None)` fed (x, meta) batches. update_bn calls `model(batch[0])`: "
                 f"the metadata branch never runs and its BatchNorm is left reset to mean "
                 f"{float(ub2.meta_bn.running_mean.mean()):.2f} / var {float(ub2.meta_bn.running_var.mean()):.2f} "
                 f"(it had 0.70 / 2.00), silently. nf.recalibrate calls `model(*batch)`: meta_bn mean "
                 f"{float(r2.model.meta_bn.running_mean.mean()):.2f} / var {float(r2.model.meta_bn.running_var.mean()):.2f}"
                 f" over {r2.shift('meta_bn').count} values per channel.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# throughput


def interleaved_min_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best time of each function over ``rounds`` rounds that run every function once, order rotated.

    The machine is shared: interleaving exposes every method to the same background load, and the minimum
    is the least disturbed run.
    """
    names = list(fns)
    for name in names:  # warm-up (allocator, oneDNN primitives)
        fns[name]()
    best = {name: math.inf for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def throughput_rows(name: str, model: nn.Module, batches: list[torch.Tensor], rounds: int) -> list[list[str]]:
    n = sum(len(b) for b in batches)
    model = model.eval()

    def plain_eval():
        with torch.no_grad():
            for b in batches:
                model(b)

    work = copy.deepcopy(model)

    def rec(est):
        return lambda: nf.recalibrate(work, batches, estimator=est, progress=False, inplace=True)

    def train_mode_bn():  # BatchNorm layers alone in training mode, momentum=None: what torch itself does
        for m in work.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
                m.train()
        with torch.no_grad():
            for b in batches:
                work(b)
        work.eval()

    def update_bn():
        torch.optim.swa_utils.update_bn(batches, work)

    fns = {"plain eval forward (no_grad)": plain_eval, "nf.recalibrate population": rec("population"),
           "nf.recalibrate cumulative": rec("cumulative"), "nf.recalibrate ema": rec("ema"),
           "torch BN training mode (no_grad)": train_mode_bn, "update_bn (autograd on)": update_bn}
    best = interleaved_min_times(fns, rounds)
    t_eval = best["plain eval forward (no_grad)"]
    return [[name, label, f"{n / t:,.0f}", f"{t_eval / t:.2f}x"] for label, t in best.items()]


SECTIONS = ("methods", "grid", "estimators", "sorted", "update_bn", "throughput")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer configurations and repeats (a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    splits = load_splits()
    model, train_s = train(splits, epochs=10 if args.quick else 30)
    pool = torch.cat([splits["train"][0], splits["adapt"][0]])
    labels = torch.cat([splits["train"][1], splits["adapt"][1]])  # only to order the pool in the "sorted" section
    print(f"# nf.recalibrate benchmark\n\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s); digits CNN "
          f"trained in {train_s:.1f} s; clean test accuracy {pct(accuracy(model, *splits['test']))}%; "
          f"adaptation pool {len(pool)} unlabeled images (train + adaptation splits, shifted), test split "
          f"{len(splits['test'][0])} images.\n")
    no_recal = statistics.mean(accuracy(model, shift(splits['test'][0], k, 99), splits['test'][1]) for k in SHIFTS)

    if "methods" in sections:
        print("## Accuracy (%) on the shifted test split, batch size 32 x 40 batches\n")
        print(table_methods(model, splits, pool, batch_size=32, num_batches=40))
    if "grid" in sections:
        sizes = (8, 32, 256) if args.quick else (8, 16, 32, 64, 128, 256)
        counts = (1, 10, 50) if args.quick else (1, 2, 5, 10, 25, 50)
        print("\n## population: mean accuracy (%) over the 5 shifts, by batch size and number of batches "
              f"(no recalibration: {pct(no_recal)})\n")
        print(table_grid(model, splits, pool, sizes=sizes, counts=counts, method="population"))
    if "estimators" in sections:
        print(f"\n## Every method: mean accuracy (%) over the 5 shifts (no recalibration: {pct(no_recal)})\n")
        configs = [(8, 1), (8, 10), (8, 50), (32, 1), (32, 10), (256, 1), (256, 50)]
        print(table_estimators_by_size(model, splits, pool, configs=configs[:3] if args.quick else configs))
    if "sorted" in sections:
        print("\n## Unshuffled data: the whole pool in label order (as a folder of class subfolders reads), mean "
              f"accuracy (%) over the 5 shifts (no recalibration: {pct(no_recal)})\n")
        print(table_sorted(model, splits, pool, labels, sizes=(32, 128) if args.quick else (32, 128, 512)))
        print("\n## Calibration error: stored statistics vs what each BatchNorm receives when the recalibrated model "
              "runs in eval on the same data, mean over layers, channels and the 5 shifts: |mean error| in sd / "
              "|ln variance ratio| (0 / 0 is exact)\n")
        print(table_calibration(model, pool, labels))
    if "update_bn" in sections:
        print("\n## What update_bn does differently\n")
        print(update_bn_differences(model, pool))
    if "throughput" in sections:
        print("\n## Throughput: samples per second, and ratio to a plain eval forward over the same batches\n")
        rounds = 3 if args.quick else 9
        rows = []
        for bs, nb in ((8, 50), (256, 50)) if not args.quick else ((256, 10),):
            batches = adaptation_batches(pool, "noise", bs, nb, seed=6)
            rows += throughput_rows(f"digits CNN, {nb} x {bs} (8x8)", model, batches, rounds)
        import torchvision

        torch.manual_seed(0)
        g = torch.Generator().manual_seed(7)
        for name, factory, shape, nb in (("resnet18", torchvision.models.resnet18, (32, 3, 64, 64), 4),
                                         ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small, (32, 3, 96, 96), 4)):
            net = factory(num_classes=10).eval()
            batches = [torch.randn(shape, generator=g) * 1.2 + 0.3 for _ in range(nb if not args.quick else 2)]
            rows += throughput_rows(f"{name}, {len(batches)} x {shape[0]} ({shape[2]}x{shape[3]})", net, batches, rounds)
        print(md_table(["model, data", "method", "samples/s", "vs eval"], rows))


if __name__ == "__main__":
    main()
