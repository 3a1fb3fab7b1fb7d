"""The Real-ESRGAN degradation model: kernel shapes, building blocks, reproducibility and realism."""

from __future__ import annotations

import dataclasses
import json
import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PHOTO
from PIL import Image

from models.degradations import (
    KERNEL_SIZES,
    KERNEL_TYPES,
    DegradationConfig,
    Degrader,
    StageConfig,
    add_gaussian_noise,
    add_poisson_noise,
    bessel_j1,
    degrade,
    filter2d,
    gaussian_blur,
    gaussian_kernel,
    generalized_gaussian_kernel,
    jpeg_compress,
    pad_kernel,
    plateau_kernel,
    random_blur_kernel,
    random_crop,
    random_crop_pair,
    random_mixed_kernel,
    random_sinc_kernel,
    sinc_kernel,
    usm_sharpen,
)
from models.degradations import ops as degradation_ops
from models.degradations import pipeline as degradation_pipeline
from models.degradations.ops import reflect_pad
from models.errors import ConfigError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _photo_batch(batch: int, zoom: int = 2) -> torch.Tensor:
    """The test photo (96x72), upscaled by ``zoom`` with Lanczos, repeated ``batch`` times."""
    with Image.open(PHOTO) as img:
        img = img.convert("RGB")
        img = img.resize((img.width * zoom, img.height * zoom), Image.LANCZOS)
    hr = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
    return hr.expand(batch, -1, -1, -1).contiguous()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR in dB of ``[B, C, H, W]`` images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return -10 * torch.log10(mse)


def _high_freq_energy(img: torch.Tensor) -> float:
    """Mean squared response of a Laplacian: noise and blocking raise it."""
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return float((filter2d(img, lap) ** 2).mean())


def _blockiness(img: torch.Tensor) -> float:
    """Mean luma step across 8-pixel block borders over the mean step elsewhere: JPEG blocking raises it."""
    steps = img.mean(1).diff(dim=-1).abs().mean(dim=(0, 1))  # step between column c and c + 1
    border = torch.arange(steps.numel()) % 8 == 7
    return float(steps[border].mean() / steps[~border].mean())


def _quiet(stage: StageConfig, **changes: object) -> StageConfig:
    """A stage with only a hair of blur, no resize and the given changes: isolates one effect."""
    base = {
        "blur_sigma": (0.2, 0.2),
        "sinc_prob": 0.0,
        "kernel_list": ("iso",),
        "kernel_prob": (1.0,),
        "resize_prob": (0.0, 0.0, 1.0),
        "gaussian_noise_prob": 1.0,
        "noise_range": (0.0, 0.0),
        "jpeg_range": (100, 100),
    }
    base.update(changes)
    return dataclasses.replace(stage, **base)


def _quiet_config(**stage_changes: object) -> DegradationConfig:
    cfg = DegradationConfig()
    return dataclasses.replace(
        cfg,
        first=_quiet(cfg.first, **stage_changes),
        second=_quiet(cfg.second, **stage_changes),
        final_sinc_prob=0.0,
        sharpen_input=False,
        resize_modes=("bilinear",),
    )


# ----------------------------------------------------------------------------- kernels


def _j1_reference(x: float) -> float:
    """J1 from its power series in 60-digit decimal arithmetic: exact enough for any x < 50."""
    getcontext().prec = 60
    half, total = Decimal(repr(x)) / 2, Decimal(0)
    for m in range(120):
        total += (-1) ** m * half ** (2 * m + 1) / (math.factorial(m) * math.factorial(m + 1))
    return float(total)


