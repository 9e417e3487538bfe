"""Small models for the checker's tests, with statistics that make planted bugs visible.

:class:`PlantNet` is a three-stage Conv -> BatchNorm -> ReLU network with a
Dropout before its head, built so that each planted bug moves the output by
far more than the checker's default tolerance, while a clean fold and export
stay far inside it. Its BatchNorms have randomized statistics; ``bn2``'s
running variances are small (1e-3 to 1e-2, as in trained networks' quiet
channels), where an ``eps`` ten times too large changes the normalization
by percents rather than by rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import randomize_bn_stats

INPUT_SHAPE = (4, 3, 16, 16)


class PlantNet(nn.Module):
    """conv1/bn1 -> conv2/bn2 -> conv3/bn3 (ReLU after each) -> pool -> dropout -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(self.drop(self.pool(x).flatten(1)))


def plant_net(seed: int = 0) -> PlantNet:
    """A PlantNet in eval with randomized BatchNorm statistics (small variances in bn2)."""
    torch.manual_seed(seed)
    model = PlantNet()
    randomize_bn_stats(model, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        model.bn2.running_var.copy_(torch.rand(24, generator=g) * 9e-3 + 1e-3)
    return model.eval()


def inputs(seed: int = 0, shape: tuple[int, ...] = INPUT_SHAPE) -> tuple[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2 + 0.5,)
