"""Band-split decoding: the low band of an output travels further along the alpha path than its detail.

Measured on the teachers and on the students (model card): what the fidelity teacher gains over the
realness teacher in PSNR sits mostly in the low spatial frequencies (tone, colour, shapes), while
what makes the realness teacher look real (its NIQE) sits in the fine detail. Moving both bands
along the path at the same rate, as plain decoding and the teachers' pixel blend do, gives up
fidelity that costs no realness. So the output at ``alpha`` takes its detail from
``decode(z_alpha)`` and its low band (a Gaussian blur of ``sigma`` output pixels) from
``decode(z_low)``, with ``low = min(1, lead * alpha)``: the low band reaches the fidelity end at
``alpha = 1 / lead`` and the detail only at ``alpha = 1``. Both ends are unchanged (at alpha = 0
and 1 the two positions coincide), and an untrained velocity still leaves alpha without effect.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import ConfigError


@dataclass(frozen=True)
class BandSplit:
    #: Gaussian standard deviation of the low band, in output pixels.
    sigma: float
    #: The low band's speed along the path relative to the detail's (1 = plain decoding).
    lead: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ConfigError(f"band_split.sigma must be > 0, got {self.sigma!r}")
        if not (math.isfinite(self.lead) and self.lead >= 1):
            raise ConfigError(f"band_split.lead must be >= 1, got {self.lead!r}")

    @classmethod
    def from_config(cls, data: dict[str, Any] | None) -> BandSplit | None:
        if data is None:
            return None
        if not isinstance(data, dict) or set(data) != {"sigma", "lead"}:
            raise ConfigError(f"band_split must be an object with 'sigma' and 'lead', got {data!r}")
        try:
            return cls(sigma=float(data["sigma"]), lead=float(data["lead"]))
        except (TypeError, ValueError):
            raise ConfigError(f"band_split values must be numbers, got {data!r}") from None

    def to_config(self) -> dict[str, float]:
        return asdict(self)

    def low_position(self, alpha: float) -> float:
        """Where on the path the low band of the output at ``alpha`` is decoded."""
        return min(1.0, self.lead * alpha)

    def compose(self, low: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        """``detail`` with its low band replaced by ``low``'s: ``detail + blur(low - detail)``."""
        return detail + gaussian_blur(low - detail, self.sigma)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` (radius 3σ; edges reflected, or replicated where
    the image is smaller than the radius)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma * sigma))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
