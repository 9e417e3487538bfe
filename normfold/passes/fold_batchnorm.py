"""Where ``fold_batchnorm`` used to live; the fold engine is the package :mod:`normfold.passes.fold`.

Kept so that ``from normfold.passes.fold_batchnorm import fold_batchnorm`` (and
``producer_problem``, ``fold_into_output_channels``) keep working; read
docs/architecture.md for the layout.
"""

from __future__ import annotations

from typing import Any

from normfold.passes.fold import FoldBatchNormModules, fold_batchnorm, fold_into_output_channels, producer_problem

__all__ = ["FoldBatchNorm", "fold_batchnorm", "producer_problem", "fold_into_output_channels"]


class FoldBatchNorm(FoldBatchNormModules):
    """The direct fold only: each BatchNorm into the Conv/ConvTranspose/Linear that feeds it."""

    def __init__(self, *, example_inputs: Any = None, infer_inputs: bool = False) -> None:
        super().__init__(example_inputs=example_inputs, infer_inputs=infer_inputs, through_ops=False, forward=False)
