"""The BatchNorm fold engine: one package, imports pointing one way (see docs/architecture.md).

Layers, lowest first (a module imports only from the ones above it):

* :mod:`~normfold.passes.fold.refusal` — :class:`Refusal`, the typed "no" every step returns;
* :mod:`~normfold.passes.fold.arithmetic` — the weight arithmetic (into output channels, into input
  channels, cast-or-refuse), written once for both IRs;
* :mod:`~normfold.passes.fold.rules` — facts about layers and ops both readers share (activations,
  ``Conv2dSame``, a module's eligibility, pools and padding);
* :mod:`~normfold.passes.fold.flow` — the channel-flow analysis (backward and forward walks);
* :mod:`~normfold.passes.fold.reader` — the readers' shared base; :mod:`~normfold.passes.fold.fx_reader`
  (torch.fx / nn.Module) and :mod:`~normfold.passes.fold.aten_reader` (ATen / ExportedProgram);
* :mod:`~normfold.passes.fold.program_pass` — the ExportedProgram pass;
* :mod:`~normfold.passes.fold.module_pass` — the nn.Module pass (uses the program pass for models
  torch.fx cannot trace);
* this file — :func:`fold_batchnorm`, which composes the passes with :class:`~normfold.passes.base.PassManager`,
  and, on request, :class:`~normfold.passes.merge_branches.MergeBranches` after the folds.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.export import ExportedProgram

from normfold.passes.base import Pass, PassManager, PassResult
from normfold.passes.fold.arithmetic import fold_into_output_channels
from normfold.passes.fold.module_pass import FoldBatchNormModules
from normfold.passes.fold.program_pass import ExportedPassResult, FoldBatchNormProgram, fold_exported_program, \
    program_inputs
from normfold.passes.fold.refusal import Refusal
from normfold.passes.fold.rules import producer_problem
from normfold.passes.base import Change, Skip
from normfold.passes.merge_branches import PASS_NAME as MERGE_PASS_NAME, MergeBranches
from normfold.passes.merge_program import merge_program
from normfold.passes.weight_standardization import BakeWeightStandardization, is_weight_standardized_conv

__all__ = ["fold_batchnorm", "fold_passes", "FoldBatchNormModules", "FoldBatchNormProgram", "ExportedPassResult",
           "fold_exported_program", "program_inputs", "Refusal", "producer_problem", "fold_into_output_channels"]


def fold_passes(*, example_inputs: Any = None, forward: bool = True,
                weight_standardization: bool = True, merge_branches: bool = False) -> list[Pass]:
    """The passes :func:`fold_batchnorm` runs on an nn.Module, in order.

    1. :class:`~normfold.passes.weight_standardization.BakeWeightStandardization`
       (``weight_standardization``): timm StdConv2d / ScaledStdConv2d become plain
       convs, so the BatchNorm after them can fold too;
    2. :class:`FoldBatchNormModules`: backward (directly, and with ``forward``
       through channel-wise ops) and forward folds;
    3. :class:`~normfold.passes.merge_branches.MergeBranches` (``merge_branches``):
       the parallel branches of re-parameterizable blocks (RepVGG, MobileOne, ...),
       their conv+BN pairs now folded, become one conv each.
    """
    passes: list[Pass] = []
    if weight_standardization:
        passes.append(BakeWeightStandardization())
    passes.append(FoldBatchNormModules(example_inputs=example_inputs, infer_inputs=True, through_ops=forward,
                                       forward=forward))
    if merge_branches:
        # after the folds: a branch is then a conv with a bias, a lone BatchNorm (identity), a pool or a
        # scale, which is what the merge algebra reads; it costs one more trace, so it is asked for
        passes.append(MergeBranches(example_inputs=example_inputs))
    return passes


def _without_merged(skipped: list[Skip], changes: list[Change]) -> list[Skip]:
    """The folds' skips less those of BatchNorms the merge then took.

    A BatchNorm the folds left (an identity branch, a BatchNorm after an add) and the merge took
    into a merged conv is not "left alone".
    """
    merged = {p for c in changes if c.pass_name == MERGE_PASS_NAME for p in c.paths}
    return [s for s in skipped if not (s.pass_name != MERGE_PASS_NAME and s.paths and set(s.paths) <= merged)]


def fold_batchnorm(model: nn.Module | ExportedProgram, *, inplace: bool = False, example_inputs: Any = None,
                   forward: bool = True, weight_standardization: bool = True,
                   merge_branches: bool = False) -> PassResult:
    """Fold eval-mode BatchNorms into the Conv/ConvTranspose/Linear before them, or after them.

    ``example_inputs`` (a tensor or tuple of positional inputs) gives tensor
    ranks for Linear -> BatchNorm1d and lets torch.export trace models torch.fx
    cannot; when omitted, an input shape is inferred from the first layer if a
    step needs one. With ``forward`` (default), BatchNorms the direct fold
    leaves are folded through channel-wise ops (reshape, permute, pools, cat)
    into the layer before them, or forward into the layer after them; with
    ``weight_standardization`` (default), timm StdConv2d / ScaledStdConv2d are
    first baked into plain convs. With ``merge_branches``, the parallel
    conv / BatchNorm / identity / avg-pool / scale branches of re-parameterizable
    blocks are then merged into one conv each (:func:`normfold.merge_branches`;
    off by default because it traces the model once more). Given a
    ``torch.export.ExportedProgram``, folds it at the ATen level (the new program
    is ``result.program``) and, with ``merge_branches``, merges its branches there
    (:mod:`normfold.passes.merge_program`, the same algebra on ATen ops).

    Returns a :class:`PassResult`: ``changes`` name every fold, ``skipped``
    every BatchNorm left, with the reason. The math is in
    :mod:`normfold.passes.fold.arithmetic` and docs/architecture.md.
    """
    if isinstance(model, ExportedProgram):
        result = fold_exported_program(model, inplace=inplace, forward=forward,
                                       weight_standardization=weight_standardization)
        if merge_branches:
            # the folded program is already a new one (or the caller's, with inplace): merge it in place
            merged = merge_program(result.program, inplace=True)
            result = ExportedPassResult(
                module=merged.module, program=merged.program, changes=result.changes + merged.changes,
                skipped=_without_merged(result.skipped + merged.skipped, merged.changes),
                metrics={**result.metrics, **{f"{MERGE_PASS_NAME}.{k}": v for k, v in merged.metrics.items()
                                              if k != "graph_source"}})
        return result
    # the bake pass scans every module and parameter: run it only where there is something to bake
    bake = weight_standardization and any(is_weight_standardized_conv(m) for m in model.modules())
    result = PassManager(fold_passes(example_inputs=example_inputs, forward=forward,
                                     weight_standardization=bake, merge_branches=merge_branches))(
        model, inplace=inplace)
    if merge_branches:
        result.skipped = _without_merged(result.skipped, result.changes)
    # PassManager keys metrics by pass; which graph the folds were read from is the result's own fact
    source = result.metrics.get(f"{FoldBatchNormModules.name}.graph_source")
    if source is not None:
        result.metrics["graph_source"] = source
    return result
