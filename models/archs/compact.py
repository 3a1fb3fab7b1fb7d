"""``compact``: the CTSR structure sized for CPUs.

Same stages as the paper's SD-2.1 student, with a convolutional "latent" at LR resolution:

* encode   = encoder (image → latent, the VAE-encoder's role) + one-step body (the UNet's role):
  ``z0 = z + body(z)``;
* velocity = a separate residual network on ``z0`` (the stage-2 adapter's role);
* decode   = residual blocks + an upsampler (the VAE decoder's role). ``upsampler:
  "pixelshuffle"`` (the first releases): conv + ×2 pixel shuffle steps at rising resolution and
  an RGB conv at full size, where most of the decoder's cost goes. ``"direct"`` (Real-ESRGAN's
  SRVGGNetCompact): one LR-size conv to ``3·scale²`` channels and a single pixel shuffle, so no
  convolution runs above LR size.

``lr_skip`` adds the bicubic-upscaled input to the output, so the network only learns the
residual (the fidelity end is mostly the input plus detail). The decoder then needs the input:
like the rrdb branch's, the latent carries it, ``z0 = [z, lr]``, and the velocity moves only ``z``.

``path_film`` lets the decoder know where on the path it decodes (with only its input moving,
the LR-skip release's alpha = 1 kept a realness-like NIQE, 7.6 against the fidelity teacher's
10.3). The latent carries one more channel, the path position:
0 in ``z0``, 1 in ``v``, hence alpha in ``z_alpha`` (still ``z0 + alpha * v``). The decoder
scales and shifts its features per channel by it (FiLM: ``h * (1 + p * scale) + p * shift``,
after its first conv, each residual block and its last conv), with both vectors zero when built:
a new ``path_film`` model decodes exactly like the same weights without it. (Tried on the
bundled release and not adopted; its card has the numbers.)

``path_delta`` gives the fidelity end a decoder of its own without a second network: every
decoder convolution ``W`` gets a parallel convolution ``D`` (zero when built) whose output is
scaled by the path position, ``W h + p · D h``. The decoder at alpha is then ``W + alpha · D``:
the realness end decodes with ``W`` exactly and the fidelity end with ``W + D``, so training the
fidelity end (``D``, the velocity) cannot move the realness end, which a shared decoder did.
Needs the ``direct`` upsampler (every decoder convolution at LR size, where ``p`` lives).
(Tried on the bundled release and not adopted: the fidelity end came nearer its teacher, the
untrained middle of the path fell behind the teachers' mixes; its card has the numbers.)

``path_bend`` trains the middle of the path against two fixed ends: one more zero-init branch
``B`` beside every decoder convolution, scaled by ``p · (1 - p)``, so the decoder at alpha is
``W + alpha · D + alpha · (1 - alpha) · B``. ``B`` cannot move alpha = 0 or alpha = 1, so with
``D`` and the velocity frozen a run trains only what lies between two ends that stay as they are.
(Tried on a ``path_delta`` run and not adopted: alpha = .25 and .5 gained, alpha = .5 still lost to
the teachers' pixel blend; the card has the numbers.)

No normalisation layers, so a tile's output equals the matching crop of the whole image's
output once the tile is wider than the receptive field (the tiling tests rely on this).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import StudentConfig, parse_arch
from ..errors import ConfigError
from ..registry import ARCH_REGISTRY
from ..resample import bicubic_upscale
from ..student import CTSRStudent
from .blocks import PixelShuffleUpsampler, ResidualBlock, conv_trunk

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
    upsampler: str = "pixelshuffle"  # or "direct" (see the module docstring)
    lr_skip: bool = False
    path_film: bool = False  # the decoder modulated by the path position (see the module docstring)
    path_delta: bool = False  # each decoder conv plus a path-scaled one (see the module docstring)
    path_bend: bool = False  # and one scaled by p(1 - p), zero at both ends (see the module docstring)

    def __post_init__(self) -> None:
        for f in fields(self):  # by declared type (the annotations are strings here)
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, not {value!r}")
            least = 0 if "blocks" in f.name else 1
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.upsampler not in ("pixelshuffle", "direct"):
            raise ValueError(f"upsampler must be 'pixelshuffle' or 'direct', not {self.upsampler!r}")
        for option in ("path_delta", "path_bend"):
            if getattr(self, option) and self.upsampler != "direct":
                raise ValueError(f"{option} needs upsampler 'direct' (every decoder conv at LR size)")

    @property
    def path_position(self) -> bool:
        """Whether the latent carries the path position (an extra channel after ``z``)."""
        return self.path_film or self.path_delta or self.path_bend


class PathModulation(nn.Module):
    """Per-channel scale and shift of decoder features by the path position ``p`` ([B, 1, H, W]):
    ``h * (1 + p * scale[k]) + p * shift[k]`` at point ``k``; zero when built (no effect).

    The stored vectors are multiplied by :attr:`GAIN` when used (StyleGAN's equalised learning
    rate): Adam moves a parameter by about the learning rate per step whatever its gradient, which
    would leave gains that start at zero near zero for a whole CPU run (0.03 after 250 steps at
    lr 1e-4: no measurable effect), while the convolutions around them are already trained.
    """

    GAIN = 30.0

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.scale = nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in widths)
        self.shift = nn.ParameterList(nn.Parameter(torch.zeros(w)) for w in widths)

    def forward(self, h: torch.Tensor, position: torch.Tensor, k: int) -> torch.Tensor:
        scale = (self.GAIN * self.scale[k]).to(h.dtype).view(1, -1, 1, 1)
        shift = (self.GAIN * self.shift[k]).to(h.dtype).view(1, -1, 1, 1)
        out: torch.Tensor = h * (1 + position * scale) + position * shift
        return out


def zero_conv_like(conv: nn.Conv2d) -> nn.Conv2d:
    """A 3×3 convolution shaped like ``conv`` (every compact conv is one) with zero weight and
    bias: a branch that starts inert."""
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    branch = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
    assert branch.bias is not None
    nn.init.zeros_(branch.weight)
    nn.init.zeros_(branch.bias)
    return branch


@ARCH_REGISTRY.register("compact")
class CompactStudent(CTSRStudent):
    family = "compact"
    cacheable_latent = True

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(config)
        self.arch = a = parse_arch(CompactArch, config.arch, self.family)
        f, latent, up = a.features, a.latent_channels, a.upsample_features
        self.encoder = conv_trunk(3, f, a.encoder_blocks, latent)
        self.body = conv_trunk(latent, f, a.body_blocks, latent)
        self.velocity_net = conv_trunk(latent, f, a.velocity_blocks, latent)
        if a.upsampler == "direct":
            head: list[nn.Module] = [nn.Conv2d(up, 3 * config.scale**2, 3, padding=1), nn.PixelShuffle(config.scale)]
        else:
            head = [PixelShuffleUpsampler(up, config.scale), nn.Conv2d(up, 3, 3, padding=1)]
        trunk = conv_trunk(latent, f, a.decoder_blocks, up)
        self.decoder = nn.Sequential(trunk, nn.LeakyReLU(0.2, inplace=True), *head)
        if a.lr_skip:  # a new model starts as bicubic upscaling, and learns the residual from there
            last = head[0] if a.upsampler == "direct" else head[-1]
            assert isinstance(last, nn.Conv2d) and last.bias is not None
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if a.path_film:
            self.film: PathModulation = PathModulation([f] * (a.decoder_blocks + 1) + [up])
        convs = [m for m in self.decoder.modules() if isinstance(m, nn.Conv2d)]  # in _decode_on_path's order
        if a.path_delta:
            self.delta = nn.ModuleList(zero_conv_like(c) for c in convs)
        if a.path_bend:
            self.bend = nn.ModuleList(zero_conv_like(c) for c in convs)
        #: channels the latent carries after ``z``: the input (lr_skip), the path position
        self.extra_channels = 3 * a.lr_skip + a.path_position

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.encoder(lr * 2 - 1)
        z0 = z + self.body(z)
        parts = [z0]
        if self.arch.lr_skip:
            parts.append(lr.to(z0.dtype))
        if self.arch.path_position:
            parts.append(z0.new_zeros(z0.shape[0], 1, *z0.shape[2:]))  # path position 0: the realness end
        return torch.cat(parts, dim=1) if len(parts) > 1 else z0

    def velocity(self, z0: torch.Tensor) -> torch.Tensor:
        v: torch.Tensor = self.velocity_net(z0[:, : self.arch.latent_channels])
        if not self.extra_channels:
            return v
        parts = [v, torch.zeros_like(z0[:, v.shape[1] : v.shape[1] + 3 * self.arch.lr_skip])]
        if self.arch.path_position:
            parts.append(torch.ones_like(z0[:, -1:]))  # z0 + alpha * v carries alpha itself
        return torch.cat(parts, dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        c = self.arch.latent_channels
        x = self._decode_on_path(z[:, :c], z[:, -1:]) if self.arch.path_position else self.decoder(z[:, :c])
        if not self.arch.lr_skip:
            return (x + 1) / 2
        lr = z[:, c : c + 3]
        return x / 2 + bicubic_upscale(lr, self.scale)

    def _decode_on_path(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``self.decoder`` told the path position: :class:`PathModulation` after its trunk's first
        conv, blocks and last conv (``path_film``), branches beside every conv scaled by the
        position (``path_delta``) and by ``p(1 - p)`` (``path_bend``)."""
        trunk = self.decoder[0]
        assert isinstance(trunk, nn.Sequential)
        branches: list[tuple[Iterator[nn.Module], torch.Tensor]] = []
        if self.arch.path_delta:
            branches.append((iter(self.delta), position))
        if self.arch.path_bend:
            branches.append((iter(self.bend), position * (1 - position)))

        def conv(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = layer(h)
            for modules, scale in branches:
                out = out + scale * next(modules)(h)
            return out

        def film(h: torch.Tensor, k: int) -> torch.Tensor:
            return self.film(h, position, k) if self.arch.path_film else h

        h = film(trunk[1](conv(trunk[0], x)), 0)
        blocks: list[nn.Module] = list(trunk)[2:-1]
        for k, block in enumerate(blocks, start=1):
            assert isinstance(block, ResidualBlock)
            h = film(h + conv(block.conv2, block.act(conv(block.conv1, h))), k)
        h = film(conv(trunk[-1], h), len(trunk) - 2)
        h = self.decoder[1](h)  # the activation before the head
        out: torch.Tensor = self.decoder[3:](conv(self.decoder[2], h))  # head conv(s), pixel shuffle
        return out

    def trainable_parameters(self, stage: str, decoder: bool = False, encoder: bool = False) -> list[nn.Parameter]:
        modules: dict[str, list[nn.Module]] = {
            "stage1": [self.encoder, self.body, self.decoder],
            "stage2": [
                *([self.encoder, self.body] if encoder else []),
                self.velocity_net,
                *([self.film] if self.arch.path_film else []),  # alpha's own parts of the decoder
                *([self.delta] if self.arch.path_delta else []),
                *([self.bend] if self.arch.path_bend else []),
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
