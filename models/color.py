"""Colour correction of SR outputs against the LR input (both standard in diffusion SR).

Generative SR can drift in colour; both fixes pull the output's low frequencies (or channel
statistics) back to the bicubic-upsampled input while keeping the generated detail.

* ``wavelet`` (StableSR / OSEDiff style): output high frequencies + reference low frequencies,
  split by a dilated à-trous blur pyramid. Local, so tiles blend seamlessly. The pyramid's low
  band is smooth enough to compute at LR size: the output averaged over each ``scale``² block
  stands in for its first levels, and the difference to the LR input is blurred there and
  upsampled. A 512² result: 8 → 1.5-2.2 ms on 2 cores; on photos within a level of 255 of
  the full-size pyramid (mean 0.05/255; `tests/test_pipeline.py`).
* ``adain``: per-channel mean/std of the output matched to the reference's.
* ``none``: untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .defaults import COLOR_FIXES
from .errors import ConfigError
from .resample import bicubic_upscale

WAVELET_LEVELS = 5


def check_color_fix(name: str) -> str:
    if name not in COLOR_FIXES:
        raise ConfigError(f"unknown colour fix {name!r} (choose from {', '.join(COLOR_FIXES)})")
    return name


def _blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """The [1, 2, 1]/4 ⊗ [1, 2, 1]/4 kernel at ``dilation``, separably (cheap on CPU too)."""
    d = dilation
    x = F.pad(x, (d, d, d, d), mode="replicate")
    x = torch.add(x[..., :, : -2 * d], x[..., :, 2 * d :]).add_(x[..., :, d:-d], alpha=2).mul_(0.25)
    return torch.add(x[..., : -2 * d, :], x[..., 2 * d :, :]).add_(x[..., d:-d, :], alpha=2).mul_(0.25)


def _low_frequency(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    for d in dilations:
        x = _blur(x, d)
    return x


def _scale(out: torch.Tensor, lr: torch.Tensor) -> int:
    scale = out.shape[-1] // lr.shape[-1]
    if out.shape[-2:] != (lr.shape[-2] * scale, lr.shape[-1] * scale):
        raise ValueError(f"output {tuple(out.shape[-2:])} is not a whole multiple of LR {tuple(lr.shape[-2:])}")
    return scale


def wavelet_color_fix(out: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """``out - low(out) + low(ref)`` with ``ref`` the upsampled ``lr``: one pyramid on the
    difference (the blur is linear), run at LR size on ``lr - mean of out's scale² blocks``."""
    scale = _scale(out, lr)
    widest = 2 ** (WAVELET_LEVELS - 1)  # the full-size pyramid's last dilation, in output pixels
    dilations = [2**i for i in range(WAVELET_LEVELS) if 2**i * scale <= widest]
    low = _low_frequency(lr - F.avg_pool2d(out, scale), dilations)
    return out + F.interpolate(low, size=out.shape[-2:], mode="bilinear", align_corners=False)


def adain_color_fix(out: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    o_mean, o_std = out.mean((2, 3), keepdim=True), out.std((2, 3), keepdim=True)
    r_mean, r_std = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    return (out - o_mean) / (o_std + eps) * r_std + r_mean


def apply_color_fix(out: torch.Tensor, lr: torch.Tensor, methods: Sequence[str]) -> torch.Tensor:
    """Fix each sample of ``out`` with its own method; ``lr`` is the matching LR batch."""
    for m in set(methods):
        check_color_fix(m)
    if all(m == "none" for m in methods):
        return out
    # In NCHW, not the channels-last layout the model produces: the upsampling and the blurs run
    # 2-3x faster in it. ``fixed`` may be ``out`` itself until a per-sample scatter needs a copy.
    fixed = out.to(torch.float32, memory_format=torch.contiguous_format)
    private = fixed.data_ptr() != out.data_ptr()
    lr = lr.to(torch.float32, memory_format=torch.contiguous_format)

    def adain(o: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
        return adain_color_fix(o, bicubic_upscale(small, _scale(o, small)).clamp_(0, 1))

    for method, fn in (("wavelet", wavelet_color_fix), ("adain", adain)):
        idx = [i for i, m in enumerate(methods) if m == method]
        if len(idx) == len(methods):
            fixed = fn(fixed, lr)  # the usual case: no gather and scatter
        elif idx:
            if not private:
                fixed, private = fixed.clone(), True
            fixed[idx] = fn(fixed[idx], lr[idx])
    return fixed
