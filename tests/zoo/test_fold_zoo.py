"""fold_batchnorm on real architectures: every torchvision classification model and 20+ timm models.

For each model (random weights, BatchNorm statistics and affine parameters
randomized, eval):

* the folded model matches the original within :data:`normfold.tolerances.ZOO`;
* normfold folds at least as many batch_norm ops as
  ``torch.fx.experimental.optimization.fuse`` on the same model. Ops are counted
  as they RUN (ATen dispatch, :class:`tests.conftest.BatchNormOpCounter`), not as
  modules: fuse traces through BatchNorm subclasses (timm's BatchNormAct2d) and
  leaves functional batch_norm calls behind. A fuse fold counts only if fuse's
  output stays within the same tolerance (fuse folds Linear -> BatchNorm1d on
  (N, C, L) along the wrong axis);
* the number of ops that disappeared equals the number of folds normfold
  reports, and every BatchNorm left has a reason.

Models without any BatchNorm (ViT, Swin, ConvNeXt, plain VGG, ...) are checked
on the meta device: no compute, the same dispatch. There the fold must change
nothing, so the output is the original's by construction; a real forward of a
632M-parameter ViT would only cost time.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import pytest
import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import normfold as nf
from normfold.tolerances import ZOO
from tests.conftest import fast_random_init, output_error, randomize_bn_stats, run_counting

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

pytestmark = pytest.mark.zoo

#: square input sizes tried in order; the first that runs is used (small keeps the zoo fast)
SIZES = (32, 64, 75, 224, 256, 299)


def _inputs(size: int, device: str = "cpu", batch: int = 1) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(size)
    return ((torch.randn(batch, 3, size, size, generator=g) * 2 + 0.5).to(device),)


def _first_run(model: nn.Module, sizes: Sequence[int], device: str = "cpu"):
    """(inputs, output, batch_norm ops run) at the first size the model accepts."""
    errors = []
    for s in sizes:
        x = _inputs(s, device)
        try:
            out, n = run_counting(model, x)
        except Exception as exc:  # too small for this architecture: try the next size
            errors.append(f"{s}: {type(exc).__name__}: {str(exc)[:80]}")
            continue
        return x, out, n
    raise AssertionError("no input size works: " + "; ".join(errors))


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__.startswith("FrozenBatchNorm")
               for m in model.modules())


def _build(build: Callable[[], nn.Module]) -> nn.Module:
    """The model with seeded random weights and randomized BatchNorm statistics, in eval: the same every call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        with fast_random_init(seed=0):
            model = build().eval()
    return randomize_bn_stats(model, seed=1)


def _fuse_folds(model: nn.Module, x: tuple, ref: object, n_ref: int) -> tuple[int, str]:
    """batch_norm ops fuse removes from ``model`` (0 if its output is not within ZOO of ``ref``), and a note."""
    try:
        fused = fuse(model, inplace=True)
    except Exception as exc:  # fuse cannot trace every model; normfold falls back to torch.export
        return 0, f"fuse failed: {type(exc).__name__}"
    out_f, n_f = run_counting(fused, x)
    _, fuse_rel = output_error(out_f, ref)
    if fuse_rel > ZOO.rtol:
        return 0, f"fuse output wrong (rel err {fuse_rel:.2g}): its {n_ref - n_f} folds not counted"
    return n_ref - n_f, ""


