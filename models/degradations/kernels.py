"""Random blur kernels of the Real-ESRGAN degradation model, as torch tensors.

Six bivariate shapes (isotropic / anisotropic Gaussian, generalised Gaussian, plateau) model
optical and motion-like blur; the 2-D sinc (an ideal circular low-pass filter, truncated) models
the ringing and overshoot that sharpening and resampling leave in real images. All kernels are
square with an odd side, centred, and normalised to sum 1 so blurring keeps the mean brightness.

Shapes, parameter draws and default ranges follow Real-ESRGAN (Wang et al., 2021) and BasicSR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _random

#: Kernel shape names, as in Real-ESRGAN's ``kernel_list``.
KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
#: Real-ESRGAN's default probabilities for :data:`KERNEL_TYPES`.
KERNEL_PROBS: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
#: Odd kernel sides 7..21 that Real-ESRGAN draws from uniformly.
KERNEL_SIZES: tuple[int, ...] = tuple(range(7, 22, 2))
#: Cut-off range of the final sinc filter (radians per pixel; pi is Nyquist).
FINAL_SINC_OMEGA: tuple[float, float] = (math.pi / 3, math.pi)

_DTYPE = torch.float64  # kernels are tiny: build them in double, hand them out in the caller's dtype


#: Below this argument J1 comes from its power series, above it from Hankel's asymptotic expansion;
#: at 14 both are good to ~1e-11 in float64 (the series loses digits to cancellation as x grows,
#: the asymptotic series gains them).
_J1_SWITCH = 14.0
_J1_SERIES_TERMS = 45
_J1_ASYMPTOTIC_TERMS = 28


def _j1_series(x: torch.Tensor) -> torch.Tensor:
    """sum_m (-1)^m (x/2)^(2m+1) / (m! (m+1)!), built term by term."""
    half = x / 2
    term, total = half.clone(), half.clone()
    for m in range(1, _J1_SERIES_TERMS):
        term = term * (-half * half) / (m * (m + 1))
        total = total + term
    return total


def _j1_asymptotic(x: torch.Tensor) -> torch.Tensor:
    """Hankel: J1(x) ~ sqrt(2 / (pi x)) (P cos(x - 3pi/4) - Q sin(x - 3pi/4)), with P (even terms) and
    Q (odd terms) from a_k = prod_{j<=k} (4 - (2j - 1)^2) / (8 j), alternating in sign pairwise."""
    p, q = torch.ones_like(x), torch.zeros_like(x)
    term = torch.ones_like(x)
    for k in range(1, _J1_ASYMPTOTIC_TERMS):
        term = term * (4 - (2 * k - 1) ** 2) / (8 * k * x)
        sign = -1.0 if (k // 2) % 2 else 1.0  # k = 1, 2 -> +, 3, 4 -> -, ...
        if k % 2:
            q = q + sign * term
        else:
            p = p + sign * term
    chi = x - 0.75 * math.pi
    return torch.sqrt(2 / (math.pi * x)) * (p * torch.cos(chi) - q * torch.sin(chi))


def bessel_j1(x: torch.Tensor) -> torch.Tensor:
    """Bessel function of the first kind, order 1 (what ``scipy.special.j1`` computes), to ~1e-11.

    Evaluated in float64 and returned in ``x``'s dtype. Implemented here because scipy is no dependency
    and ``torch.special.bessel_j1`` is only good to ~4e-7 around x = 5.
    """
    x64 = x.to(torch.float64)
    ax = x64.abs()
    small = _j1_series(ax.clamp(max=_J1_SWITCH))
    large = _j1_asymptotic(ax.clamp(min=_J1_SWITCH))
    return (torch.sign(x64) * torch.where(ax < _J1_SWITCH, small, large)).to(x.dtype)


def _check_size(size: int) -> None:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred pixel coordinates ``(x, y)``: x runs along columns, y along rows."""
    _check_size(size)
    ax = torch.arange(size, dtype=_DTYPE) - size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _quadratic_form(size: int, sigma_x: float, sigma_y: float | None, theta: float) -> torch.Tensor:
    """``p^T Sigma^-1 p`` on the grid, with ``Sigma = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T``."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"sigmas must be positive, got {sigma_x}, {sigma_y}")
    xx, yy = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy  # the point in the ellipse's own axes: R^T p
    v = -s * xx + c * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


#: Taps smaller than this (in a kernel summing to 1) are set to 0: they change no 8-bit pixel, but in
#: float32 they are denormal numbers, which make a CPU convolution several times slower.
_NEGLIGIBLE_TAP = 1e-12


def _normalise(kernel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    kernel = kernel / kernel.sum()
    kernel = torch.where(kernel.abs() < _NEGLIGIBLE_TAP, torch.zeros_like(kernel), kernel)
    return (kernel / kernel.sum()).to(dtype)


def gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Bivariate Gaussian ``exp(-q/2)``; isotropic when ``sigma_y`` is None, rotated by ``theta`` otherwise."""
    return _normalise(torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta)), dtype)


