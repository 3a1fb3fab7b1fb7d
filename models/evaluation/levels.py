"""The degradation levels ``ctsr eval`` scores at: how the LR inputs are made from the HR photos.

A model is only as good as the range of inputs it holds up on, so every method is scored at three:

* ``realesrgan``: the training degradation model (Real-ESRGAN second order), the hardest;
* ``mild``: a slightly blurred, lightly noisy, JPEG-80 downscale (an ordinary web photo);
* ``bicubic``: a clean bicubic downscale (the classic SR benchmark input).

Each level is a function ``(hr [3,H,W], scale, seed) → lr [1,3,H/s,W/s]`` on 8-bit levels; the same
seed gives the same input, so every method in a run (and every later run) scores the same LR images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..degradations import DegradationConfig, add_gaussian_noise, degrade, gaussian_blur, jpeg_compress, quantize_8bit

Level = Callable[[torch.Tensor, int, int], torch.Tensor]

MILD_BLUR_SIGMA = 0.8
MILD_NOISE_SIGMA = 3.0  # 8-bit levels
MILD_JPEG_QUALITY = 80


def realesrgan_level(hr: torch.Tensor, scale: int, seed: int) -> torch.Tensor:
    return degrade(hr[None], scale, torch.Generator().manual_seed(seed), DegradationConfig())


def _downscale(image: torch.Tensor, scale: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    return F.interpolate(image, size=(h // scale, w // scale), mode="bicubic", align_corners=False, antialias=True)


def mild_level(hr: torch.Tensor, scale: int, seed: int) -> torch.Tensor:
    blurred = gaussian_blur(hr[None], 7, MILD_BLUR_SIGMA)
    noisy = add_gaussian_noise(_downscale(blurred, scale).clamp(0, 1), MILD_NOISE_SIGMA, False,
                               torch.Generator().manual_seed(seed))  # fmt: skip
    return jpeg_compress(noisy, MILD_JPEG_QUALITY)


def bicubic_level(hr: torch.Tensor, scale: int, seed: int) -> torch.Tensor:
    return quantize_8bit(_downscale(hr[None], scale))


LEVELS: dict[str, Level] = {"realesrgan": realesrgan_level, "mild": mild_level, "bicubic": bicubic_level}
