"""A few-thousand-parameter CNN for 8x8 inputs: the embedded default model (scikit-learn digits)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)


class SmallCNN(nn.Module):
    """Stem conv + BN + ReLU, one residual basic block, a stride-2 conv + BN + ReLU (8x8 -> 4x4),
    global average pooling, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.block_conv1 = _conv3x3(width, width)
        self.block_bn1 = nn.BatchNorm2d(width)
        self.block_conv2 = _conv3x3(width, width)
        self.block_bn2 = nn.BatchNorm2d(width)
        self.down = _conv3x3(width, width, stride=2)
        self.down_bn = nn.BatchNorm2d(width)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.block_bn1(self.block_conv1(x)))
        x = F.relu(x + self.block_bn2(self.block_conv2(out)))
        x = F.relu(self.down_bn(self.down(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))
