"""Every numerical tolerance normfold uses, in one place.

A fold is exact in real arithmetic; what remains is rounding. Folding in
float64 and casting back costs at most one rounding of each weight, so the
folded model differs from the original by a few ulps of the activations,
amplified by depth. The values below were chosen from measurements over the
torchvision zoo (see tests/zoo) with 2x headroom, and are the defaults for the
CLI's comparison, the checker and the test suite alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Tolerance", "for_dtype", "FOLD", "ZOO", "RECALIBRATE", "LAYERNORM_TO_RMSNORM", "MEAN_FREE_RATIO"]


@dataclass(frozen=True)
class Tolerance:
    """Pass when ``|a - b| <= atol + rtol * |b|`` elementwise (``torch.allclose`` semantics)."""

    atol: float
    rtol: float

    def allclose(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(torch.allclose(a.double(), b.double(), atol=self.atol, rtol=self.rtol))


#: rewrites that are exact in real arithmetic, by the dtype they run in
FOLD: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-9),
    torch.float32: Tolerance(atol=1e-4, rtol=1e-3),
    torch.float16: Tolerance(atol=1e-2, rtol=2e-2),
    torch.bfloat16: Tolerance(atol=5e-2, rtol=5e-2),
}

#: fold_batchnorm on whole float32 architectures (tests/zoo/test_fold_zoo.py): max |folded - original| over
#: max |original| per output tensor (``rtol``; ``atol`` unused). Random weights and randomized BatchNorm
#: statistics; the one rounding per folded weight, amplified by depth, measured at most 2.1e-6 over every
#: torchvision classification model and 30 timm models (wide_resnet101_2, mobilenetv2_050): 5x headroom.
ZOO = Tolerance(atol=0.0, rtol=1e-5)

#: recalibrated BatchNorm statistics against a float64 reference over the same batches (normfold.recalibrate):
#: per-batch statistics are reduced in the activation's dtype (float32: relative error ~1e-7, measured
#: 6e-8 on the tests' models) and combined in float64, so only that rounding remains, amplified by the
#: layers above. Also the bound between a 2-process all-reduced run and one process over the same batches.
RECALIBRATE: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-9),
    torch.float32: Tolerance(atol=2e-5, rtol=2e-4),
}


#: layernorm_to_rmsnorm(mode="exact") against the original model: exact in real arithmetic, but centring the
#: residual-stream writers changes the rounding of every stream sum, and RMSNorm rounds differently from
#: LayerNorm. Measured in float32: vit_b_16 (random weights) max abs output error 5.8e-6 (6.6e-6 at batch 4),
#: the tests' small ViT/GPT/BERT models <= 3e-6: more than 15x headroom.
LAYERNORM_TO_RMSNORM: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-9),
    torch.float32: Tolerance(atol=1e-4, rtol=1e-3),
}

#: largest |mean| / rms (over the normalized axis) of a LayerNorm input that layernorm_to_rmsnorm still counts
#: as mean-free when it checks an exact swap on the example inputs (float32 rounding of centred sums)
MEAN_FREE_RATIO: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}


def for_dtype(dtype: torch.dtype) -> Tolerance:
    """The exact-rewrite tolerance for a model running in ``dtype``."""
    return FOLD.get(dtype, FOLD[torch.float32])


@dataclass(frozen=True)
class CheckTolerance(Tolerance):
    """normfold.check's tolerance: ``|a - b| <= atol + rtol * |b| + scaled * max|b|`` elementwise.

    ``scaled`` bounds the error as a fraction of the output's largest magnitude
    (``max |b|`` over the whole output tensor): rounding errors grow with the
    magnitude of the numbers a network computes, so one ``scaled`` fits models
    whose outputs are 0.05 or 500, where one absolute ``atol`` cannot.
    """

    scaled: float = 0.0

    def allclose(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        b64 = b.double()
        scale = b64.abs().max().item() if b64.numel() else 0.0
        return bool(((a.double() - b64).abs() <= self.atol + self.scaled * scale + self.rtol * b64.abs()).all())

    def describe(self) -> str:
        parts = []
        if self.atol:
            parts.append(f"{self.atol:g}")
        if self.rtol:
            parts.append(f"{self.rtol:g} * |ref|")
        if self.scaled:
            parts.append(f"{self.scaled:g} * max|ref|")
        return "|a - b| <= " + (" + ".join(parts) if parts else "0")


#: normfold.check's default comparison of a stage's outputs with the original's, by dtype:
#: ``max |a - b| <= scaled * max |ref|`` per output tensor (atol = rtol = 0). Why scale-relative: over the
#: torchvision zoo with random weights the outputs' magnitudes range from 0.04 (alexnet) and 0.07 (vgg19) to
#: 1e3 (wide_resnet101_2), 1e5 (resnet152) and 3e8 (inception_v3), and float32 rounding grows with them;
#: no absolute atol fits both ends, one fraction of the scale does.
#: float32 = 2e-5, from measurements (tests/zoo/test_check_zoo.py: every torchvision classification model, random
#: weights, randomized BatchNorm statistics, inputs N(0.5, 2^2); fold_batchnorm, then the dynamo export in
#: onnxruntime's CPU provider, and the batch-independence probe at batches 1, 2 and 8 in both): the largest error
#: of a clean pipeline is 4.0e-6 of the output's scale (swin_v2_b; the probe's largest 3.9e-6, swin_v2_s; ResNets,
#: EfficientNets, RegNets 3e-7 .. 2e-6), so 2e-5 leaves 5x headroom. Below it a bug is real: one weight of a conv off
#: by 1e-3 moves PlantNet's output by 7e-5 .. 8e-5 of its scale, a tenfold eps in a BatchNorm with running variance
#: ~1 by 3e-5 (tests/check/test_check_power.py); a change smaller than ~4e-6 of the output cannot be told from the
#: rounding of a deep network in float32. float64: float32's value times the ratio of the two epsilons (x5 up).
#: float16 and bfloat16 are not measured here (onnxruntime's CPU provider runs few float16 kernels): 1e-2 and 8e-2
#: are about ten units in the last place of each, a starting point to pass --scale-tol over when measured.
CHECK: dict[torch.dtype, CheckTolerance] = {
    torch.float64: CheckTolerance(atol=0.0, rtol=0.0, scaled=1e-13),
    torch.float32: CheckTolerance(atol=0.0, rtol=0.0, scaled=2e-5),
    torch.float16: CheckTolerance(atol=0.0, rtol=0.0, scaled=1e-2),
    torch.bfloat16: CheckTolerance(atol=0.0, rtol=0.0, scaled=8e-2),
}


#: localization (normfold.check.localize) when the check's tolerance has no ``scaled`` part: a layer's value
#: matches the reference's when ``max |a - b| <= LOCALIZE * max |ref|``
LOCALIZE: float = 1e-4


def check_tolerance(dtype: torch.dtype) -> CheckTolerance:
    """normfold.check's default tolerance for a model running in ``dtype``."""
    return CHECK.get(dtype, CHECK[torch.float32])


#: forward folding into a layer that pads with zeros needs every BatchNorm shift t = beta - mean * s to be 0;
#: t counts as 0 within this many units in the last place of the BatchNorm's dtype, relative to
#: |beta| + |mean * s| (beta set to mean * s in float32 leaves t at rounding level, and the fold then changes
#: the border outputs by that rounding only)
ZERO_SHIFT_ULPS: float = 4.0