def generalized_gaussian_kernel(
    size: int,
    sigma_x: float,
    sigma_y: float | None = None,
    theta: float = 0.0,
    beta: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Generalised Gaussian ``exp(-q^beta / 2)``: beta < 1 peakier with heavy tails, beta > 1 flatter and
    box-like; beta = 1 is the Gaussian."""
    return _normalise(torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta) ** beta), dtype)


def plateau_kernel(
    size: int,
    sigma_x: float,
    sigma_y: float | None = None,
    theta: float = 0.0,
    beta: float = 1.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plateau-shaped ``1 / (1 + q^beta)``: a flat top with slowly decaying (Cauchy-like) tails."""
    return _normalise(1.0 / (_quadratic_form(size, sigma_x, sigma_y, theta) ** beta + 1.0), dtype)


def sinc_kernel(size: int, omega: float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2-D sinc: the impulse response of an ideal circular low-pass filter with cut-off ``omega``
    (radians per pixel, pi = Nyquist), ``omega J1(omega r) / (2 pi r)``, truncated to ``size``.

    The truncation is deliberate: it produces the ringing and overshoot artefacts Real-ESRGAN wants to model.
    """
    if not 0 < omega <= math.pi:
        raise ValueError(f"sinc cut-off must be in (0, pi], got {omega}")
    xx, yy = _grid(size)
    r = torch.sqrt(xx**2 + yy**2)
    safe_r = torch.where(r == 0, torch.ones_like(r), r)
    kernel = omega * bessel_j1(omega * safe_r) / (2 * math.pi * safe_r)
    kernel = torch.where(r == 0, torch.full_like(r, omega**2 / (4 * math.pi)), kernel)  # the r -> 0 limit
    return _normalise(kernel, dtype)


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a centred odd kernel to ``size`` (odd, >= its side): the blur it applies does not change."""
    k = kernel.shape[-1]
    _check_size(size)
    if size < k:
        raise ValueError(f"cannot pad a {k}x{k} kernel down to {size}")
    p = (size - k) // 2
    return torch.nn.functional.pad(kernel, (p, p, p, p))


def _draw_beta(generator: torch.Generator, beta_range: Sequence[float]) -> float:
    """Real-ESRGAN's beta draw: below 1 or above 1 with equal chance, so both shape regimes are common."""
    low, high = beta_range
    if _random.chance(generator, 0.5):
        return _random.uniform(generator, low, 1.0) if low < 1.0 else 1.0
    return _random.uniform(generator, 1.0, high) if high > 1.0 else 1.0


def random_mixed_kernel(
    generator: torch.Generator,
    size: int,
    kernel_list: Sequence[str] = KERNEL_TYPES,
    kernel_prob: Sequence[float] = KERNEL_PROBS,
    sigma_range: Sequence[float] = (0.2, 3.0),
    betag_range: Sequence[float] = (0.5, 4.0),
    betap_range: Sequence[float] = (1.0, 2.0),
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One Gaussian-family kernel: type from ``kernel_prob``, sigmas from ``sigma_range`` (both axes),
    rotation uniform in [-pi, pi] for the anisotropic types, beta from the type's beta range."""
    kind = _random.choice(generator, kernel_list, kernel_prob)
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}; expected one of {KERNEL_TYPES}")
    sigma_x = _random.uniform(generator, *sigma_range)
    sigma_y: float | None = None
    theta = 0.0
    if kind.endswith("aniso"):
        sigma_y = _random.uniform(generator, *sigma_range)
        theta = _random.uniform(generator, -math.pi, math.pi)
    if kind.startswith("generalized"):
        beta = _draw_beta(generator, betag_range)
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, beta, dtype=dtype)
    if kind.startswith("plateau"):
        beta = _draw_beta(generator, betap_range)
        return plateau_kernel(size, sigma_x, sigma_y, theta, beta, dtype=dtype)
    return gaussian_kernel(size, sigma_x, sigma_y, theta, dtype=dtype)


def blur_sinc_omega_range(size: int) -> tuple[float, float]:
    """Real-ESRGAN's cut-off range for a sinc used as a blur-stage kernel: [pi/3, pi] below side 13,
    [pi/5, pi] from 13 on (only a long kernel can represent a low cut-off)."""
    return (math.pi / 3, math.pi) if size < 13 else (math.pi / 5, math.pi)


def random_sinc_kernel(
    generator: torch.Generator,
    sizes: Sequence[int] = KERNEL_SIZES,
    omega_range: Sequence[float] = FINAL_SINC_OMEGA,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A sinc kernel of random side from ``sizes`` and random cut-off from ``omega_range``
    (defaults: Real-ESRGAN's final sinc filter)."""
    size = _random.choice(generator, sizes)
    return sinc_kernel(size, _random.uniform(generator, *omega_range), dtype=dtype)


def random_blur_kernel(
    generator: torch.Generator,
    sizes: Sequence[int] = KERNEL_SIZES,
    kernel_list: Sequence[str] = KERNEL_TYPES,
    kernel_prob: Sequence[float] = KERNEL_PROBS,
    sinc_prob: float = 0.1,
    sigma_range: Sequence[float] = (0.2, 3.0),
    betag_range: Sequence[float] = (0.5, 4.0),
    betap_range: Sequence[float] = (1.0, 2.0),
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The kernel of one blur stage: a sinc with probability ``sinc_prob``, else a mixed Gaussian-family
    kernel; its side is drawn uniformly from ``sizes``."""
    size = _random.choice(generator, sizes)
    if _random.chance(generator, sinc_prob):
        return sinc_kernel(size, _random.uniform(generator, *blur_sinc_omega_range(size)), dtype=dtype)
    return random_mixed_kernel(
        generator, size, kernel_list, kernel_prob, sigma_range, betag_range, betap_range, dtype=dtype
    )
