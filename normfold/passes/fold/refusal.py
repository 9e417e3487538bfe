"""The typed "no" of the fold engine: :class:`Refusal`.

Every analysis step returns either what it found (a plan, a layer, a rule) or
a :class:`Refusal` that carries the sentence a user reads and, where there is
one, the graph node that blocks the fold (as onnxscript's ``MatchResult.fail``
does). A caller tests ``isinstance(x, Refusal)``; no step signals failure with
a bare string or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Refusal"]


@dataclass(frozen=True)
class Refusal:
    """Why a fold cannot be made: ``reason`` (a sentence naming the blocker) and the blocking ``node``, if any."""

    reason: str
    node: Any = None

    def __str__(self) -> str:
        return self.reason

    def prefixed(self, prefix: str) -> "Refusal":
        """The same refusal with ``prefix`` in front of the reason (e.g. ``"consumer "``)."""
        return Refusal(prefix + self.reason, self.node)

    def suffixed(self, suffix: str) -> "Refusal":
        """The same refusal with ``suffix`` after the reason (e.g. the layer it concerns)."""
        return Refusal(self.reason + suffix, self.node)
