"""Real-ESRGAN's second-order degradation: HR images in, realistic LR images out.

Two rounds of [blur -> random resize -> Gaussian or Poisson noise -> JPEG], then a resize to the
target size with an optional sinc filter, either before or after a final JPEG. Each sample draws
its own parameters from the caller's ``torch.Generator`` (a :class:`SamplePlan`), so one seed
reproduces a batch of training pairs exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..errors import ConfigError
from . import _random
from .kernels import FINAL_SINC_OMEGA, KERNEL_PROBS, KERNEL_SIZES, KERNEL_TYPES, random_blur_kernel, random_sinc_kernel
from .ops import (
    RESIZE_MODES,
    add_gaussian_noise,
    add_poisson_noise,
    filter_each,
    jpeg_compress,
    quantize_8bit,
    resize,
    usm_sharpen,
)

_RESIZE_KINDS = ("up", "down", "keep")


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _check_range(name: str, value: Sequence[float], low: float = -math.inf, high: float = math.inf) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1] <= high:
        raise ConfigError(f"{name} must be [low, high] with {low} <= low <= high <= {high}, got {list(value)}")


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {value}")


def _check_weights(name: str, weights: Sequence[float], count: int) -> None:
    if len(weights) != count or any(p < 0 for p in weights) or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ConfigError(f"{name} must be {count} non-negative probabilities summing to 1, got {list(weights)}")


@dataclass(frozen=True)
class StageConfig:
    """One degradation round. Defaults: Real-ESRGAN x4plus, first order."""

    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = KERNEL_PROBS
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5  # else Poisson noise
    noise_range: tuple[float, float] = (1.0, 30.0)  # Gaussian sigma, 8-bit levels
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)  # JPEG quality, both ends included

    def __post_init__(self) -> None:
        for f in fields(self):  # JSON gives lists: store tuples so configs compare and hash by value
            object.__setattr__(self, f.name, _as_tuple(getattr(self, f.name)))
        unknown = set(self.kernel_list) - set(KERNEL_TYPES)
        if unknown:
            raise ConfigError(f"unknown kernel types {sorted(unknown)}; expected some of {KERNEL_TYPES}")
        _check_weights("kernel_prob", self.kernel_prob, len(self.kernel_list))
        _check_weights("resize_prob", self.resize_prob, 3)
        for name in ("sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            _check_prob(name, getattr(self, name))
        _check_range("blur_sigma", self.blur_sigma, 1e-3)
        _check_range("betag_range", self.betag_range, 1e-3)
        _check_range("betap_range", self.betap_range, 1e-3)
        _check_range("resize_range", self.resize_range, 1e-3)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ConfigError(f"resize_range must contain 1 (down below, up above), got {list(self.resize_range)}")
        _check_range("noise_range", self.noise_range, 0.0)
        _check_range("poisson_scale_range", self.poisson_scale_range, 0.0)
        _check_range("jpeg_range", self.jpeg_range, 1, 100)


#: Real-ESRGAN x4plus second-order defaults (its ``*2`` options).
SECOND_STAGE = StageConfig(
    blur_sigma=(0.2, 1.5),
    resize_prob=(0.3, 0.4, 0.3),
    resize_range=(0.3, 1.2),
    noise_range=(1.0, 25.0),
    poisson_scale_range=(0.05, 2.5),
)


@dataclass(frozen=True)
class DegradationConfig:
    """The whole second-order model; defaults reproduce Real-ESRGAN x4plus (``train_realesrgan_x4plus.yml``).

    ``second.jpeg_range`` is the quality of the final JPEG. JSON: ``dataclasses.asdict`` out,
    :meth:`from_dict` back in.
    """

    first: StageConfig = field(default_factory=StageConfig)
    second: StageConfig = SECOND_STAGE
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    final_sinc_omega: tuple[float, float] = FINAL_SINC_OMEGA
    jpeg_last_prob: float = 0.5  # final order: [resize + sinc] then JPEG, else JPEG then [resize + sinc]
    kernel_sizes: tuple[int, ...] = KERNEL_SIZES
    resize_modes: tuple[str, ...] = RESIZE_MODES
    sharpen_input: bool = True  # degrade the USM-sharpened HR, as Real-ESRGAN does

    def __post_init__(self) -> None:
        for name in ("final_sinc_omega", "kernel_sizes", "resize_modes"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        for name in ("second_blur_prob", "final_sinc_prob", "jpeg_last_prob"):
            _check_prob(name, getattr(self, name))
        _check_range("final_sinc_omega", self.final_sinc_omega, 1e-3, math.pi)
        if not self.kernel_sizes or any(k < 3 or k % 2 == 0 for k in self.kernel_sizes):
            raise ConfigError(f"kernel_sizes must be odd sides >= 3, got {list(self.kernel_sizes)}")
        if not self.resize_modes or set(self.resize_modes) - set(RESIZE_MODES):
            raise ConfigError(f"resize_modes must be some of {RESIZE_MODES}, got {list(self.resize_modes)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (``dataclasses.asdict``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DegradationConfig:
        """Inverse of :meth:`to_dict`, also after a JSON round trip; missing keys take the defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown degradation options {sorted(unknown)}")
        values = dict(data)
        for stage in ("first", "second"):
            if isinstance(values.get(stage), Mapping):
                stage_unknown = set(values[stage]) - {f.name for f in fields(StageConfig)}
                if stage_unknown:
                    raise ConfigError(f"unknown {stage}-stage options {sorted(stage_unknown)}")
                values[stage] = StageConfig(**values[stage])
        return cls(**values)


