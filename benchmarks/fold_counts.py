"""BatchNorm ops folded by normfold beside torch.fx.experimental.optimization.fuse, on every zoo model.

For each model (random weights, BatchNorm statistics and affine parameters
randomized, eval, the smallest input size that runs) it counts the batch_norm
ops that RUN in one forward pass (ATen dispatch level, like tests/zoo):

* ``ops``      batch_norm ops in the original model;
* ``fuse``     ops torch's fuse removes (not counted when fuse's output is wrong);
* ``direct``   ops normfold removes with the direct fold only
               (``fold_batchnorm(forward=False, weight_standardization=False)``);
* ``normfold`` ops normfold removes by default, and of those, ``through`` (folded
               backward through reshapes / pools / cat), ``forward`` (folded into
               the next layer) and ``ws`` (weight standardization baked);
* ``left``     ops still running, each with a reason in ``PassResult.skipped``;
* ``merge``    ops removed by ``fold_batchnorm(merge_branches=True)`` (the folds, then the
               branch merge of re-parameterizable blocks), ``left m`` those still running
               after it, and ``conv`` the convolution ops run before / after it;
* ``rel err``  max error of the folded model relative to the output's scale.

With ``--pt2`` each model is also exported with torch.export and folded at the
ATen level; ``pt2`` is the ops removed there and ``=`` says whether the fold
records (BatchNorm path, layer paths) equal the nn.Module pass's.

Usage::

    python benchmarks/fold_counts.py                     # torchvision + the timm list of tests/zoo + extras
    python benchmarks/fold_counts.py --only timm --pt2   # a subset, with the .pt2 column
    python benchmarks/fold_counts.py levit_128s mixnet_s # named models (timm or torchvision)
    python benchmarks/fold_counts.py --merge-only        # without the fuse / direct columns: quicker
    python benchmarks/fold_counts.py --only torchvision --shard 1/3   # every 3rd model from the 2nd

Prints one line per model as it goes, then the table and the totals (markdown).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import normfold as nf  # noqa: E402
from normfold.tolerances import for_dtype  # noqa: E402
from tests.conftest import (BatchNormOpCounter, output_error, randomize_bn_stats, run_counting,  # noqa: E402
                            run_counting_ops)

try:  # big torchvision models build much faster with it, when the test helpers provide it
    from tests.conftest import fast_random_init  # noqa: E402
except ImportError:  # pragma: no cover
    import contextlib

    def fast_random_init(seed: int = 0):  # type: ignore[no-redef]
        return contextlib.nullcontext()

SIZES = (32, 64, 75, 224, 256, 299)
#: a fold counts as right when max |folded - original| <= RTOL * max |original| (the float32 verification policy)
RTOL = for_dtype(torch.float32).scaled

#: the timm list of tests/zoo/test_fold_zoo.py (kept in step by hand: benchmarks do not import tests/zoo)
TIMM_ZOO = [
    "resnet18d", "seresnext26d_32x4d", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_small_050",
    "mobilenetv2_050", "regnetx_002", "regnety_002", "densenet121", "rexnet_100", "ghostnet_100",
    "cspresnet50", "cspdarknet53", "cs3darknet_s", "levit_128s", "repvgg_a0", "vgg11_bn", "dla34",
    "mixnet_s", "fbnetc_100", "mnasnet_small", "lcnet_050", "tinynet_e", "dpn68", "hrnet_w18_small",
    "selecsls42b", "mobileone_s0", "efficientvit_b0", "resnet26t", "inception_v3",
]
#: timm models where the forward / through-ops / weight-standardization rules matter, beyond the zoo list
TIMM_EXTRA = ["repvit_m1", "efficientformerv2_s0", "resnetv2_50x1_bit", "nf_resnet26", "fastvit_t8",
              "mixnet_m", "tinynet_a", "levit_conv_128s", "efficientvit_m0",
              # the Rep* families of tests/zoo/test_reparam_zoo.py not in the zoo list (branch merging)
              "repvit_m0_9", "repghostnet_050"]


@dataclass
class Row:
    name: str
    source: str
    input: str = ""
    ops: int = 0
    fuse: int | str = 0
    direct: int | str = 0
    normfold: int = 0
    through: int = 0
    forward: int = 0
    ws: int = 0
    left: int = 0
    rel_err: float = 0.0
    merge: int = 0
    merge_left: int = 0
    merge_err: float = 0.0
    conv: int = 0
    conv_merge: int = 0
    seconds: float = 0.0
    pt2: int | str = ""
    pt2_same: str = ""
    note: str = ""
    reasons: list[str] = field(default_factory=list)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__.startswith("FrozenBatchNorm")
               or type(m).__name__ in {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}
               for m in model.modules())


def _builder(name: str, source: str):
    if source == "torchvision":
        import torchvision

        def build() -> nn.Module:
            kw = {"init_weights": True, "aux_logits": False} if name in {"googlenet", "inception_v3"} else {}
            return torchvision.models.get_model(name, **kw)
    else:
        import timm

        def build() -> nn.Module:
            return timm.create_model(name, pretrained=False)
    return build


def _first_run(model: nn.Module):
    for s in SIZES:
        g = torch.Generator().manual_seed(s)
        x = (torch.randn(2, 3, s, s, generator=g) * 2 + 0.5,)
        try:
            out, n = run_counting(model, x)
        except Exception:
            continue
        return x, out, n
    raise RuntimeError("no input size runs")


def _records(result: nf.PassResult) -> set[tuple]:
    return {(c.action, c.paths) for c in result.changes}


def _measure_fuse_and_direct(row: Row, model: nn.Module, x: tuple, ref: object, n_ref: int) -> None:
    """The ``fuse`` and ``direct`` columns: what torch's fuse and normfold's direct fold alone remove."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model)
        out_f, n_f = run_counting(fused, x)
        if output_error(out_f, ref)[1] <= RTOL:
            row.fuse = n_ref - n_f
        else:
            row.fuse, row.note = 0, f"fuse output wrong ({n_ref - n_f} folds not counted)"
        del fused
    except Exception as exc:
        row.fuse, row.note = 0, f"fuse failed ({type(exc).__name__})"
    gc.collect()

    direct = nf.fold_batchnorm(model, example_inputs=x, forward=False, weight_standardization=False)
    row.direct = n_ref - run_counting(direct.module, x)[1]
    del direct
    gc.collect()


