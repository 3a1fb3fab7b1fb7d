"""Small convolutional building blocks shared by the CPU-sized family."""

from __future__ import annotations

import torch
from torch import nn


class ResidualBlock(nn.Module):
    """conv-act-conv with an identity skip; no normalisation, so tiles equal the whole image."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual: torch.Tensor = self.conv2(self.act(self.conv1(x)))
        return x + residual


def conv_trunk(in_channels: int, features: int, blocks: int, out_channels: int) -> nn.Sequential:
    """conv in → act → ``blocks`` residual blocks → conv out: every compact stage has this shape."""
    return nn.Sequential(
        nn.Conv2d(in_channels, features, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
        *(ResidualBlock(features) for _ in range(blocks)),
        nn.Conv2d(features, out_channels, 3, padding=1),
    )


class PixelShuffleUpsampler(nn.Sequential):
    """×2 steps (or one ×3) of conv + pixel shuffle, as in ESRGAN/SwinIR light decoders."""

    def __init__(self, channels: int, scale: int) -> None:
        steps = {2: [2], 3: [3], 4: [2, 2], 8: [2, 2, 2]}[scale]
        layers: list[nn.Module] = []
        for factor in steps:
            layers += [
                nn.Conv2d(channels, channels * factor * factor, 3, padding=1),
                nn.PixelShuffle(factor),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        super().__init__(*layers)
