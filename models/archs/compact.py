"""``compact``: the CTSR structure sized for CPUs.

Same stages as the paper's SD-2.1 student, with a convolutional "latent" at LR resolution:

* encode   = encoder (image → latent, the VAE-encoder's role) + one-step body (the UNet's role):
  ``z0 = z + body(z)``;
* velocity = a separate residual network on ``z0`` (the stage-2 adapter's role);
* decode   = residual blocks + pixel-shuffle ×scale (the VAE decoder's role) + an
  RGB head.

No normalisation layers, so a tile's output equals the matching crop of the whole image's
output once the tile is wider than the receptive field (the tiling tests rely on this).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import StudentConfig, parse_arch
from ..errors import ConfigError
from ..registry import ARCH_REGISTRY
from ..student import CTSRStudent
from .blocks import PixelShuffleUpsampler, conv_trunk

WEIGHTS_NAME = "model.safetensors"


@dataclass
class CompactArch:
    features: int = 64
    latent_channels: int = 32
    encoder_blocks: int = 2
    body_blocks: int = 6
    velocity_blocks: int = 3
    decoder_blocks: int = 2
    upsample_features: int = 48

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < (1 if "blocks" not in name else 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


@ARCH_REGISTRY.register("compact")
class CompactStudent(CTSRStudent):
    family = "compact"
    cacheable_latent = True

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(config)
        a = parse_arch(CompactArch, config.arch, self.family)
        f, latent = a.features, a.latent_channels
        self.encoder = conv_trunk(3, f, a.encoder_blocks, latent)
        self.body = conv_trunk(latent, f, a.body_blocks, latent)
        self.velocity_net = conv_trunk(latent, f, a.velocity_blocks, latent)
        self.decoder = nn.Sequential(
            conv_trunk(latent, f, a.decoder_blocks, a.upsample_features),
            nn.LeakyReLU(0.2, inplace=True),
            PixelShuffleUpsampler(a.upsample_features, config.scale),
            nn.Conv2d(a.upsample_features, 3, 3, padding=1),
        )

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.encoder(lr * 2 - 1)
        residual: torch.Tensor = self.body(z)
        return z + residual

    def velocity(self, z0: torch.Tensor) -> torch.Tensor:
        v: torch.Tensor = self.velocity_net(z0)
        return v

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.decoder(z)
        return (x + 1) / 2

    def trainable_parameters(self, stage: str, decoder: bool = False, encoder: bool = False) -> list[nn.Parameter]:
        modules = {
            "stage1": [self.encoder, self.body, self.decoder],
            "stage2": [
                *([self.encoder, self.body] if encoder else []),
                self.velocity_net,
                *([self.decoder] if decoder else []),
            ],
        }
        if stage not in modules:
            raise ConfigError(f"compact: unknown training stage {stage!r}")
        return [p for m in modules[stage] for p in m.parameters()]

    @classmethod
    def build(cls, config: StudentConfig, folder: Path | None = None, **options: Any) -> CompactStudent:
        if options:
            raise ConfigError(f"compact checkpoints take no load options (got {', '.join(sorted(options))})")
        return cls(config)

    def state_files(self) -> dict[str, dict[str, torch.Tensor]]:
        return {WEIGHTS_NAME: self.state_dict()}

    def load_state_files(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        self.load_state_dict(files[WEIGHTS_NAME], strict=True)