def measure(name: str, source: str, pt2: bool, merge_only: bool = False) -> Row:
    row = Row(name, source)
    build = _builder(name, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                meta = build()
        except Exception:
            meta = None
        if meta is not None and not _has_batchnorm(meta):
            row.note = "no BatchNorm"
            return row
        del meta
        torch.manual_seed(0)
        with fast_random_init(0):
            model = build().eval()
    randomize_bn_stats(model, seed=1)
    x, ref, n_ref = _first_run(model)
    row.input = "x".join(map(str, x[0].shape[1:]))
    row.ops = n_ref
    row.conv = row.conv_merge = run_counting_ops(model, x)[2]

    if merge_only:  # the fuse and direct-fold columns do not depend on merging: a quicker run leaves them out
        row.fuse = row.direct = "-"
    else:
        _measure_fuse_and_direct(row, model, x, ref, n_ref)

    try:
        merged = nf.fold_batchnorm(model, example_inputs=x, merge_branches=True)
        out_m, n_m, row.conv_merge = run_counting_ops(merged.module, x)
        row.merge, row.merge_left = n_ref - n_m, n_m
        row.merge_err = output_error(out_m, ref)[1]
        if row.merge_err > RTOL:
            row.note += f" MERGED OUTPUT DIFFERS (rel err {row.merge_err:.2g})"
        del merged, out_m
    except Exception as exc:  # counted as no merge; the note says why
        row.merge, row.merge_left = 0, n_ref
        row.note += f" merge failed ({type(exc).__name__}: {str(exc)[:80]})"
    gc.collect()

    module_records = None
    if pt2:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(model, x, strict=False)
            pr = nf.fold_batchnorm(ep)
            with BatchNormOpCounter() as c0, torch.no_grad():
                ep.module()(*x)
            with BatchNormOpCounter() as c1, torch.no_grad():
                out_p = pr.program.module()(*x)
            row.pt2 = c0.count - c1.count
            if output_error(out_p, ref)[1] > RTOL:
                row.note += " pt2 output differs!"
            pt2_records = _records(pr)
            del ep, pr
        except Exception as exc:
            row.pt2 = f"export failed ({type(exc).__name__})"
            pt2_records = None
        gc.collect()

    t0 = time.perf_counter()
    result = nf.fold_batchnorm(model, inplace=True, example_inputs=x)
    row.seconds = time.perf_counter() - t0
    out, n_after = run_counting(result.module, x)
    row.normfold = n_ref - n_after
    row.left = n_after
    row.rel_err = output_error(out, ref)[1]
    for c in result.changes:
        if c.action == "fold_forward":
            row.forward += 1
        elif c.action == "bake":
            row.ws += 1
        elif c.details.get("through"):
            row.through += 1
    row.reasons = [str(s) for s in result.skipped]
    if pt2 and pt2_records is not None:
        module_records = _records(result)
        row.pt2_same = "yes" if module_records == pt2_records else "NO"
    if row.rel_err > RTOL:
        row.note += f" OUTPUT DIFFERS (rel err {row.rel_err:.2g})"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="model names (default: the whole zoo)")
    ap.add_argument("--only", choices=("torchvision", "timm", "extra"), help="one group of the zoo")
    ap.add_argument("--pt2", action="store_true", help="also export each model and fold the ExportedProgram")
    ap.add_argument("--merge-only", action="store_true",
                    help="leave out the fuse and direct-fold columns (they do not depend on merging): quicker")
    ap.add_argument("--shard", default="0/1", metavar="I/N",
                    help="measure every N-th model from the I-th (0-based), to split the zoo over processes")
    ap.add_argument("--skip", type=int, default=0, metavar="K",
                    help="leave out the first K models of the list (resume a run that was stopped)")
    ap.add_argument("--reasons", action="store_true", help="print why each remaining BatchNorm was left")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    import timm
    import torchvision

    jobs: list[tuple[str, str]] = []
    if args.models:
        tv = set(torchvision.models.list_models(module=torchvision.models))
        jobs = [(m, "torchvision" if m in tv and not timm.is_model(m) else "timm") for m in args.models]
    else:
        if args.only in (None, "torchvision"):
            jobs += [(m, "torchvision") for m in torchvision.models.list_models(module=torchvision.models)]
        if args.only in (None, "timm"):
            jobs += [(m, "timm") for m in TIMM_ZOO]
        if args.only in (None, "extra"):
            jobs += [(m, "timm extra") for m in TIMM_EXTRA]

    shard, shards = (int(v) for v in args.shard.split("/"))
    jobs = jobs[args.skip:][shard::shards]
    rows: list[Row] = []
    for name, source in jobs:
        t0 = time.perf_counter()
        try:
            row = measure(name, source, args.pt2, args.merge_only)
        except Exception as exc:  # a benchmark reports, it does not stop
            row = Row(name, source, note=f"ERROR {type(exc).__name__}: {str(exc)[:120]}")
        rows.append(row)
        print(f"{source:12s} {name:28s} ops {row.ops:4d} fuse {row.fuse!s:>4s} direct {row.direct!s:>4s} "
              f"normfold {row.normfold:4d} (through {row.through}, forward {row.forward}, ws {row.ws}) "
              f"left {row.left:3d} rel {row.rel_err:.1e} merge {row.merge:4d} left {row.merge_left:3d} "
              f"conv {row.conv}/{row.conv_merge} rel {row.merge_err:.1e} pt2 {row.pt2!s} {row.pt2_same} "
              f"[{time.perf_counter() - t0:.0f}s] {row.note}", flush=True)
        if args.reasons:
            for r in row.reasons:
                print(f"      {r}", flush=True)
        gc.collect()

    cols = ["model", "source", "input", "BN ops", "fuse", "direct", "normfold", "through", "forward", "WS", "left",
            "max rel err", "merge", "left m", "conv / merged", "merged rel err"] + (["pt2", "pt2 = module"] if args.pt2 else [])
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        if not r.ops and not r.note.startswith("ERROR"):
            continue
        cells = [r.name, r.source, r.input, r.ops, r.fuse, r.direct, r.normfold, r.through, r.forward, r.ws, r.left,
                 f"{r.rel_err:.1e}", r.merge, r.merge_left, f"{r.conv} / {r.conv_merge}", f"{r.merge_err:.1e}"
                 ] + ([r.pt2, r.pt2_same] if args.pt2 else [])
        print("| " + " | ".join(str(c) for c in cells) + " |" + (f" {r.note}" if r.note else ""))

    print()
    for group in sorted({r.source for r in rows}):
        g = [r for r in rows if r.source == group]
        with_bn = [r for r in g if r.ops]
        tot = lambda k: sum(getattr(r, k) for r in with_bn if isinstance(getattr(r, k), int))  # noqa: E731
        fuse_part = "" if args.merge_only else (
            f"fuse folds {tot('fuse')}, normfold direct {tot('direct')}, ")
        fuse_cmp = "" if args.merge_only else (
            f"normfold >= fuse on {sum(1 for r in with_bn if isinstance(r.fuse, int) and r.normfold >= r.fuse)}"
            f"/{len(with_bn)}; ")
        print(f"**{group}**: {len(g)} models, {len(with_bn)} with BatchNorm; batch_norm ops {tot('ops')}: {fuse_part}"
              f"normfold {tot('normfold')} (through ops {tot('through')}, forward {tot('forward')}, "
              f"weight standardization {tot('ws')}); left {tot('left')}; max rel err "
              f"{max((r.rel_err for r in with_bn), default=0):.1e}; {fuse_cmp}"
              f"with merge_branches=True {tot('merge')} (left {tot('merge_left')}; conv ops {tot('conv')} -> "
              f"{tot('conv_merge')}, fewer on {sum(1 for r in with_bn if r.conv_merge < r.conv)} models; max rel err "
              f"{max((r.merge_err for r in with_bn), default=0):.1e})"
              + (f"; pt2 records equal the module pass on {sum(1 for r in with_bn if r.pt2_same == 'yes')}"
                 f"/{len(with_bn)}" if args.pt2 else ""))
    bad = [r for r in rows if "DIFFERS" in r.note or r.note.startswith("ERROR") or "merge failed" in r.note or
           r.merge < r.normfold or
           (isinstance(r.fuse, int) and r.normfold < r.fuse)]
    if bad:
        print("\nproblems: " + ", ".join(f"{r.name} ({r.note.strip() or 'normfold < fuse'})" for r in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
