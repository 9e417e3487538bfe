"""Every numerical tolerance normfold uses, in one place.

A fold is exact in real arithmetic; what remains is rounding. Folding in
float64 and casting back costs at most one rounding of each weight, so the
folded model differs from the original by a few ulps of the activations,
amplified by depth. :data:`POLICY` is the one rule that says whether a
rewritten model still computes the original's outputs, per dtype, relative
to each output's scale, each number measured (its basis is written beside
it); :func:`normfold.verify` applies it, and so do the commands, the checker,
:mod:`normfold.testing` and the tests. The other tolerances here answer
other questions (a recalibration against a float64 reference, an approximate
LayerNorm swap) and say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Tolerance", "POLICY", "policy", "comparison_dtype", "EXACT", "resolve_tolerance", "for_dtype", "check_tolerance", "FOLD", "ZOO",
           "RECALIBRATE", "MEAN_FREE_RATIO", "LOCALIZE", "ZERO_SHIFT_ULPS"]


@dataclass(frozen=True)
class Tolerance:
    """Pass when ``|a - b| <= atol + rtol * |ref| + scaled * max|ref|`` for every element.

    ``max|ref|`` is the *scale* of the output: the largest finite magnitude of
    the reference tensor. normfold's own policy (:data:`POLICY`) uses
    ``scaled`` alone, so that one number fits outputs of magnitude 0.05 and
    5e8 alike; ``atol`` and ``rtol`` (``torch.allclose`` semantics) are there
    for tolerances that answer a different question (:data:`RECALIBRATE`)
    and for users who ask for them
    (``--atol``/``--rtol``, which replace the policy).
    """

    atol: float = 0.0
    rtol: float = 0.0
    scaled: float = 0.0

    def bound(self, reference: torch.Tensor) -> torch.Tensor:
        """The largest ``|a - b|`` allowed at each element of ``reference`` (float64)."""
        r = reference.detach().double()
        finite = r[torch.isfinite(r)]
        scale = finite.abs().max().item() if finite.numel() else 0.0
        return self.atol + self.scaled * scale + self.rtol * r.abs().nan_to_num(posinf=0.0, neginf=0.0)

    def allclose(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Whether ``a`` matches the reference ``b`` (same shape, every element within :meth:`bound`)."""
        if a.shape != b.shape:
            return False
        if b.numel() == 0:
            return True
        return bool(((a.double() - b.double()).abs() <= self.bound(b)).all())

    def describe(self, scale: float | None = None) -> str:
        """The rule in words: ``|a - b| <= 2e-05 x scale 4.87`` (``x max|ref|`` when no scale is given)."""
        parts = []
        if self.atol:
            parts.append(f"{self.atol:g}")
        if self.rtol:
            parts.append(f"{self.rtol:g} x |ref|")
        if self.scaled:
            parts.append(f"{self.scaled:g} x " + (f"scale {scale:.3g}" if scale is not None else "max|ref|"))
        return "|a - b| <= " + (" + ".join(parts) if parts else "0")

    def validate(self) -> "Tolerance":
        """``self``, after checking every part is a finite number >= 0 (``ValueError`` otherwise)."""
        for label, value in (("atol", self.atol), ("rtol", self.rtol), ("scale_tol", self.scaled)):
            if not (value >= 0) or value == float("inf"):
                raise ValueError(f"{label} {value} must be a finite number >= 0")
        return self


def resolve_tolerance(*, atol: float | None = None, rtol: float | None = None,
                      scale_tol: float | None = None) -> Tolerance | None:
    """The explicit rule the three numbers give, or ``None`` (the policy) when none is given.

    Any number given replaces the policy for every output; the parts not given
    are 0. Raises :class:`~normfold.errors.UsageError` for a negative or non-finite number.
    """
    if atol is None and rtol is None and scale_tol is None:
        return None
    tol = Tolerance(atol=float(atol or 0.0), rtol=float(rtol or 0.0), scaled=float(scale_tol or 0.0))
    try:
        return tol.validate()
    except ValueError as exc:
        from normfold.errors import UsageError

        raise UsageError(str(exc)) from None


