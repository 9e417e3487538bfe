"""Where the ExportedProgram fold used to live; it is :mod:`normfold.passes.fold.program_pass`.

Kept so that ``from normfold.passes.fold_exported import fold_exported_program,
program_inputs`` keeps working; read docs/architecture.md for the layout.
"""

from __future__ import annotations

from normfold.passes.fold import ExportedPassResult, FoldBatchNormProgram, fold_exported_program, program_inputs

__all__ = ["FoldExportedProgram", "ExportedPassResult", "fold_exported_program", "program_inputs"]

#: the ExportedProgram pass under its old name
FoldExportedProgram = FoldBatchNormProgram
