"""Errors raised by normfold.

Every error a user can cause derives from :class:`NormfoldError` and its message
says what to do about it. The command line prints the message on one line and
exits with code 2 (:class:`UsageError`, :class:`ModelLoadError`,
:class:`InputError`) — never a traceback unless ``-v`` is given.
"""

from __future__ import annotations

__all__ = [
    "NormfoldError",
    "UsageError",
    "ModelLoadError",
    "InputError",
    "TraceError",
    "PassError",
    "ExportError",
]


class NormfoldError(Exception):
    """Base class of every error normfold raises on purpose."""

    #: exit code the command line returns for this error
    exit_code: int = 2


class UsageError(NormfoldError):
    """A flag, option or argument that cannot be used as given."""


class ModelLoadError(NormfoldError):
    """A model file that cannot be loaded (missing, corrupt, untrusted, wrong kind)."""


class InputError(NormfoldError):
    """Example inputs or data that do not fit the model."""


class TraceError(NormfoldError):
    """Neither torch.fx nor torch.export could recover the model's dataflow."""


class PassError(NormfoldError):
    """A pass raised; the message names the pass and the passes that ran before it."""

    exit_code = 1

    def __init__(self, message: str, *, pass_name: str, ran: list[str]) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.ran = list(ran)


class ExportError(NormfoldError):
    """The ONNX export failed or produced a model that does not load."""

    exit_code = 1