@dataclass(frozen=True)
class StagePlan:
    """The drawn parameters of one degradation round for one sample."""

    kernel: torch.Tensor | None  # None: no blur
    resize_scale: float
    resize_mode: str
    gaussian_noise: bool  # else Poisson
    noise_level: float  # Gaussian sigma (8-bit levels) or Poisson scale
    gray_noise: bool
    jpeg_quality: int


@dataclass(frozen=True)
class SamplePlan:
    """Every random choice for one sample except the noise fields themselves."""

    first: StagePlan
    second: StagePlan
    jpeg_last: bool
    final_mode: str
    sinc: torch.Tensor | None  # None: no final sinc


def _draw_stage(generator: torch.Generator, stage: StageConfig, config: DegradationConfig, blur: bool) -> StagePlan:
    kernel = None
    if blur:
        kernel = random_blur_kernel(
            generator,
            config.kernel_sizes,
            stage.kernel_list,
            stage.kernel_prob,
            stage.sinc_prob,
            stage.blur_sigma,
            stage.betag_range,
            stage.betap_range,
        )
    kind = _random.choice(generator, _RESIZE_KINDS, stage.resize_prob)
    low, high = stage.resize_range
    if kind == "up":
        resize_scale = _random.uniform(generator, 1.0, high)
    elif kind == "down":
        resize_scale = _random.uniform(generator, low, 1.0)
    else:
        resize_scale = 1.0
    mode = _random.choice(generator, config.resize_modes)
    gaussian = _random.chance(generator, stage.gaussian_noise_prob)
    level = _random.uniform(generator, *(stage.noise_range if gaussian else stage.poisson_scale_range))
    gray = _random.chance(generator, stage.gray_noise_prob)
    quality = _random.randint(generator, *stage.jpeg_range)
    return StagePlan(kernel, resize_scale, mode, gaussian, level, gray, quality)


def draw_plan(generator: torch.Generator, config: DegradationConfig) -> SamplePlan:
    """Draw one sample's degradation parameters (kernels included) from ``generator``."""
    first = _draw_stage(generator, config.first, config, blur=True)
    second = _draw_stage(generator, config.second, config, blur=_random.chance(generator, config.second_blur_prob))
    jpeg_last = _random.chance(generator, config.jpeg_last_prob)
    final_mode = _random.choice(generator, config.resize_modes)
    sinc = None
    if _random.chance(generator, config.final_sinc_prob):
        sinc = random_sinc_kernel(generator, config.kernel_sizes, config.final_sinc_omega)
    return SamplePlan(first, second, jpeg_last, final_mode, sinc)


