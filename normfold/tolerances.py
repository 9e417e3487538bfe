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

__all__ = ["Tolerance", "for_dtype", "FOLD", "RECALIBRATE", "LAYERNORM_TO_RMSNORM", "MEAN_FREE_RATIO"]


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
#: LayerNorm (measured on the tests' models: see tests/passes/test_layernorm_to_rmsnorm.py).
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


#: forward folding into a layer that pads with zeros needs every BatchNorm shift t = beta - mean * s to be 0;
#: t counts as 0 within this many units in the last place of the BatchNorm's dtype, relative to
#: |beta| + |mean * s| (beta set to mean * s in float32 leaves t at rounding level, and the fold then changes
#: the border outputs by that rounding only)
ZERO_SHIFT_ULPS: float = 4.0
