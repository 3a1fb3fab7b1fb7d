"""PSNR and SSIM on the Y channel, as SR papers report them.

The protocol (the one in the MATLAB scripts of the SR literature and in BasicSR): both images are
8-bit RGB, ``crop_border`` pixels (usually the scale factor) are dropped on every side, the luma
is MATLAB's ``rgb2ycbcr`` Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 on 8-bit values, *not*
rounded back to 8 bits (BasicSR's choice), and the metric runs on that single channel in float64.

Inputs (any of, mixed freely):

* ``numpy.ndarray`` of dtype uint8, ``[H, W, 3]`` RGB or ``[H, W]`` grey (used as the luma as is);
* a ``PIL.Image`` (grey modes stay grey, everything else is converted to RGB);
* a ``torch.Tensor`` ``[3, H, W]`` (or ``[H, W]``) float in [0, 1], quantised to 8 bits first,
  because the protocol scores the image that would be saved, not the network's float output.

Numpy only: nothing here imports torch unless a tensor is passed in.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from ..errors import ImageError

#: MATLAB ``rgb2ycbcr`` luma weights for R, G, B on [0, 1] input (BT.601, studio swing).
Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * 255) ** 2
SSIM_C2 = (0.03 * 255) ** 2

ImageLike = Any  # np.ndarray (uint8) | PIL.Image.Image | torch.Tensor; kept loose so PIL/torch stay optional


def to_uint8(img: ImageLike) -> np.ndarray:
    """Any supported input as a uint8 ``[H, W, 3]`` RGB or ``[H, W]`` grey array."""
    if isinstance(img, np.ndarray):
        array = img
    elif "torch" in sys.modules and isinstance(img, sys.modules["torch"].Tensor):
        array = _tensor_to_uint8(img)
    elif "PIL.Image" in sys.modules and isinstance(img, sys.modules["PIL.Image"].Image):
        array = np.asarray(img if img.mode == "L" else img.convert("RGB"))
    else:
        raise ImageError(f"unsupported image type {type(img).__name__} (expected uint8 array, PIL image or tensor)")
    if array.dtype != np.uint8:
        raise ImageError(f"expected a uint8 image array, got dtype {array.dtype} (scale to 0..255 and round first)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ImageError(f"expected an [H, W, 3] RGB or [H, W] grey image, got shape {tuple(array.shape)}")
    return array


def _tensor_to_uint8(tensor: Any) -> np.ndarray:
    if tensor.ndim == 3 and tensor.shape[0] in (1, 3):
        tensor = tensor.permute(1, 2, 0)
    elif tensor.ndim != 2:
        raise ImageError(f"expected a [3, H, W] or [H, W] tensor, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ImageError(f"expected a float tensor in [0, 1], got dtype {tensor.dtype}")
    scaled = tensor.detach().to("cpu", dtype=sys.modules["torch"].float64).clamp(0, 1).mul(255).round()
    pixels: np.ndarray = scaled.numpy().astype(np.uint8)
    return pixels


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2ycbcr`` luma of a uint8 RGB image, in [16, 235], float64, not rounded.

    A 2-D (grey) image is returned as float64 unchanged: it already is the channel to score.
    """
    if img.ndim == 2:
        return img.astype(np.float64)
    weights = np.asarray(Y_WEIGHTS, dtype=np.float64) / 255.0
    return img.astype(np.float64) @ weights + Y_OFFSET


def crop(img: np.ndarray, border: int) -> np.ndarray:
    """Drop ``border`` pixels on every side (the SR protocol ignores the scale-factor rim)."""
    if border < 0:
        raise ValueError(f"crop_border must be >= 0, got {border}")
    if border == 0:
        return img
    if img.shape[0] <= 2 * border or img.shape[1] <= 2 * border:
        raise ImageError(f"image {img.shape[1]}x{img.shape[0]} is too small for crop_border={border}")
    return img[border:-border, border:-border]


def luma(img: ImageLike, crop_border: int) -> np.ndarray:
    """The cropped float64 Y channel of any supported input."""
    return rgb_to_y(crop(to_uint8(img), crop_border))


def _pair(img: ImageLike, ref: ImageLike, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = to_uint8(img), to_uint8(ref)
    if a.shape != b.shape:
        raise ImageError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return rgb_to_y(crop(a, crop_border)), rgb_to_y(crop(b, crop_border))


def psnr(img: ImageLike, ref: ImageLike, crop_border: int = 4) -> float:
    """PSNR in dB of ``img`` against ``ref`` on the Y channel (peak 255); ``inf`` when identical.

    ``crop_border`` defaults to 4, the scale of this project's x4 models.
    """
    a, b = _pair(img, ref, crop_border)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    kernel: np.ndarray = k / k.sum()
    return kernel


def _filter_valid(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation: only windows fully inside the image, as the reference keeps."""
    n = len(k)
    h, w = img.shape
    rows = sum(k[i] * img[i : h - n + 1 + i, :] for i in range(n))
    out: np.ndarray = sum(k[i] * rows[:, i : w - n + 1 + i] for i in range(n))
    return out


def ssim_y(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of two float 2-D channels on the 0..255 scale, mean over the valid region."""
    if min(a.shape) < SSIM_WINDOW:
        raise ImageError(f"SSIM needs at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels after cropping, got {a.shape}")
    k = _gaussian_1d(SSIM_WINDOW, SSIM_SIGMA)
    mu_a, mu_b = _filter_valid(a, k), _filter_valid(b, k)
    var_a = _filter_valid(a * a, k) - mu_a**2
    var_b = _filter_valid(b * b, k) - mu_b**2
    cov = _filter_valid(a * b, k) - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return float(np.mean(num / den))


def ssim(img: ImageLike, ref: ImageLike, crop_border: int = 4) -> float:
    """SSIM of ``img`` against ``ref`` on the Y channel (11×11 Gaussian window, sigma 1.5)."""
    return ssim_y(*_pair(img, ref, crop_border))