def test_bessel_j1_is_accurate_on_the_whole_kernel_range() -> None:
    # Sinc taps need omega * r up to pi * 10 * sqrt(2) ~ 44.4; both sides of the series/asymptotic switch.
    xs = [0.0, 0.3, 1.0, 2.5, 5.05, 7.9, 11.0, 13.9, 14.0, 14.1, 20.0, 31.4, 44.4]
    got = bessel_j1(torch.tensor(xs, dtype=torch.float64))
    want = torch.tensor([_j1_reference(x) for x in xs], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    zeros = torch.tensor(
        [3.8317059702075123, 7.015586669815619, 10.173468135062722, 16.470630050877634], dtype=torch.float64
    )
    assert bessel_j1(zeros).abs().max() < 1e-10
    single = zeros.float()
    assert bessel_j1(single).dtype == torch.float32 and torch.equal(bessel_j1(-single), -bessel_j1(single))  # odd
    assert torch.allclose(bessel_j1(zeros / 3), torch.special.bessel_j1(zeros / 3), atol=1e-6)


@pytest.mark.parametrize("size", KERNEL_SIZES)
def test_every_kernel_is_normalised_odd_and_centred(size: int) -> None:
    kernels = [
        gaussian_kernel(size, 1.3),
        gaussian_kernel(size, 2.5, 0.7, 0.4),
        generalized_gaussian_kernel(size, 1.5, 0.9, -1.1, beta=0.6),
        plateau_kernel(size, 1.2, 2.0, 2.0, beta=1.7),
        sinc_kernel(size, math.pi / 2),
    ]
    for kernel in kernels:
        assert kernel.shape == (size, size)
        assert torch.isclose(kernel.sum(), torch.tensor(1.0), atol=1e-6)
        centre = kernel[size // 2, size // 2]
        assert centre == kernel.max()
        # Every shape is point-symmetric (so correlation == convolution and nothing shifts).
        assert torch.allclose(kernel, kernel.flip(0, 1), atol=1e-7)


def test_isotropic_kernels_have_all_symmetries_and_anisotropic_ones_do_not() -> None:
    for kernel in (
        gaussian_kernel(15, 2.0),
        generalized_gaussian_kernel(15, 2.0, beta=2.5),
        plateau_kernel(15, 2.0, beta=1.5),
        sinc_kernel(15, math.pi / 3),
    ):
        assert torch.allclose(kernel, kernel.T, atol=1e-7)
        assert torch.allclose(kernel, kernel.flip(0), atol=1e-7)
        assert torch.allclose(kernel, kernel.flip(1), atol=1e-7)
    aniso = gaussian_kernel(15, 3.0, 0.8, math.pi / 5)
    assert not torch.allclose(aniso, aniso.T, atol=1e-4)
    assert not torch.allclose(aniso, aniso.flip(0), atol=1e-4)
    # Unrotated, sigma_x stretches along columns (x) and sigma_y along rows (y).
    axis_aligned = gaussian_kernel(15, 3.0, 0.8, 0.0)
    assert torch.allclose(axis_aligned, axis_aligned.flip(0), atol=1e-7)
    assert axis_aligned[7, 10] > 100 * axis_aligned[10, 7]
    # A quarter turn swaps the axes.
    assert torch.allclose(gaussian_kernel(15, 3.0, 0.8, math.pi / 2), axis_aligned.T, atol=1e-6)


@pytest.mark.parametrize("omega", [math.pi / 2, math.pi / 3])
def test_sinc_kernel_is_a_circular_lowpass(omega: float) -> None:
    kernel = sinc_kernel(21, omega, dtype=torch.float64)
    n = 128
    gain = torch.fft.fft2(kernel, s=(n, n)).abs()
    freq = torch.fft.fftfreq(n, dtype=torch.float64) * 2 * math.pi
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    passband, stopband = gain[radius < 0.6 * omega], gain[radius > 1.4 * omega]
    assert math.isclose(gain[0, 0].item(), 1.0, abs_tol=1e-9)
    assert passband.min() > 0.8 and passband.mean() > 0.9
    assert stopband.max() < 0.1 and stopband.mean() < 0.02
    # Circular, not square: the gain at the same radius along an axis and a diagonal agrees.
    k_axis, k_diag = round(omega * 1.2 / (2 * math.pi) * n), round(omega * 1.2 / (2 * math.pi) * n / math.sqrt(2))
    assert abs(gain[k_axis, 0] - gain[k_diag, k_diag]) < 0.1


def test_generalised_and_plateau_shapes_differ_from_gaussian() -> None:
    size, sigma, c = 21, 2.0, 10
    gauss = gaussian_kernel(size, sigma, dtype=torch.float64)
    assert torch.allclose(generalized_gaussian_kernel(size, sigma, beta=1.0, dtype=torch.float64), gauss)
    peaky = generalized_gaussian_kernel(size, sigma, beta=0.5, dtype=torch.float64)
    boxy = generalized_gaussian_kernel(size, sigma, beta=3.0, dtype=torch.float64)
    plateau = plateau_kernel(size, sigma, beta=2.0, dtype=torch.float64)
    # beta < 1: a cusp at the centre and heavier tails; beta > 1: flatter top, lighter tails.
    assert peaky[c, c + 1] / peaky[c, c] < gauss[c, c + 1] / gauss[c, c]
    assert peaky[c, 0] > 100 * gauss[c, 0]
    assert boxy[c, c + 1] / boxy[c, c] > gauss[c, c + 1] / gauss[c, c]
    assert boxy[c, 0] < gauss[c, 0]
    # Plateau: flat top and Cauchy-like (polynomial) tails.
    assert plateau[c, c + 1] / plateau[c, c] > gauss[c, c + 1] / gauss[c, c]
    assert plateau[c, 0] > 100 * gauss[c, 0]
    for other in (peaky, boxy, plateau):
        assert (other - gauss).abs().max() > 1e-3


def test_pad_kernel_keeps_the_blur() -> None:
    img = torch.rand(2, 3, 30, 26, generator=_gen())
    kernel = gaussian_kernel(7, 1.2, 0.6, 0.3)
    assert torch.allclose(filter2d(img, kernel), filter2d(img, pad_kernel(kernel, 21)), atol=1e-6)


def test_random_kernels_follow_the_config_and_the_seed() -> None:
    kernels = [random_blur_kernel(_gen(seed)) for seed in range(40)]
    sides = {k.shape[-1] for k in kernels}
    assert sides <= set(KERNEL_SIZES) and len(sides) >= 4
    for kernel in kernels:
        assert torch.isclose(kernel.sum(), torch.tensor(1.0), atol=1e-6)
    assert torch.equal(random_blur_kernel(_gen(3)), kernels[3])
    # sinc_prob=1 gives sincs: negative lobes, which no Gaussian-family kernel has.
    sincs = [random_blur_kernel(_gen(seed), sinc_prob=1.0) for seed in range(5)]
    assert all(k.min() < 0 for k in sincs)
    assert all(random_mixed_kernel(_gen(seed), 13).min() >= 0 for seed in range(10))
    # Only the listed types are drawn: iso-only kernels are transposition-symmetric.
    for seed in range(10):
        k = random_mixed_kernel(_gen(seed), 11, ["iso"], [1.0])
        assert torch.allclose(k, k.T, atol=1e-7)
    final = random_sinc_kernel(_gen(1))
    assert final.shape[-1] in KERNEL_SIZES and final.min() < 0
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(8, 1.0)
    assert KERNEL_TYPES[0] == "iso"


# ----------------------------------------------------------------------------- building blocks


def test_reflect_pad_matches_numpy_even_when_wider_than_the_image() -> None:
    img = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).view(2, 3, 5, 4)
    for pad in (2, 4, 9):
        expected = np.pad(img.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
        assert np.array_equal(reflect_pad(img, pad).numpy(), expected)


def test_filter2d_applies_each_sample_its_own_kernel() -> None:
    img = torch.rand(3, 3, 24, 20, generator=_gen())
    kernels = torch.stack([gaussian_kernel(9, s) for s in (0.5, 1.5, 3.0)])
    batched = filter2d(img, kernels)
    for i in range(3):
        assert torch.allclose(batched[i : i + 1], filter2d(img[i : i + 1], kernels[i]), atol=1e-6)
    delta = torch.zeros(5, 5)
    delta[2, 2] = 1
    assert torch.equal(filter2d(img, delta), img)
    assert batched[2].std() < batched[0].std()  # more blur, less contrast


def test_noise_changes_the_image_by_its_level() -> None:
    flat = torch.full((2, 3, 64, 64), 0.5)
    noisy = add_gaussian_noise(flat, 10.0, gray=False, generator=_gen())
    assert math.isclose(float((noisy - flat).std() * 255), 10.0, rel_tol=0.05)
    gray = add_gaussian_noise(flat, 10.0, gray=True, generator=_gen())
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert add_gaussian_noise(flat, 10.0, False, _gen(1)).equal(add_gaussian_noise(flat, 10.0, False, _gen(1)))
    # Shot noise grows with brightness (variance ~ intensity) and with the scale. Its photon-count scale is
    # the number of distinct 8-bit values (rounded up to a power of two), so use an image with all 256.
    ramp = torch.linspace(0, 1, 256).view(1, 1, 1, 256).expand(2, 3, 64, 256).contiguous()
    shot = add_poisson_noise(ramp, 1.0, gray=False, generator=_gen()) - ramp
    assert 0.5 / 255 < float(shot.std()) < 0.1
    assert shot[..., 192:].std() > 1.5 * shot[..., 16:64].std()
    stronger = add_poisson_noise(ramp, 3.0, gray=False, generator=_gen()) - ramp
    assert stronger.std() > 2 * shot.std()
    shot_gray = add_poisson_noise(ramp, 1.0, gray=True, generator=_gen())
    assert torch.equal(shot_gray[:, 0], shot_gray[:, 2])
    assert noisy.min() >= 0 and noisy.max() <= 1


def test_jpeg_compress_is_8bit_lossy_and_per_sample() -> None:
    img = _photo_batch(2, zoom=1)
    low, high = jpeg_compress(img, 10), jpeg_compress(img, 95)
    for out in (low, high):
        assert out.shape == img.shape and out.dtype == img.dtype
        assert torch.equal(out * 255, (out * 255).round())
    err_low, err_high = (low - img).abs().mean(), (high - img).abs().mean()
    assert err_low > 2 * err_high > 0
    mixed = jpeg_compress(img, [10, 95])
    assert torch.equal(mixed[0], low[0]) and torch.equal(mixed[1], high[1])


def test_usm_sharpen_boosts_edges_and_leaves_flat_areas(monkeypatch: pytest.MonkeyPatch) -> None:
    img = torch.full((1, 3, 64, 64), 0.3)
    img[..., 32:] = 0.7
    sharp = usm_sharpen(img)
    assert sharp[..., 31].max() < 0.3 - 0.02 and sharp[..., 32].min() > 0.7 + 0.02  # overshoot at the step
    assert torch.allclose(sharp[..., :, :4], img[..., :, :4], atol=1e-3)  # far from the edge: unchanged
    assert sharp.min() >= 0 and sharp.max() <= 1
    flat = torch.full((1, 3, 32, 32), 0.4)
    assert torch.allclose(usm_sharpen(flat), flat, atol=1e-6)
    # The large-image (convolution) blur path agrees with the matrix path.
    photo = _photo_batch(1, zoom=1)
    fast = gaussian_blur(photo, 51, 8.0)
    monkeypatch.setattr(degradation_ops, "_MATMUL_BLUR_MAX_SIDE", 0)
    assert torch.allclose(gaussian_blur(photo, 51, 8.0), fast, atol=1e-5)


def test_random_crops_are_reproducible_and_aligned() -> None:
    lr = torch.rand(4, 3, 20, 24, generator=_gen())
    hr = lr.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # nearest upscale: exact alignment check
    hr_crop, lr_crop = random_crop_pair(hr, lr, 32, _gen(1))
    assert hr_crop.shape == (4, 3, 32, 32) and lr_crop.shape == (4, 3, 8, 8)
    assert torch.equal(hr_crop, lr_crop.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3))
    crops = random_crop(hr, (16, 40), _gen(2))
    assert crops.shape == (4, 3, 16, 40)
    assert torch.equal(crops, random_crop(hr, (16, 40), _gen(2)))
    assert not torch.equal(crops[0], crops[1])  # each sample has its own window
    with pytest.raises(ValueError, match="divisible"):
        random_crop_pair(hr, lr, 30, _gen())


# ----------------------------------------------------------------------------- the pipeline


def test_degrade_shape_range_and_8bit_levels() -> None:
    hr = torch.rand(3, 3, 50, 38, generator=_gen())
    lr = degrade(hr, 4, _gen(5))
    assert lr.shape == (3, 3, 12, 9) and lr.dtype == torch.float32
    assert lr.min() >= 0 and lr.max() <= 1
    assert torch.equal(lr * 255, (lr * 255).round())
    assert degrade(hr[:1, :, :16, :16], 2, _gen()).shape == (1, 3, 8, 8)  # small inputs: borders fold
    with pytest.raises(ValueError):
        degrade(hr[:, :2], 4, _gen())


def test_same_seed_same_bytes_other_seed_other_pairs() -> None:
    hr = _photo_batch(4, zoom=1)
    first = degrade(hr, 4, _gen(123))
    again = degrade(hr, 4, _gen(123))
    assert (first * 255).to(torch.uint8).numpy().tobytes() == (again * 255).to(torch.uint8).numpy().tobytes()
    other = degrade(hr, 4, _gen(124))
    assert not torch.equal(first, other)
    # Every sample draws its own degradation: identical inputs give different outputs.
    assert not any(torch.equal(first[0], first[i]) for i in range(1, 4))
    # The plan is the random part; one draw sequence per sample.
    plans = Degrader().plan(4, _gen(7))
    assert len({(p.first.resize_scale, p.second.jpeg_quality) for p in plans}) == 4


def test_each_sample_is_jpeg_compressed_twice_with_its_drawn_qualities(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def counting(img: torch.Tensor, quality: int) -> torch.Tensor:
        seen.append(quality)
        return jpeg_compress(img, quality)

    monkeypatch.setattr(degradation_pipeline, "jpeg_compress", counting)
    hr = torch.rand(3, 3, 32, 32, generator=_gen())
    degrade(hr, 2, _gen(4))
    plans = Degrader().plan(3, _gen(4))  # the same draws, as the plan comes first
    expected = [p.first.jpeg_quality for p in plans] + [p.second.jpeg_quality for p in plans]
    assert sorted(seen) == sorted(expected) and len(seen) == 6


def test_degraded_lr_is_worse_than_a_clean_bicubic_downscale() -> None:
    hr = _photo_batch(8)  # 192x144
    lr = degrade(hr, 4, _gen(2024))
    clean = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)

    def restored(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=hr.shape[-2:], mode="bicubic").clamp(0, 1)

    psnr_degraded, psnr_clean = _psnr(restored(lr), hr), _psnr(restored(clean), hr)
    assert psnr_degraded.mean() < psnr_clean.mean() - 4.0  # ~8 dB in practice
    assert (psnr_degraded < psnr_clean).all()
    assert _psnr(lr, clean).mean() < 35  # far from the clean LR, not a rounding difference


def test_forced_noise_and_jpeg_change_the_output() -> None:
    hr = _photo_batch(2, zoom=1)
    clean = degrade(hr, 2, _gen(9), _quiet_config())
    gaussian = degrade(hr, 2, _gen(9), _quiet_config(noise_range=(25.0, 25.0)))
    poisson = degrade(hr, 2, _gen(9), _quiet_config(gaussian_noise_prob=0.0, poisson_scale_range=(3.0, 3.0)))
    jpeg = degrade(hr, 2, _gen(9), _quiet_config(jpeg_range=(10, 10)))
    for changed in (gaussian, poisson, jpeg):
        assert (changed - clean).abs().mean() > 4 / 255
    assert _high_freq_energy(gaussian) > 4 * _high_freq_energy(clean)  # ~16x
    assert _high_freq_energy(poisson) > 4 * _high_freq_energy(clean)
    assert _blockiness(jpeg) > 1.5 * _blockiness(clean)  # ~2.2 vs ~0.9


def test_config_defaults_are_real_esrgan_x4plus() -> None:
    cfg = DegradationConfig()
    assert cfg.first.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (cfg.first.blur_sigma, cfg.second.blur_sigma) == ((0.2, 3.0), (0.2, 1.5))
    assert (cfg.first.betag_range, cfg.first.betap_range) == ((0.5, 4.0), (1.0, 2.0))
    assert (cfg.first.sinc_prob, cfg.second.sinc_prob, cfg.final_sinc_prob) == (0.1, 0.1, 0.8)
    assert (cfg.first.resize_prob, cfg.second.resize_prob) == ((0.2, 0.7, 0.1), (0.3, 0.4, 0.3))
    assert (cfg.first.resize_range, cfg.second.resize_range) == ((0.15, 1.5), (0.3, 1.2))
    assert (cfg.first.noise_range, cfg.second.noise_range) == ((1.0, 30.0), (1.0, 25.0))
    assert (cfg.first.poisson_scale_range, cfg.second.poisson_scale_range) == ((0.05, 3.0), (0.05, 2.5))
    assert (cfg.first.gaussian_noise_prob, cfg.first.gray_noise_prob, cfg.second_blur_prob) == (0.5, 0.4, 0.8)
    assert cfg.first.jpeg_range == cfg.second.jpeg_range == (30, 95)
    assert cfg.resize_modes == ("area", "bilinear", "bicubic") and cfg.kernel_sizes == KERNEL_SIZES


def test_config_round_trips_through_json_and_validates() -> None:
    for cfg in (
        DegradationConfig(),
        _quiet_config(noise_range=(3.0, 4.0)),
        DegradationConfig(second_blur_prob=0.5, kernel_sizes=(7, 9), first=StageConfig(jpeg_range=(50, 60))),
    ):
        text = json.dumps(dataclasses.asdict(cfg))
        back = DegradationConfig.from_dict(json.loads(text))
        assert back == cfg and json.dumps(back.to_dict()) == text
    assert DegradationConfig.from_dict({"second_blur_prob": 0.2}).second == DegradationConfig().second
    with pytest.raises(ConfigError, match="unknown"):
        DegradationConfig.from_dict({"blur_prob": 0.2})
    with pytest.raises(ConfigError, match="unknown"):
        DegradationConfig.from_dict({"first": {"kernel_size": 21}})
    with pytest.raises(ConfigError, match="kernel_prob"):
        StageConfig(kernel_prob=(0.5, 0.5, 0, 0, 0, 0.1))
    with pytest.raises(ConfigError, match="jpeg_range"):
        StageConfig(jpeg_range=(30, 101))
    with pytest.raises(ConfigError, match="kernel_sizes"):
        DegradationConfig(kernel_sizes=(8,))
    with pytest.raises(ConfigError, match="probability"):
        DegradationConfig(final_sinc_prob=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_degrade_on_cuda_matches_cpu_draws() -> None:
    hr = _photo_batch(4, zoom=1)
    on_cpu = degrade(hr, 4, _gen(11))
    on_gpu = degrade(hr.cuda(), 4, _gen(11))
    assert on_gpu.device.type == "cuda" and on_gpu.shape == on_cpu.shape
    # Same draws (CPU generator); only float rounding differs, which JPEG can amplify a little.
    assert (on_gpu.cpu() - on_cpu).abs().mean() < 2 / 255
    cuda_gen = torch.Generator(device="cuda").manual_seed(3)
    assert degrade(hr.cuda(), 4, cuda_gen).device.type == "cuda"
