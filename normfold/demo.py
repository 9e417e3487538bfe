"""The built-in demo model: a small CNN with every pattern the fold has to get right.

It has Conv2d -> BatchNorm2d (with and without conv bias, grouped),
ConvTranspose2d -> BatchNorm2d (grouped), a residual branch whose conv output
has two users (must be left alone), a BatchNorm after an activation (cannot
fold backward; folds forward into the head's Linear through the average pool
and flatten), and a Linear -> BatchNorm1d head on a 2-D tensor. BatchNorm
statistics and affine parameters are random and far from the identity, so a
wrong fold cannot hide.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DemoNet", "build_demo_model", "DEMO_INPUT_SHAPE"]

DEMO_INPUT_SHAPE = (4, 3, 32, 32)


class DemoNet(nn.Module):
    """A small image classifier with foldable and deliberately unfoldable BatchNorms."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block_conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2, bias=False)
        self.block_bn = nn.BatchNorm2d(32)
        self.up = nn.ConvTranspose2d(32, 32, 2, stride=2, groups=4)
        self.up_bn = nn.BatchNorm2d(32)
        self.skip_conv = nn.Conv2d(16, 32, 1)
        self.skip_bn = nn.BatchNorm2d(32)  # skip_conv's output is also added to the residual: not foldable
        self.post_act_bn = nn.BatchNorm2d(32)  # after a ReLU: only forward folding (into fc) can remove it
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 64)
        self.fc_bn = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.up_bn(self.up(torch.relu(self.block_bn(self.block_conv(x)))))
        s = self.skip_conv(x)
        x = torch.relu(y + self.skip_bn(s) + s)
        x = self.post_act_bn(x)
        x = self.pool(x).flatten(1)
        x = torch.relu(self.fc_bn(self.fc(x)))
        return self.head(x)


def build_demo_model(seed: int = 0) -> DemoNet:
    """A DemoNet in eval with random, non-trivial BatchNorm statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DemoNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return model.eval()
