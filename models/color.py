"""Colour correction of SR outputs against the LR input (both standard in diffusion SR).

Generative SR can drift in colour; both fixes pull the output's low frequencies (or channel
statistics) back to the bicubic-upsampled input while keeping the generated detail.

* ``wavelet`` (StableSR / OSEDiff style): output high frequencies + reference low frequencies,
  split by a dilated à-trous blur pyramid. Local, so tiles blend seamlessly.
* ``adain``: per-channel mean/std of the output matched to the reference's.
* ``none``: untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .defaults import COLOR_FIXES
from .errors import ConfigError

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


def _low_frequency(x: torch.Tensor, levels: int = WAVELET_LEVELS) -> torch.Tensor:
    for i in range(levels):
        x = _blur(x, 2**i)
    return x


def wavelet_color_fix(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # out - low(out) + low(ref), with one pyramid instead of two: the blur is linear.
    return out + _low_frequency(ref - out)


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
    # In NCHW, not the channels-last layout the model produces: the bicubic upsampling and the
    # blurs run 2-3x faster in it (a 512² result: 20 → 9.5 ms on 2 cores, the same values).
    fixed = out.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    lr = lr.to(torch.float32, memory_format=torch.contiguous_format)
    ref = F.interpolate(lr, size=out.shape[-2:], mode="bicubic", align_corners=False).clamp_(0, 1)
    for method, fn in (("wavelet", wavelet_color_fix), ("adain", adain_color_fix)):
        idx = [i for i, m in enumerate(methods) if m == method]
        if len(idx) == len(methods):
            fixed = fn(fixed, ref)  # the usual case: no gather and scatter
        elif idx:
            fixed[idx] = fn(fixed[idx], ref[idx])
    return fixed
