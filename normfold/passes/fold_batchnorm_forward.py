"""Where the forward / through-ops folds used to live; they are part of :mod:`normfold.passes.fold.module_pass`.

Kept so that old imports keep working; read docs/architecture.md for the layout.
"""

from __future__ import annotations

from normfold.passes.fold import FoldBatchNormModules

__all__ = ["FoldBatchNormForward"]

#: the module pass with every fold on (backward directly and through ops, then forward)
FoldBatchNormForward = FoldBatchNormModules
