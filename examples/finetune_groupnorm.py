"""Fine-tune with batches of 2: BatchNorm to GroupNorm, naive versus warm-started.

A small BatchNorm CNN is trained on scikit-learn's digits (8x8 images, shipped
with scikit-learn: nothing is downloaded), then converted to GroupNorm three
ways with :func:`normfold.batchnorm_to_groupnorm`:

* naive: gamma and beta copied;
* warm start: each channel's scale and shift fitted by least squares to the
  BatchNorm's outputs on 512 training images, in one pass;
* sequential warm start: the same fit, layer by layer on the inputs the
  converted layers before it produce.

Each is then fine-tuned briefly with batches of 2 images, clipping the
gradient norm after backward and before the optimizer step (the recipe of
differentially private training, where per-sample gradients rule BatchNorm
out). The table shows, averaged over seeds, the test accuracy and the output
error relative to the trained model right after the conversion, and the
accuracy after 25, 100 and 300 fine-tuning steps. The BatchNorm model
fine-tuned the same way is shown for contrast.

Run: ``python examples/finetune_groupnorm.py`` (CPU, one thread; about 30 s
on an idle core).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import normfold as nf


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 1300 / 497 images of 1x8x8 in [0, 1]."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1300], perm[1300:]
    return x[tr], y[tr], x[te], y[te]


def small_cnn() -> nn.Sequential:
    """Three conv blocks and a hidden Linear, each followed by BatchNorm (2d on images, 1d on features)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
          clip: float | None = None, decay: bool = False, eval_at: dict[int, Callable[[], None]] | None = None) -> None:
    """Adam on cross-entropy for ``steps`` steps (``decay``: lr falls linearly to 0).

    With ``clip``, the gradient norm is clipped between backward and step.
    ``eval_at`` maps a step count to a callback run after that many steps.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps) if decay else None
    model.train()
    step = 0
    while step < steps:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)  # after backward, before step
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            if eval_at and step in eval_at:
                eval_at[step]()
                model.train()
            if step >= steps:
                break
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None = None
             ) -> tuple[float, float]:
    """(accuracy, RMS of the logit difference to ``reference`` relative to the reference's RMS)."""
    model.eval()
    out = model(x)
    acc = (out.argmax(1) == y).float().mean().item()
    err = float("nan") if reference is None else ((out - reference).pow(2).mean().sqrt()
                                                   / reference.pow(2).mean().sqrt()).item()
    return acc, err


VARIANTS = ("BatchNorm (trained)", "GroupNorm naive", "GroupNorm warm start", "GroupNorm warm start, sequential")


def run_seed(seed: int, *, train_steps: int, checkpoints: tuple[int, ...], calibration: int, lr: float
             ) -> dict[str, list[float]]:
    """One seed: train, convert three ways, fine-tune each; per variant [acc before, logit err, acc at each checkpoint]."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits(seed)
    model = small_cnn()
    train(model, x_tr, y_tr, steps=train_steps, batch_size=64, lr=1e-2, seed=seed, decay=True)
    with torch.no_grad():
        reference = model(x_te)
    calib = x_tr[:calibration]
    converted = {
        VARIANTS[0]: model,
        VARIANTS[1]: nf.batchnorm_to_groupnorm(model).module,
        VARIANTS[2]: nf.batchnorm_to_groupnorm(model, calibration_data=calib).module,
        VARIANTS[3]: nf.batchnorm_to_groupnorm(model, calibration_data=calib, sequential=True).module,
    }
    rows: dict[str, list[float]] = {}
    for name, m in converted.items():
        acc0, err0 = evaluate(m, x_te, y_te, reference)
        row = [acc0, err0]
        tuned = copy.deepcopy(m)
        # BatchNorm fine-tuned with batches of 2 is the case GroupNorm is for: shown for contrast
        train(tuned, x_tr, y_tr, steps=max(checkpoints), batch_size=2, lr=lr, seed=seed + 1, clip=1.0,
              eval_at={c: (lambda t=tuned: row.append(evaluate(t, x_te, y_te)[0])) for c in checkpoints})
        rows[name] = row
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="runs to average (seeds 0..N-1)")
    ap.add_argument("--train-steps", type=int, default=120, help="Adam steps of the BatchNorm training, batch 64")
    ap.add_argument("--checkpoints", default="25,100,300", help="fine-tuning steps (batch size 2) to report at")
    ap.add_argument("--calibration", type=int, default=512, help="training images for the warm start")
    ap.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate of the fine-tuning")
    args = ap.parse_args(argv)
    checkpoints = tuple(sorted(int(c) for c in args.checkpoints.split(",")))

    # A model this small runs fastest on one thread (and the machine may be shared).
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    per_seed = [run_seed(s, train_steps=args.train_steps, checkpoints=checkpoints, calibration=args.calibration, lr=args.lr)
                for s in range(args.seeds)]
    mean = {name: [sum(r[name][i] for r in per_seed) / len(per_seed) for i in range(2 + len(checkpoints))]
            for name in VARIANTS}

    width = max(len(k) for k in VARIANTS)
    print(f"scikit-learn digits, 1300 train / 497 test images; mean of {args.seeds} seed(s). Fine-tuning at batch "
          f"size 2, Adam lr {args.lr:g}, clip_grad_norm_(1.0); warm start fitted on {args.calibration} training images.")
    heads = ["acc before", "logit err"] + [f"acc @{c}" for c in checkpoints]
    print(f"{'model':<{width}}  " + "  ".join(f"{h:>10}" for h in heads))
    for name in VARIANTS:
        print(f"{name:<{width}}  " + "  ".join(f"{v:>10.3f}" for v in mean[name]))
    print(f"logit err: RMS of the logit difference to the trained BatchNorm model, relative to its RMS. "
          f"acc @N: test accuracy after N fine-tuning steps. ({time.perf_counter() - t0:.0f} s)")
    return mean


if __name__ == "__main__":
    main()
