"""LPIPS (Zhang et al. 2018, "The unreasonable effectiveness of deep features"), VGG16 variant, v0.1.

Distance = Σ_layers mean_spatial( w_l · (f̂_l(x) − f̂_l(y))² ), where f̂_l are channel-normalised
VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of the ImageNet-scaled input,
and w_l are the learned non-negative 1×1 "linear" heads.

Pure torch, and nothing is downloaded: the user passes two files,

* the VGG16 backbone in torchvision's layout (``features.0.weight`` … ``features.28.bias``; a full
  ``vgg16`` state dict works, its classifier keys are ignored), and
* the heads in the ``lpips`` package's layout (``lin0.model.1.weight`` … ``lin4.model.1.weight``,
  i.e. its ``weights/v0.1/vgg.pth``).

Missing, unreadable or mismatched files raise :class:`~models.errors.ConfigError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ImageError
from .metrics import ImageLike, to_uint8

#: VGG16 ``features`` layout: conv widths, "M" = 2×2 max-pool (torchvision's configuration "D").
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
#: ``features`` index just after each tapped ReLU (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
TAPS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)
#: The lpips package's ScalingLayer: [-1, 1] input → ImageNet-normalised, in its own constants.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = int(item)
    return nn.Sequential(*layers)  # indices 0..29, the same as torchvision's vgg16().features[:30]


class _LinearHead(nn.Module):
    """One 1×1 conv to a single channel; ``model.1`` so the lpips package's keys load unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


class LPIPS(nn.Module):
    """LPIPS-VGG16 with randomly initialised weights until :func:`load_lpips` (or ``load_state_dict``) fills them."""

    shift: torch.Tensor  # buffers
    scale: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        for i, ch in enumerate(CHANNELS):
            self.add_module(f"lin{i}", _LinearHead(ch))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def heads(self) -> list[_LinearHead]:
        return [getattr(self, f"lin{i}") for i in range(len(CHANNELS))]

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for stop in TAPS:
            x = self.features[start:stop](x)
            out.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + _EPS))
            start = stop
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance ``[N]`` between ``x`` and ``y``, both ``[N, 3, H, W]`` RGB in [0, 1]."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ImageError(
                f"LPIPS needs two [N, 3, H, W] batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < 16:
            raise ImageError(f"LPIPS needs images of at least 16x16 pixels, got {tuple(x.shape[-2:])}")
        both = torch.cat([x, y]).to(self.shift.dtype)
        feats = self._taps(((both * 2 - 1) - self.shift) / self.scale)
        n = x.shape[0]
        total = torch.zeros(n, device=x.device, dtype=feats[0].dtype)
        for f, head in zip(feats, self.heads(), strict=True):
            total = total + head((f[:n] - f[n:]).pow(2)).mean(dim=(1, 2, 3))
        return total


def _load_tensors(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"LPIPS {what} file {file} does not exist")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file (pickle, zip, runtime errors)
        raise ConfigError(f"cannot read LPIPS {what} file {file}: {' '.join(str(exc).split())[:200]}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"LPIPS {what} file {file} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _check_and_pick(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str, path: str | os.PathLike[str]
) -> dict[str, torch.Tensor]:
    missing = [k for k in expected if k not in state]
    if missing:
        raise ConfigError(f"LPIPS {what} file {path} lacks {len(missing)} keys, e.g. {missing[0]!r}")
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ConfigError(
                f"LPIPS {what} file {path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}"
            )
    return {k: state[k] for k in expected}


def load_lpips(
    backbone: str | os.PathLike[str], heads: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> LPIPS:
    """An eval-mode :class:`LPIPS` with a torchvision VGG16 state dict and lpips-package heads."""
    model = LPIPS()
    own = model.state_dict()
    feats = _check_and_pick(
        _load_tensors(backbone, "backbone"),
        {k: v for k, v in own.items() if k.startswith("features.")},
        "backbone",
        backbone,
    )
    head_state = _load_tensors(heads, "heads")
    # Heads saved without dropout (use_dropout=False) name the conv model.0; accept those too.
    head_state = {k.replace(".model.0.", ".model.1."): v for k, v in head_state.items()}
    lins = _check_and_pick(head_state, {k: v for k, v in own.items() if k.startswith("lin")}, "heads", heads)
    model.load_state_dict({**feats, **lins})
    return model.eval().requires_grad_(False).to(device)


def _as_batch(img: ImageLike, device: torch.device) -> torch.Tensor:
    if isinstance(img, torch.Tensor) and img.ndim == 3 and img.is_floating_point():
        t = img.detach().float().clamp(0, 1)  # keep float precision: LPIPS is not an 8-bit protocol
    else:
        array = to_uint8(img)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        t = torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255.0
    if t.shape[0] != 3:
        raise ImageError(f"LPIPS needs RGB images, got shape {tuple(t.shape)}")
    return t.unsqueeze(0).to(device)


@torch.no_grad()
def lpips_distance(model: LPIPS, img: ImageLike, ref: ImageLike) -> float:
    """LPIPS between two images (uint8 arrays, PIL images or [3, H, W] tensors in [0, 1]); lower = closer."""
    device = model.shift.device
    a, b = _as_batch(img, device), _as_batch(ref, device)
    if a.shape != b.shape:
        raise ImageError(f"image shapes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    return float(model(a, b)[0])
