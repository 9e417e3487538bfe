"""What a merged block becomes in the user's model (see :mod:`normfold.passes.merge_branches`).

Interim: the merged block stays the ``torch.fx.GraphModule`` that the merge wrote.
"""

from __future__ import annotations

import torch.fx
from torch import nn

__all__ = ["merged_block_module"]


def merged_block_module(gm: torch.fx.GraphModule, block: nn.Module | None = None) -> nn.Module:
    """The module that takes the merged block's place (for now the GraphModule itself)."""
    return gm
