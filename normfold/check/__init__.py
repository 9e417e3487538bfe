"""The equivalence checker: original eager, candidate eager and ONNX in onnxruntime, compared stage by stage.

``normfold.check(reference, candidate=..., onnx=..., inputs=...)`` runs it and
returns a :class:`CheckReport` (see :func:`normfold.check.checker.check`).
``normfold.check`` is both this package and that function: the package
module is callable, so ``nf.check(...)`` and ``import normfold.check.report``
both work.
"""

import sys
import types
from typing import Any

from normfold.check.checker import check
from normfold.check.report import CheckReport, CheckResult

__all__ = ["check", "CheckReport", "CheckResult"]

#: lets inspect.signature(normfold.check) and help() show the function's signature
__wrapped__ = check


class _CallablePackage(types.ModuleType):
    """The ``normfold.check`` package, callable as :func:`normfold.check.checker.check`."""

    def __call__(self, *args: Any, **kwargs: Any) -> CheckReport:
        return check(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