#: fold_batchnorm on whole float32 architectures (tests/zoo/test_fold_zoo.py): max |folded - original| over
#: max |original| per output tensor (``rtol``; ``atol`` unused). Random weights and randomized BatchNorm
#: statistics; the one rounding per folded weight, amplified by depth, measured at most 2.1e-6 over every
#: torchvision classification model and 30 timm models (wide_resnet101_2, mobilenetv2_050): 5x headroom.
#: Read as a fraction of the output's scale (``.rtol``) by tests/zoo/test_fold_zoo.py and benchmarks/fold.py: a
#: regression alarm for the fold engine on float32, stricter than the verdict (:data:`POLICY`), not a second verdict.
ZOO = Tolerance(atol=0.0, rtol=1e-5)


#: recalibrated BatchNorm statistics against a float64 reference over the same batches (normfold.recalibrate):
#: per-batch statistics are reduced in the activation's dtype (float32: relative error ~1e-7, measured
#: 6e-8 on the tests' models) and combined in float64, so only that rounding remains, amplified by the
#: layers above. Also the bound between a 2-process all-reduced run and one process over the same batches.
RECALIBRATE: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-9),
    torch.float32: Tolerance(atol=2e-5, rtol=2e-4),
}


#: largest |mean| / rms (over the normalized axis) of a LayerNorm input that layernorm_to_rmsnorm still counts
#: as mean-free when it checks an exact swap on the example inputs (float32 rounding of centred sums)
MEAN_FREE_RATIO: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}


#: normfold's one verification policy: an output of the candidate matches the reference's when
#: ``max |a - b| <= POLICY[dtype].scaled * max|ref|`` (per output tensor; ``max|ref|`` is its *scale*). Every
#: comparison uses it: fold / convert / recalibrate before writing, normfold.check's stages and probes,
#: :func:`normfold.verify`, :mod:`normfold.testing` and the project's tests. ``dtype`` is the comparison dtype:
#: the lower precision of the two outputs' dtypes (:func:`comparison_dtype`; an fp16 ONNX model checked against
#: its fp32 original is judged by the float16 rule).
#:
#: Why relative to the scale: over the torchvision zoo with random weights the outputs' magnitudes range from 0.04
#: (alexnet) to 1e5 (resnet152) and 3e8 (inception_v3); rounding grows with the magnitude, so no absolute atol fits
#: both ends; an elementwise rule (the old atol 1e-4 + rtol 1e-3) refused resnet50's correct fold (max abs error
#: 2.1e-3 on logits near 0) and any correct fold of a classifier whose head is scaled by 1000.
#:
#: Every number is measured (random weights, BatchNorm statistics and affine parameters randomized, inputs
#: N(0.5, 2^2)); "correct" is the largest error of a correct rewrite, "1%" what multiplying one layer's output by
#: 1.01 (a forward hook) does to the model's output, both as a fraction of the output's scale:
#:
#: float32 = 2e-5. Correct: at most 4.0e-6 over every torchvision classification model folded, exported and run in
#:   onnxruntime (swin_v2_b; ResNets, EfficientNets, RegNets 3e-7 .. 2e-6; tests/zoo/test_check_zoo.py), and
#:   timm regnetz_b16 at 224x224, 4 seeds: 1.0e-6 .. 1.9e-6 (the old elementwise rule refused it), resnet50 5.7e-7.
#:   Through the CLI (benchmarks/false_alarms.py: fold and convert --to frozen, 112 torchvision and timm models, heads
#:   as built and x1000, 896 runs): at most 3.3e-6 (timm selecsls42b), smallest margin 6.1x.
#:   1%: 1e-2 at the last layer, >= 4e-4 at the inner layers of the models below: 20x above the bound; the rule still
#:   sees one conv weight off by 1e-3 (7e-5 of the scale) and a tenfold BatchNorm eps (3e-5;
#:   tests/check/test_check_power.py). A change below ~4e-6 of the output cannot be told from float32 rounding.
#: float64 = 1e-13. Correct: folds of resnet50 (224x224) 1.4e-15, resnet18 1.6e-15, regnetz_b16 3.0e-15: 33x headroom.
#:   1%: 1e-2 at the last layer.
#: The low-precision numbers come from resnet18, resnet50, regnetz_b16, efficientnet_b0, mobilenet_v3_large and
#: regnet_y_400mf at 96x96 (benchmarks/false_alarms.py --dtypes) with the model cast to the dtype, and from PlantNet
#: (tests/check/_models.py); "correct" covers the fold in the dtype and the model in the dtype against its float32
#: original (a mixed pair, judged by the lower precision):
#: float16 = 5e-3. Correct: at most 2.5e-3 (regnetz_b16: 2.4e-3 folded, 2.5e-3 against float32; every other model
#:   <= 1.0e-3): 2x headroom. 1%: 9.7e-3 .. 1.0e-2 at the last layer (caught, 2x), 4e-4 .. 1.2e-2 at inner layers
#:   (caught where it moves the output by more than 0.5% of its scale).
#: bfloat16 = 4e-2. Correct: at most 2.3e-2 (regnetz_b16 against float32; folded 1.8e-2; resnet50 8.3e-3, the others
#:   <= 7e-3): 1.7x headroom. bfloat16 keeps 8 significant bits, so one unit in the last place of the largest
#:   output is 0.4% .. 0.8% of the scale, and a correct rewrite of a deep network moves it by 1 .. 3 such units:
#:   a 1% change in one layer (measured 9e-3 .. 1.3e-2 at the last layer, 3.5e-3 .. 1.7e-2 inside) is within the
#:   rounding of a correct bfloat16 rewrite and cannot be told from it by any bound on the outputs. What the rule
#:   catches is measured instead: the last layer off by 5% (5e-2; the old 8e-2 let it pass) or more.
POLICY: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(scaled=1e-13),
    torch.float32: Tolerance(scaled=2e-5),
    torch.float16: Tolerance(scaled=5e-3),
    torch.bfloat16: Tolerance(scaled=4e-2),
}