def check_fold_vs_fuse(build: Callable[[], nn.Module], name: str, sizes: Sequence[int] = SIZES) -> dict:
    """Fold one architecture and compare with fuse; returns the numbers (also printed).

    Where normfold folds every batch_norm op, fuse cannot fold more and is not
    run (it would only cost a deep copy and a trace); otherwise the model is
    rebuilt (same seeds, same weights) and fuse folds that copy.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                meta = build().eval()
        except Exception:  # some builders compute on tensors (regnet): build for real below
            meta = None
    if meta is not None and not _has_batchnorm(meta):
        return _check_without_batchnorm(meta, name, sizes)
    del meta

    model = _build(build)
    x, ref, n_ref = _first_run(model, sizes)
    result = nf.fold_batchnorm(model, inplace=True, example_inputs=x)
    out, n_after = run_counting(result.module, x)
    abs_err, rel_err = output_error(out, ref)
    folds = n_ref - n_after
    del model, result.module
    if n_after:
        fuse_folds, fuse_note = _fuse_folds(_build(build), x, ref, n_ref)
    else:
        fuse_folds, fuse_note = None, "(not run: normfold folded every op)"
    reasons = "; ".join(str(s) for s in result.skipped)
    print(f"\n{name}: input {tuple(x[0].shape)}, batch_norm ops {n_ref}, normfold folded {folds}, "
          f"fuse {fuse_folds} {fuse_note}, rel err {rel_err:.2e}, source {result.metrics.get('graph_source')}"
          + (f"; skipped: {reasons}" if reasons else ""))

    assert rel_err <= ZOO.rtol, f"{name}: folded output differs, max rel error {rel_err:.3g} (abs {abs_err:.3g})"
    assert folds == len([c for c in result.changes if c.action != "bake"]), \
        f"{name}: {len(result.changes)} changes reported, {folds} batch_norm ops gone"
    assert folds >= (fuse_folds or 0), f"{name}: normfold folded {folds} batch_norm ops, fuse {fuse_folds}: {reasons}"
    assert all(s.reason for s in result.skipped)
    if n_after:
        assert result.skipped, f"{name}: {n_after} batch_norm ops remain and none is explained"
    return {"name": name, "ops": n_ref, "normfold": folds, "fuse": fuse_folds, "rel_err": rel_err}


def _check_without_batchnorm(model: nn.Module, name: str, sizes: Sequence[int]) -> dict:
    x, _, n_ref = _first_run(model, sizes, device="meta")
    assert n_ref == 0, f"{name}: {n_ref} functional batch_norm ops without a BatchNorm module"
    params = [id(p) for p in model.parameters()]
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    result = nf.fold_batchnorm(model, inplace=True, example_inputs=x)
    assert not result.modified and not result.changes
    # nothing replaced, no parameter re-created: the forward is the original's, value for value
    assert [id(p) for p in result.module.parameters()] == params
    assert [(n, type(m)) for n, m in result.module.named_modules()] == kinds
    try:
        fused = fuse(model)
    except Exception:  # fuse cannot trace every model: nothing to compare then
        pass
    else:
        assert run_counting(fused, x)[1] == 0
    print(f"\n{name}: no BatchNorm; input {tuple(x[0].shape)} on meta; nothing folded, nothing to fold")
    return {"name": name, "ops": 0, "normfold": 0, "fuse": 0, "rel_err": 0.0}


TORCHVISION = torchvision.models.list_models(module=torchvision.models)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_fold_matches_and_beats_fuse(name: str) -> None:
    def build() -> nn.Module:
        kw = {"init_weights": True} if name in {"googlenet", "inception_v3"} else {}
        if name in {"googlenet", "inception_v3"}:
            kw["aux_logits"] = False
        return torchvision.models.get_model(name, **kw)

    check_fold_vs_fuse(build, name)


#: timm architectures with BatchNorm: small variants of each family, several BatchNorm styles
#: (plain, BatchNormAct2d, Conv2dSame, Linear+BatchNorm1d, re-parameterizable branches)
TIMM = [
    "resnet18d", "seresnext26d_32x4d", "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_small_050",
    "mobilenetv2_050", "regnetx_002", "regnety_002", "densenet121", "rexnet_100", "ghostnet_100",
    "cspresnet50", "cspdarknet53", "cs3darknet_s", "levit_128s", "repvgg_a0", "vgg11_bn", "dla34",
    "mixnet_s", "fbnetc_100", "mnasnet_small", "lcnet_050", "tinynet_e", "dpn68", "hrnet_w18_small",
    "selecsls42b", "mobileone_s0", "efficientvit_b0", "resnet26t", "inception_v3",
]


@pytest.mark.parametrize("name", TIMM)
def test_timm_fold_matches_and_beats_fuse(name: str) -> None:
    check_fold_vs_fuse(lambda: timm.create_model(name, pretrained=False), name)
