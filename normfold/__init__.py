"""normfold: rewrite the normalization layers of trained PyTorch models, and prove the result is the same model."""

from normfold.errors import NormfoldError
from normfold.passes.base import Change, Pass, PassManager, PassResult, Skip
from normfold.passes.batchnorm_to_groupnorm import batchnorm_to_groupnorm
from normfold.passes.fold_batchnorm import fold_batchnorm
from normfold.passes.merge_branches import merge_branches
from normfold.passes.fold_weight_norm import fold_weight_norm
from normfold.passes.weight_standardization import fold_weight_standardization
from normfold.passes.freeze_batchnorm import FrozenAffine, freeze_batchnorm, unfreeze_batchnorm
from normfold.passes.syncbn import from_syncbn, to_syncbn
from normfold.passes.layernorm_to_rmsnorm import RMSNormWithBias, layernorm_to_rmsnorm
from normfold.recalibrate import LayerShift, RecalibrationResult, recalibrate
from normfold.export import ExportResult, export_onnx
from normfold.check import CheckReport
from normfold.verify import Verification, verify
from normfold.io import load
from normfold.passes.piecewise import piecewise
from normfold.data import load_data
from normfold import pipeline  # rewrite -> verify -> write, as the commands do it: nf.pipeline.fold(model, x)
from normfold import check  # the package, callable as the checker: nf.check(reference, ...)

__version__ = "0.1.0"

__all__ = [
    "NormfoldError",
    "Change",
    "Skip",
    "Pass",
    "PassResult",
    "PassManager",
    "fold_batchnorm",
    "merge_branches",
    "batchnorm_to_groupnorm",
    "to_syncbn",
    "from_syncbn",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
    "FrozenAffine",
    "fold_weight_norm",
    "fold_weight_standardization",
    "layernorm_to_rmsnorm",
    "RMSNormWithBias",
    "recalibrate",
    "RecalibrationResult",
    "LayerShift",
    "export_onnx",
    "ExportResult",
    "check",
    "CheckReport",
    "verify",
    "Verification",
    "load",
    "piecewise",
    "load_data",
    "pipeline",
    "__version__",
]