def _run_stage(
    images: list[torch.Tensor],
    plans: Sequence[StagePlan],
    target: Callable[[StagePlan], tuple[int, int]],
    generator: torch.Generator,
    jpeg: bool,
) -> list[torch.Tensor]:
    """Blur (batched), resize, add noise and, if ``jpeg``, JPEG-compress each sample as its plan says."""
    images = filter_each(images, [p.kernel for p in plans])
    out = []
    for image, plan in zip(images, plans, strict=True):
        image = resize(image, target(plan), plan.resize_mode)
        add_noise = add_gaussian_noise if plan.gaussian_noise else add_poisson_noise
        image = add_noise(image, plan.noise_level, plan.gray_noise, generator)
        out.append(jpeg_compress(image, plan.jpeg_quality) if jpeg else image)
    return out


def _scaled(n: float, scale: float) -> int:
    return max(1, int(n * scale))


def apply_plans(hr: torch.Tensor, scale: int, plans: Sequence[SamplePlan], generator: torch.Generator) -> torch.Tensor:
    """Degrade ``hr`` (``[B, 3, H, W]``, float in [0, 1]) along ``plans`` to ``[B, 3, H//scale, W//scale]``.

    ``generator`` supplies the noise fields. The result is quantised to 8 bits, like a saved PNG.
    """
    b, _, h, w = hr.shape
    if len(plans) != b:
        raise ValueError(f"{len(plans)} plans for a batch of {b}")
    out_size = (h // scale, w // scale)
    images = list(hr.split(1))
    images = _run_stage(
        images,
        [p.first for p in plans],
        lambda s: (_scaled(h, s.resize_scale), _scaled(w, s.resize_scale)),
        generator,
        jpeg=True,
    )
    # The second round's resize is relative to the target size; its JPEG is the final one below.
    images = _run_stage(
        images,
        [p.second for p in plans],
        lambda s: (_scaled(h / scale, s.resize_scale), _scaled(w / scale, s.resize_scale)),
        generator,
        jpeg=False,
    )
    # Final: the second JPEG before or after [resize to target + sinc]; other orders give twisted lines
    # (Real-ESRGAN).
    images = [x if p.jpeg_last else jpeg_compress(x, p.second.jpeg_quality) for x, p in zip(images, plans, strict=True)]
    images = [resize(x, out_size, p.final_mode) for x, p in zip(images, plans, strict=True)]
    images = filter_each(images, [p.sinc for p in plans])
    images = [jpeg_compress(x, p.second.jpeg_quality) if p.jpeg_last else x for x, p in zip(images, plans, strict=True)]
    return quantize_8bit(torch.cat(images))


def _check_input(hr: torch.Tensor, scale: int) -> None:
    if hr.ndim != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
        raise ValueError(f"expected a float [B, 3, H, W] batch, got {tuple(hr.shape)} {hr.dtype}")
    if not isinstance(scale, int) or scale < 1 or min(hr.shape[-2:]) < scale:
        raise ValueError(f"scale must be an int in [1, min(H, W)], got {scale!r}")


class Degrader:
    """Makes LR training inputs from HR crops with a fixed :class:`DegradationConfig`."""

    def __init__(self, config: DegradationConfig | None = None) -> None:
        self.config = config or DegradationConfig()

    def plan(self, batch: int, generator: torch.Generator) -> list[SamplePlan]:
        """Draw the parameters of ``batch`` samples, one after another, from ``generator``."""
        return [draw_plan(generator, self.config) for _ in range(batch)]

    def __call__(self, hr: torch.Tensor, scale: int, generator: torch.Generator) -> torch.Tensor:
        """``[B, 3, H, W]`` float HR in [0, 1] -> ``[B, 3, H//scale, W//scale]`` float32 LR, 8-bit levels.

        Works on any device; JPEG round-trips through the CPU. Every random draw comes from ``generator``.
        """
        _check_input(hr, scale)
        x = hr.to(torch.float32)
        if self.config.sharpen_input:
            x = usm_sharpen(x)
        return apply_plans(x, scale, self.plan(x.shape[0], generator), generator)


def degrade(
    hr: torch.Tensor, scale: int, generator: torch.Generator, config: DegradationConfig | None = None
) -> torch.Tensor:
    """Functional form of :class:`Degrader` (see :meth:`Degrader.__call__`)."""
    return Degrader(config)(hr, scale, generator)
