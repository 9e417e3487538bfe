"""No false alarms, measured: correct folds and conversions must pass normfold's one verification rule.

Through the command line, in this process (``normfold.cli.main``), for every
torchvision classification model and a list of timm models with BatchNorm:
random weights, BatchNorm running statistics and affine parameters
randomized (:func:`normfold.testing.randomize_batchnorm`), once as built and
once with the classifier (the last Linear or 1x1 Conv) scaled by 1000, each
saved as a pickled module (put in eval first) and as a state_dict with its
factory (``--arch``), then

* ``normfold fold FILE ...``
* ``normfold convert FILE --to frozen ...``

Every run must exit 0. The table gives, per model and run, the exit code, the
largest error as a fraction of the output's scale and the margin (the
allowed bound over the error) that the command printed.

``--dtypes float16,bfloat16`` measures instead what the low-precision rules of
:data:`normfold.tolerances.POLICY` are based on, in the library: the model
cast to the dtype and folded, the same model against its float32 original,
and what multiplying one layer's output by 1.01 does (first third, two
thirds, last layer), as fractions of the output's scale (BatchNorms randomized by the tests'
``randomize_bn_stats``, which also flips the sign of a quarter of the scales).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/false_alarms.py                       # everything (hours on 1 core)
    OMP_NUM_THREADS=1 python benchmarks/false_alarms.py --models resnet18,timm:regnetz_b16 --image-size 64
    OMP_NUM_THREADS=1 python benchmarks/false_alarms.py --limit 10 --kinds pickle
    OMP_NUM_THREADS=1 python benchmarks/false_alarms.py --dtypes float16,bfloat16 --image-size 96 \
        --models resnet18,resnet50,timm:regnetz_b16,efficientnet_b0,mobilenet_v3_large,regnet_y_400mf

Exit code: 0 when every run exited 0, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

os.environ.setdefault("COLUMNS", "400")  # the commands' tables are parsed: no wrapping
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import normfold as nf  # noqa: E402
from normfold.cli import main as cli_main  # noqa: E402
from normfold.testing import randomize_batchnorm  # noqa: E402

#: timm models with BatchNorm (small configurations of each family; built with random weights, never downloaded)
TIMM_MODELS = [
    "resnet18", "resnet26d", "resnet50d", "seresnet18", "skresnet18", "resnext26ts", "regnetz_b16", "regnetx_002",
    "regnety_002", "efficientnet_b0", "efficientnet_lite0", "tf_efficientnet_b0", "mobilenetv2_050",
    "mobilenetv3_small_050", "mobilenetv3_large_100", "mnasnet_050", "spnasnet_100", "fbnetc_100", "tinynet_e",
    "lcnet_050", "mixnet_s", "ghostnet_100", "rexnet_100", "densenet121", "dpn68", "dla34", "hrnet_w18_small",
    "cspresnet50", "cspdarknet53", "darknet53", "selecsls42b", "res2net50_14w_8s", "resnest14d", "gernet_s",
    "repvgg_a0", "mobileone_s0", "fastvit_t8", "efficientvit_b0", "levit_128s", "convmixer_768_32", "bat_resnext26ts",
    "halonet26t", "lambda_resnet26t", "xception41", "inception_v3", "resnet34d", "regnetv_040", "eca_resnet33ts",
]

HEAD_SCALE = 1000.0
VERDICT = re.compile(r"max \|a - b\| (\S+) (<=|>) .*?scale (\S+) \(margin (\S+?)x?\)")


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def factory(name: str) -> tuple[Callable[[], nn.Module], str]:
    """(a builder, the --arch string) for ``resnet18`` (torchvision) or ``timm:NAME``."""
    if name.startswith("timm:"):
        import timm

        timm_name = name.split(":", 1)[1]
        return (lambda: timm.create_model(timm_name, pretrained=False)), f"timm:{timm_name}"
    import torchvision

    return (lambda: torchvision.models.get_model(name, weights=None)), f"torchvision.models:{name}"


def scale_head(model: nn.Module, factor: float) -> str:
    """Multiply the last Linear / Conv (the classifier) by ``factor``; its path."""
    last = None
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = (path, m)
    if last is None:
        raise ValueError("no Linear or Conv2d to scale")
    with torch.no_grad():
        last[1].weight.mul_(factor)
        if last[1].bias is not None:
            last[1].bias.mul_(factor)
    return last[0]


def input_size(model: nn.Module, wanted: int) -> int:
    """``wanted`` if the model runs at it, else its timm default, else 224."""
    sizes = [wanted]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        sizes.append(int(cfg["input_size"][-1]))
    sizes += [224, 299]
    for s in sizes:
        try:
            with torch.no_grad():
                model.eval()(torch.randn(1, 3, s, s))
            return s
        except Exception:
            continue
    raise RuntimeError("runs at none of the sizes tried")


def run_cli(argv: list[str]) -> tuple[int, str, float]:
    """(exit code, printed text, seconds) of ``normfold ARGV`` in this process."""
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = cli_main(argv)
        except SystemExit as exc:
            code = int(exc.code) if isinstance(exc.code, int) else 2
        except Exception as exc:  # a crash is a result too
            buf.write(f"\nCRASH {type(exc).__name__}: {exc}\n")
            code = 99
    return code, buf.getvalue(), time.perf_counter() - t0


def verdict(text: str) -> tuple[float, float]:
    """(largest error / scale, smallest margin) from the comparison table the command printed."""
    worst, margin = float("nan"), float("nan")
    for m in VERDICT.finditer(text):
        err, scale, mg = float(m.group(1)), float(m.group(3)), m.group(4)
        rel = err / scale if scale else err
        worst = rel if worst != worst else max(worst, rel)
        mgv = float("inf") if mg == "inf" else float(mg)
        margin = mgv if margin != margin else min(margin, mgv)
    return worst, margin


def sweep(names: list[str], image_size: int, kinds: list[str], commands: list[str], seed: int,
          max_params: float | None = None) -> int:
    # a model without BatchNorm (alexnet, vit_b_16) has nothing to fold: the commands exit 1 on a no-op unless told
    # to accept it, and what is measured here is the verdict on the outputs, which they still print
    noop = ["--allow-noop"] if "--allow-noop" in run_cli(["fold", "--help"])[1] else []
    print(f"{'model':34s} {'head':>6s} {'file':8s} {'command':8s} {'exit':>4s} {'err/scale':>10s} {'margin':>8s} "
          f"{'s':>6s}  note", flush=True)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="normfold-false-alarms-") as tmp:
        for name in names:
            build, arch = factory(name)
            for head in (1.0, HEAD_SCALE):
                try:
                    torch.manual_seed(seed)
                    model = build()
                    randomize_batchnorm(model, seed=seed)
                    if head != 1.0:
                        scale_head(model, head)
                    n_params = sum(p.numel() for p in model.parameters())
                    if max_params is not None and n_params > max_params:
                        print(f"{name:34s} {head:6g} skipped: {n_params / 1e6:.0f}M parameters, over --max-params",
                              flush=True)
                        break
                    size = input_size(model, image_size)
                except Exception as exc:
                    print(f"{name:34s} {head:6g} build failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    failures += 1
                    break
                shape = f"2,3,{size},{size}"
                files = {}
                if "pickle" in kinds:
                    p = Path(tmp) / "model.pt"
                    torch.save(copy.deepcopy(model).eval(), p)  # eval: a pickled module keeps its mode
                    files["pickle"] = [str(p), "--trust"]
                if "state_dict" in kinds:
                    p = Path(tmp) / "sd.pt"
                    torch.save(model.state_dict(), p)
                    files["state_dict"] = [str(p), "--arch", arch]
                for kind, file_args in files.items():
                    for command in commands:
                        out = Path(tmp) / f"out.{command}.pt"
                        argv = ([command] + file_args[:1] + (["--to", "frozen"] if command == "convert" else [])
                                + file_args[1:] + ["--input-shape", shape, "-o", str(out)] + noop)
                        code, text, secs = run_cli(argv)
                        err, margin = verdict(text)
                        last = (text.strip().splitlines() or [""])[-1]
                        note = last[:160] if code != 0 else ("no BatchNorm: nothing rewritten"
                                                             if re.search(r"(folded|converted) 0 ", last) else "")
                        failures += code != 0
                        print(f"{name:34s} {head:6g} {kind:8s} {command:8s} {code:4d} {err:10.2e} {margin:8.3g} "
                              f"{secs:6.1f}  {note}", flush=True)
                        with contextlib.suppress(OSError):
                            out.unlink()
                del model
    return failures


def low_precision(names: list[str], image_size: int, dtypes: list[torch.dtype], seed: int) -> None:
    """What the float16 / bfloat16 rules are based on: correct rewrites and 1% changes, relative to the scale."""
    def rel(ref: torch.Tensor, cand: torch.Tensor) -> float:
        r = ref.double()
        return (cand.double() - r).abs().max().item() / r.abs().max().item()

    print(f"{'model':22s} {'dtype':9s} {'folded':>8s} {'vs fp32':>8s}  1% at layer (first third, two thirds, last)")
    for name in names:
        build, _ = factory(name)
        from tests.conftest import randomize_bn_stats  # signs flipped on a quarter of the channels, as in the tests

        torch.manual_seed(seed)
        m0 = randomize_bn_stats(build(), seed=seed).eval()
        size = input_size(m0, image_size)
        x32 = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(seed)) * 2 + 0.5
        with torch.no_grad():
            y32 = m0(x32)
        for dt in dtypes:
            m = copy.deepcopy(m0).to(dt).eval()
            x = x32.to(dt)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = m(x)
                yf = nf.fold_batchnorm(m, example_inputs=(x,)).module(x)
                layers = [(p, l) for p, l in m.named_modules() if isinstance(l, (nn.Conv2d, nn.Linear))]
                planted = []
                for i in (len(layers) // 3, 2 * len(layers) // 3, len(layers) - 1):
                    hook = layers[i][1].register_forward_hook(lambda mod, inp, out: out * 1.01)
                    planted.append(f"{layers[i][0]} {rel(y, m(x)):.1e}")
                    hook.remove()
            print(f"{name:22s} {str(dt)[6:]:9s} {rel(y, yf):8.1e} {rel(y32, y):8.1e}  {'; '.join(planted)}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated: torchvision names, timm:NAME (default: every torchvision "
                                     "classification model and TIMM_MODELS)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N models")
    ap.add_argument("--image-size", type=int, default=64, help="input side when the model runs at it (default 64)")
    ap.add_argument("--kinds", default="pickle,state_dict", help="pickle,state_dict")
    ap.add_argument("--commands", default="fold,convert", help="fold,convert (convert is --to frozen)")
    ap.add_argument("--dtypes", default=None, help="float16,bfloat16: measure the low-precision basis instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-params", type=float, default=None, help="skip (and say so) models with more parameters")
    ap.add_argument("--skip", default="", help="comma-separated models to leave out (already measured)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    else:
        names = torchvision_names() + [f"timm:{n}" for n in TIMM_MODELS]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    names = [n for n in names if n not in skip]
    if args.limit:
        names = names[:args.limit]
    if args.dtypes:
        low_precision(names, args.image_size, [getattr(torch, d) for d in args.dtypes.split(",")], args.seed)
        return 0
    t0 = time.perf_counter()
    failures = sweep(names, args.image_size, args.kinds.split(","), args.commands.split(","), args.seed,
                     args.max_params)
    print(f"{len(names)} model(s), {failures} run(s) not exiting 0, {time.perf_counter() - t0:.0f}s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