#: comparison dtypes from the most precise to the least (float16 before bfloat16: 11 significant bits against 8)
_PRECISION_ORDER = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

#: integer and bool outputs (token ids, masks) must be equal
EXACT = Tolerance()


def comparison_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype whose rule judges outputs of dtypes ``a`` and ``b``: the lower precision of the two.

    A non-floating dtype on either side is returned as is (such outputs compare exactly); a floating dtype
    the policy does not list (float8, complex) counts as float32's neighbour in precision: its own.
    """
    if not (a.is_floating_point and b.is_floating_point):
        return a if not a.is_floating_point else b
    rank = {d: i for i, d in enumerate(_PRECISION_ORDER)}
    return max((a, b), key=lambda d: rank.get(d, len(_PRECISION_ORDER)))


def policy(dtype: torch.dtype) -> Tolerance:
    """The tolerance of :data:`POLICY` for outputs compared in ``dtype`` (exact for integer and bool outputs)."""
    if not dtype.is_floating_point:
        return EXACT
    return POLICY.get(dtype, POLICY[torch.bfloat16] if dtype.itemsize <= 2 else POLICY[torch.float32])


#: the names older code and tests import; they are the policy, not a second rule
for_dtype = policy
check_tolerance = policy
FOLD = POLICY


#: localization (normfold.check.localize) when the check's tolerance has no ``scaled`` part: a layer's value
#: matches the reference's when ``max |a - b| <= LOCALIZE * max |ref|``
LOCALIZE: float = 1e-4


#: forward folding into a layer that pads with zeros needs every BatchNorm shift t = beta - mean * s to be 0;
#: t counts as 0 within this many units in the last place of the BatchNorm's dtype, relative to
#: |beta| + |mean * s| (beta set to mean * s in float32 leaves t at rounding level, and the fold then changes
#: the border outputs by that rounding only)
ZERO_SHIFT_ULPS: float = 4.0
