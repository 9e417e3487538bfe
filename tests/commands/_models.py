"""Small models and factories for the CLI gate tests: importable, so that pickled modules and --arch can name them."""

from __future__ import annotations

import sys

import torch
from torch import nn

from normfold.testing import randomize_batchnorm


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class Branchy(nn.Module):
    """One data-dependent ``if`` in the top-level forward: neither torch.fx nor torch.export traces it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = Block(8)
        self.b = Block(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.a(x) if x.mean() > 0 else self.b(x)
        return self.head(x.mean((2, 3)))


def branchy() -> Branchy:
    """A Branchy with randomized BatchNorm statistics (the factory a state_dict names with --arch)."""
    torch.manual_seed(0)
    return randomize_batchnorm(Branchy())


def nothing_to_fold() -> nn.Module:
    """Conv and ReLU, no BatchNorm: a fold of it changes nothing."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())


def interrupts() -> nn.Module:
    """A factory the user stops with Ctrl-C."""
    raise KeyboardInterrupt


class ExitsInForward(nn.Module):
    """A model whose forward calls sys.exit (third-party code does)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 7:
            sys.exit(1)
        return self.bn(self.conv(x))


class RaisesWithColour(nn.Module):
    """A candidate whose forward raises an error whose message carries terminal colour codes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("\x1b[96mThis is step 1/3\x1b[0m of something that failed")
