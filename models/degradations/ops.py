"""Image operations of the degradation model, on ``[B, C, H, W]`` float tensors in [0, 1].

Blur, resize, sensor noise, JPEG, USM sharpening and random crops. Everything random takes an
explicit ``torch.Generator``; noise is drawn on the generator's device and moved to the image's,
so a CPU generator reproduces the same noise for CPU and CUDA images.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import _random

#: Resampling modes Real-ESRGAN picks from uniformly (``torch.nn.functional.interpolate`` names).
RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
#: Luma weights of ``rgb_to_grayscale`` (ITU-R 601), used for gray (luminance-only) Poisson noise.
_LUMA = (0.2989, 0.587, 0.114)
#: Up to this side a separable blur runs as two small matrix products (faster than a 1-D conv on CPU).
_MATMUL_BLUR_MAX_SIDE = 1024


def quantize_8bit(img: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels an 8-bit PNG stores, clamped to [0, 1]."""
    return torch.clamp((img * 255.0).round(), 0, 255) / 255.0


# ----------------------------------------------------------------------------- borders and blur


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Source indices of a reflect (``cv2.BORDER_REFLECT_101``) border of width ``pad`` around ``n`` pixels.

    Folds repeatedly, so unlike ``F.pad(mode="reflect")`` it works for pads wider than the image.
    """
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def reflect_pad(img: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad the last two dims by ``pad`` on every side with a mirror border (edge pixel not repeated)."""
    h, w = img.shape[-2:]
    if pad < h and pad < w:
        return F.pad(img, (pad, pad, pad, pad), mode="reflect")
    rows = _reflect_index(h, pad, img.device)
    cols = _reflect_index(w, pad, img.device)
    return img.index_select(-2, rows).index_select(-1, cols)


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Filter every sample with its own kernel in one grouped convolution (mirror border, same size out).

    ``kernel`` is ``[k, k]`` (shared) or ``[B, k, k]`` (one per sample), k odd. Like ``cv2.filter2D``
    this is a correlation; all kernels here are point-symmetric, so it equals a convolution.
    """
    b, c, h, w = img.shape
    k = kernel.shape[-1]
    if k % 2 == 0 or kernel.shape[-2] != k:
        raise ValueError(f"kernel must be square with an odd side, got {tuple(kernel.shape)}")
    kernel = kernel.to(img.device, img.dtype).expand(b, k, k)
    weight = kernel.repeat_interleave(c, dim=0).unsqueeze(1)  # [B*C, 1, k, k]: sample i's kernel on its channels
    # Contiguous NCHW: a channels-last input (e.g. straight from JPEG decoding) sends conv2d down a path ~10x slower.
    padded = reflect_pad(img, k // 2).contiguous().view(1, b * c, h + k - 1, w + k - 1)
    return F.conv2d(padded, weight, groups=b * c).view(b, c, h, w)


def filter_each(images: Sequence[torch.Tensor], kernels: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Filter ``[1, C, H, W]`` images of possibly different sizes, each with its own kernel (None: unchanged).

    Images of equal shape whose kernels have equal side share one grouped convolution (grouping by side
    instead of zero-padding every kernel to 21 halves the work on average).
    """
    out = list(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (image, kernel) in enumerate(zip(images, kernels, strict=True)):
        if kernel is not None:
            groups.setdefault((*image.shape, kernel.shape[-1]), []).append(i)
    for members in groups.values():
        stacked = torch.stack([kernels[i] for i in members])  # type: ignore[misc]
        filtered = filter2d(torch.cat([images[i] for i in members]), stacked)
        for j, i in enumerate(members):
            out[i] = filtered[j : j + 1]
    return out


def _gaussian_taps(size: int, sigma: float) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    taps = torch.exp(-0.5 * (ax / sigma) ** 2)
    return taps / taps.sum()


def _blur_matrix(n: int, taps: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` matrix M with ``M @ x`` = 1-D correlation of x with ``taps`` under a mirror border.

    Built on the CPU: a CUDA scatter-add sums folded border taps in a varying order, which would make
    the blur (and so a seeded batch) differ in the last bit from run to run.
    """
    taps = taps.cpu()
    r = taps.numel() // 2
    src = _reflect_index(n, r, taps.device).unfold(0, taps.numel(), 1)  # [n, k]: sources of output i
    matrix = torch.zeros(n, n, dtype=taps.dtype)
    return matrix.scatter_add_(1, src, taps.expand(n, -1).contiguous())


def gaussian_blur(img: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a mirror border (what ``cv2.GaussianBlur`` does with its default border)."""
    taps = _gaussian_taps(size, sigma)
    h, w = img.shape[-2:]
    if max(h, w) <= _MATMUL_BLUR_MAX_SIDE:
        rows, cols = (_blur_matrix(n, taps).to(img.device, img.dtype) for n in (h, w))
        return rows @ img @ cols.T
    taps = taps.to(img.device, img.dtype)
    b, c = img.shape[:2]
    r = size // 2
    x = reflect_pad(img, r).reshape(1, b * c, h + 2 * r, w + 2 * r)
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(b * c, 1, 1, size), groups=b * c)
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(b * c, 1, size, 1), groups=b * c)
    return x.view(b, c, h, w)


def usm_sharpen(img: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking as Real-ESRGAN applies it to ground-truth images (BasicSR ``USMSharp`` defaults).

    Real-ESRGAN trains towards a USM-sharpened target, which yields crisper outputs without the
    halos of sharpening the LR side. ``radius`` is the blur kernel side (made odd: 50 -> 51) and,
    as in OpenCV for sigma 0, sigma = 0.3 * ((side - 1) / 2 - 1) + 0.8 (8.0 for 51). Only pixels
    whose residual exceeds ``threshold`` (8-bit levels) are sharpened, through a soft blurred mask,
    so flat areas and their noise stay untouched.
    """
    side = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((side - 1) * 0.5 - 1) + 0.8
    residual = img - gaussian_blur(img, side, sigma)
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft_mask = gaussian_blur(mask, side, sigma)
    sharp = torch.clamp(img + weight * residual, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


# ----------------------------------------------------------------------------- resize


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize to ``(height, width)`` with one of :data:`RESIZE_MODES`, without anti-aliasing.

    Like Real-ESRGAN, downscaling deliberately aliases: that is one of the degradations to model.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    align = None if mode == "area" else False
    return F.interpolate(img, size=size, mode=mode, align_corners=align)


# ----------------------------------------------------------------------------- noise


def add_gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Add white Gaussian noise of std ``sigma`` (8-bit levels) and clamp to [0, 1].

    Gray noise is one field shared by all channels (luminance noise); colour noise is independent per channel.
    """
    b, c, h, w = img.shape
    shape = (b, 1, h, w) if gray else (b, c, h, w)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return torch.clamp(img + noise.to(img.device, img.dtype) * (sigma / 255.0), 0, 1)


def _poisson_residual(img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shot noise of each sample: photon counts ~ Poisson(intensity * levels) with ``levels`` the number of
    distinct 8-bit values rounded up to a power of two (BasicSR's choice), minus the clean image."""
    clean = quantize_8bit(img)
    codes = (clean * 255).round().long().flatten(1)
    distinct = [int(torch.count_nonzero(torch.bincount(row, minlength=256))) for row in codes]
    levels = torch.tensor([2.0 ** math.ceil(math.log2(n)) for n in distinct], dtype=img.dtype, device=img.device)
    levels = levels.view(-1, 1, 1, 1)
    rates = (clean * levels).to(generator.device, torch.float32)
    counts = torch.poisson(rates, generator=generator).to(img.device, img.dtype)
    return counts / levels - clean


def add_poisson_noise(img: torch.Tensor, scale: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Add Poisson (shot) noise, multiplied by ``scale``, and clamp to [0, 1]; gray noise comes from the
    luma and is shared by all channels."""
    if gray:
        r, g, b = _LUMA
        luma = r * img[:, 0:1] + g * img[:, 1:2] + b * img[:, 2:3]
        noise = _poisson_residual(luma, generator).expand_as(img)
    else:
        noise = _poisson_residual(img, generator)
    return torch.clamp(img + noise * scale, 0, 1)


# ----------------------------------------------------------------------------- JPEG


def jpeg_compress(img: torch.Tensor, quality: int | Sequence[int]) -> torch.Tensor:
    """Round-trip each sample through an in-memory Pillow JPEG (baseline, 4:2:0 chroma like most cameras
    and web images) at its own ``quality``; the result is 8-bit and on the input's device."""
    b = img.shape[0]
    qualities = [int(quality)] * b if isinstance(quality, int) else [int(q) for q in quality]
    if len(qualities) != b:
        raise ValueError(f"{len(qualities)} qualities for {b} images")
    pixels = (quantize_8bit(img) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for array, q in zip(pixels, qualities, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=q, subsampling="4:2:0")
        buffer.seek(0)
        with Image.open(buffer) as jpeg:
            decoded.append(np.asarray(jpeg.convert("RGB")))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
    return out.to(img.device, img.dtype) / 255.0


# ----------------------------------------------------------------------------- crops


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def random_crop(img: torch.Tensor, size: int | tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Crop every sample of ``[B, C, H, W]`` at its own random position to ``size`` (side or (h, w))."""
    th, tw = _pair(size)
    h, w = img.shape[-2:]
    if th > h or tw > w:
        raise ValueError(f"crop {th}x{tw} larger than image {h}x{w}")
    crops = []
    for sample in img:
        top, left = _random.randint(generator, 0, h - th), _random.randint(generator, 0, w - tw)
        crops.append(sample[:, top : top + th, left : left + tw])
    return torch.stack(crops)


def random_crop_pair(
    hr: torch.Tensor, lr: torch.Tensor, hr_size: int | tuple[int, int], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop aligned patches from an HR batch and its LR batch (scale inferred from the shapes): the LR
    window is drawn on the LR grid, so the HR window covers exactly the same scene."""
    scale = hr.shape[-1] // lr.shape[-1]
    if scale < 1 or tuple(hr.shape[-2:]) != (lr.shape[-2] * scale, lr.shape[-1] * scale):
        raise ValueError(f"HR {tuple(hr.shape[-2:])} is not an integer multiple of LR {tuple(lr.shape[-2:])}")
    th, tw = _pair(hr_size)
    if th % scale or tw % scale:
        raise ValueError(f"HR crop {th}x{tw} is not divisible by the scale {scale}")
    lh, lw = th // scale, tw // scale
    h, w = lr.shape[-2:]
    if lh > h or lw > w:
        raise ValueError(f"LR crop {lh}x{lw} larger than LR image {h}x{w}")
    hr_crops, lr_crops = [], []
    for hr_sample, lr_sample in zip(hr, lr, strict=True):
        top, left = _random.randint(generator, 0, h - lh), _random.randint(generator, 0, w - lw)
        lr_crops.append(lr_sample[:, top : top + lh, left : left + lw])
        hr_crops.append(hr_sample[:, top * scale : (top + lh) * scale, left * scale : (left + lw) * scale])
    return torch.stack(hr_crops), torch.stack(lr_crops)
