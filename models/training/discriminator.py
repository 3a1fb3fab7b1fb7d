"""The adversarial critic: a U-Net discriminator with spectral normalisation (Real-ESRGAN's design).

A U-Net judges every pixel (its decoder returns a realness logit per output pixel, with global
context from the encoder), so it can say *where* an image looks synthetic; spectral normalisation
keeps it Lipschitz-bounded, which is what lets it train from scratch beside a generator that is
already good. Its intermediate features double as a learned perceptual space: the
feature-matching loss compares images there, standing in for the VGG perceptual loss whose weights
cannot be downloaded here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

SLOPE = 0.2


class UNetDiscriminatorSN(nn.Module):
    """Three stride-2 stages down, three bilinear stages up with skips, two more convs, a logit map.

    ``forward`` returns ``(logits [B,1,H,W], features)``, ``features`` being the encoder and
    decoder activations used for feature matching. Sides that are not multiples of 8 are
    replicate-padded for the three stride-2 stages and the logits cropped back.
    """

    def __init__(self, in_channels: int = 3, features: int = 64) -> None:
        super().__init__()
        f = features
        self.conv0 = nn.Conv2d(in_channels, f, 3, padding=1)
        self.down = nn.ModuleList(
            spectral_norm(nn.Conv2d(f * 2**i, f * 2 ** (i + 1), 4, stride=2, padding=1, bias=False)) for i in range(3)
        )
        self.up = nn.ModuleList(
            spectral_norm(nn.Conv2d(f * 2 ** (i + 1), f * 2**i, 3, padding=1, bias=False)) for i in (2, 1, 0)
        )
        self.refine = nn.Sequential(
            spectral_norm(nn.Conv2d(f, f, 3, padding=1, bias=False)),
            nn.LeakyReLU(SLOPE, inplace=True),
            spectral_norm(nn.Conv2d(f, f, 3, padding=1, bias=False)),
            nn.LeakyReLU(SLOPE, inplace=True),
        )
        self.head = nn.Conv2d(f, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h_in, w_in = x.shape[-2:]
        if h_in % 8 or w_in % 8:
            x = F.pad(x, (0, -w_in % 8, 0, -h_in % 8), mode="replicate")
        skips = [F.leaky_relu(self.conv0(x * 2 - 1), SLOPE)]
        for conv in self.down:
            skips.append(F.leaky_relu(conv(skips[-1]), SLOPE))
        h = skips.pop()
        features = [*skips[1:], h]
        for conv in self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False)
            h = F.leaky_relu(conv(h), SLOPE) + skips.pop()
            features.append(h)
        return self.head(self.refine(h))[..., :h_in, :w_in], features


def generator_adversarial(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample non-saturating GAN loss of the generator (Real-ESRGAN's vanilla GAN): ``[B]``."""
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none").flatten(1).mean(1)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    return real + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def feature_matching(fake: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample L1 between the critic's features of two images, averaged over layers: ``[B]``."""
    terms = [(a - b.detach()).abs().flatten(1).mean(1) for a, b in zip(fake, target, strict=True)]
    return torch.stack(terms).mean(0)
