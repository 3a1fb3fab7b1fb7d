"""Tiling, cross-image batching, out-of-memory splitting and colour correction."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    compact_config,
    count_calls,
    make_compact,
    make_rrdb,
    make_sd21,
    photo_crop,
    photo_tensor,
    with_band_split,
)

from models import ConfigError, CTSRError, CTSRStudent
from models.archs.compact import CompactStudent
from models.color import COLOR_FIXES, adain_color_fix, apply_color_fix, check_color_fix, wavelet_color_fix
from models.imaging import quantized
from models.pipeline import JobCanvas, TileRunner, UpscaleJob, Upscaler
from models.tiling import TileGrid

# -- TileGrid ---------------------------------------------------------------------------------
GRIDS = [
    # height, width, tile, overlap, multiple
    (53, 70, 36, 16, 1),
    (64, 64, 40, 16, 1),  # regular: 64 = 40 + 24
    (100, 37, 32, 8, 1),
    (20, 14, 48, 16, 1),  # smaller than one tile
    (90, 61, 30, 12, 8),  # tile rounded up to the multiple
    (200, 150, 48, 0, 1),
]


def _coverage(grid: TileGrid, scale: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(how many tiles cover each LR pixel, summed blend weight per SR pixel) on the padded canvas."""
    ph, pw = grid.padded
    count = torch.zeros(ph, pw)
    weight = torch.zeros(1, ph * scale, pw * scale)
    for y, x in grid.boxes:
        count[y : y + grid.tile_h, x : x + grid.tile_w] += 1
        w = grid.weight(y, x, scale)
        assert w.shape == (1, grid.tile_h * scale, grid.tile_w * scale)
        weight[:, y * scale : (y + grid.tile_h) * scale, x * scale : (x + grid.tile_w) * scale] += w
    return count, weight


@pytest.mark.parametrize(("height", "width", "tile", "overlap", "multiple"), GRIDS)
def test_grid_covers_every_pixel(height: int, width: int, tile: int, overlap: int, multiple: int) -> None:
    grid = TileGrid.plan(height, width, tile, overlap, multiple)
    t = math.ceil(tile / multiple) * multiple
    # a side shorter than the tile gets a tile of its own (rounded) length: no padding to a whole tile
    assert grid.tile_h == (math.ceil(height / multiple) * multiple if height <= t else t)
    assert grid.tile_w == (math.ceil(width / multiple) * multiple if width <= t else t)
    ph, pw = grid.padded
    assert (ph, pw) == (max(height, grid.tile_h), max(width, grid.tile_w))
    assert len(grid) == len(grid.boxes) == len(set(grid.boxes))
    for y, x in grid.boxes:
        assert y >= 0 and y + grid.tile_h <= ph
        assert x >= 0 and x + grid.tile_w <= pw
    count, weight = _coverage(grid, scale=4)
    assert bool((count >= 1).all()), "every LR pixel lies in some tile"
    assert bool((weight > 0).all()), "every SR pixel gets a positive blend weight"
    # the weights are a partition of unity everywhere (also where the last tile was pushed back)
    torch.testing.assert_close(weight, torch.ones_like(weight), atol=1e-5, rtol=0)
    # neighbouring tiles overlap by at least the requested amount
    for starts, size in ((grid.ys, grid.tile_h), (grid.xs, grid.tile_w)):
        for a, b in itertools.pairwise(starts):
            assert b > a and a + size - b >= overlap


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(64, 40, 16), (112, 40, 16), (84, 36, 12), (100, 40, 10), (86, 40, 17)]
)
def test_neighbour_weights_sum_to_one(length: int, tile: int, overlap: int) -> None:
    """On a regular grid (length = tile + k * stride) the feathered weights are a partition of unity."""
    assert (length - tile) % (tile - overlap) == 0
    grid = TileGrid.plan(length, length, tile, overlap)
    assert len(grid.ys) == (length - tile) // (tile - overlap) + 1
    _, weight = _coverage(grid, scale=4)
    torch.testing.assert_close(weight, torch.ones_like(weight), atol=1e-6, rtol=0)
    # and the blend is a real ramp, not a hard seam
    first = grid.weight(0, 0, 4)[0, 0]
    assert 0 < float(first[(tile - overlap // 2) * 4]) < 1


def test_single_tile_and_image_borders_have_full_weight() -> None:
    grid = TileGrid.plan(53, 70, 0, 16, multiple=8)
    assert len(grid) == 1 and (grid.tile_h, grid.tile_w) == (56, 72)
    assert bool((grid.weight(0, 0, 4) == 1).all())
    grid = TileGrid.plan(53, 70, 36, 16)
    corner = grid.weight(0, 0, 4)[0]
    assert float(corner[0, 0]) == 1.0 and float(corner[-1, -1]) == 0.0


@pytest.mark.parametrize(("tile", "overlap"), [(32, 16), (32, 20), (20, 10), (8, 30)])
def test_overlap_of_half_a_tile_or_more_is_rejected(tile: int, overlap: int) -> None:
    with pytest.raises(ConfigError, match="less than half the tile"):
        TileGrid.plan(100, 100, tile, overlap)


def test_grid_rejects_negative_sizes_and_accepts_just_under_half() -> None:
    with pytest.raises(ConfigError):
        TileGrid.plan(10, 10, -1, 0)
    with pytest.raises(ConfigError):
        TileGrid.plan(10, 10, 8, -1)
    assert len(TileGrid.plan(100, 100, 32, 15)) == 25  # starts 0, 17, 34, 51, 68


# -- tiled == whole -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runner() -> TileRunner:
    """A small compact student whose velocity is amplified so alpha changes the output visibly."""
    return TileRunner(make_compact(velocity_gain=30.0), device="cpu")


@pytest.mark.parametrize("color_fix", ["none", "wavelet"])
def test_tiled_output_equals_whole_image(runner: TileRunner, color_fix: str) -> None:
    image = photo_tensor(70, 53)  # not a multiple of any tile below
    job = UpscaleJob(image, (0.0, 1.0), color_fix)
    (whole,) = Upscaler(runner, tile=0).run([job])
    assert whole.shape == (2, 3, 212, 280)
    assert float(whole.min()) >= 0 and float(whole.max()) <= 1
    assert float((whole[0] - whole[1]).abs().max()) > 10 / 255, "the two alphas must give different images"
    for tile in (36, 40, 48):
        upscaler = Upscaler(runner, tile=tile, overlap=16, max_batch=8)
        assert len(upscaler.canvas(job).grid) > 1
        (tiled,) = upscaler.run([job])
        assert tiled.shape == whole.shape
        assert float((tiled - whole).abs().max()) <= 2 / 255, f"tile {tile}"


def test_the_half_precision_host_canvas_moves_a_pixel_one_level_at_most(
    runner: TileRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A multi-tile image blends on the host in float16 (half the memory that grows with the
    image); quantized to 8 bits it is the float32 canvas's result but for rare one-level steps."""
    job = UpscaleJob(photo_tensor(70, 53), (0.0, 1.0), "wavelet")
    upscaler = Upscaler(runner, tile=36, overlap=16, max_batch=8)
    assert upscaler.canvas(job).dtype == torch.float16
    (half,) = upscaler.run([job])
    monkeypatch.setattr(JobCanvas, "dtype", property(lambda self: torch.float32))
    (full,) = upscaler.run([job])
    steps = np.abs(quantized(half[0]).astype(int) - quantized(full[0]).astype(int))
    assert steps.max() <= 1
    assert steps.mean() < 0.05, f"{steps.mean():.3f} of the values moved"


@pytest.mark.parametrize("path_option", [None, "path_film", "path_delta", "path_bend"])
def test_tiled_lr_skip_output_equals_whole_image(path_option: str | None) -> None:
    """The LR skip's bicubic upscaling reads past a tile's edge like a convolution does: the overlap
    hides it. An image smaller than a tile comes back exactly as whole-image inference. The path
    position the ``path_film`` / ``path_delta`` / ``path_bend`` latent carries is the same everywhere,
    tile or not."""
    options = {path_option: True} if path_option else {}
    student = make_compact(velocity_gain=30.0, upsampler="direct", lr_skip=True, **options)
    runner = TileRunner(student, device="cpu")
    for width, height, tiles in ((70, 53, (36, 48)), (30, 22, (48,))):
        job = UpscaleJob(photo_tensor(width, height), (0.0, 1.0), "none")
        (whole,) = Upscaler(runner, tile=0).run([job])
        assert float((whole[0] - whole[1]).abs().max()) > 10 / 255, "the two alphas must give different images"
        for tile in tiles:
            (tiled,) = Upscaler(runner, tile=tile, overlap=16, max_batch=8).run([job])
            assert tiled.shape == whole.shape == (2, 3, height * 4, width * 4)
            assert float((tiled - whole).abs().max()) <= 2 / 255, f"{width}x{height}, tile {tile}"


def test_tiled_band_split_output_equals_whole_image() -> None:
    """Band-split decoding blurs each tile's output; the overlap's discarded margin hides the blur's
    edges, so tiles still add up to the whole image."""
    runner = TileRunner(with_band_split(make_compact(velocity_gain=30.0), sigma=3.0, lead=4.0), device="cpu")
    job = UpscaleJob(photo_tensor(70, 53), (0.0, 0.5, 1.0), "none")
    (whole,) = Upscaler(runner, tile=0).run([job])
    for tile in (36, 48):
        (tiled,) = Upscaler(runner, tile=tile, overlap=16, max_batch=8).run([job])
        assert float((tiled - whole).abs().max()) <= 2 / 255, f"tile {tile}"


def test_tiles_of_different_images_share_batches(runner: TileRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [
        UpscaleJob(photo_tensor(70, 53), (0.0, 1.0), "wavelet"),
        UpscaleJob(photo_crop(30, 20, 40, 36), (0.5,), "none"),
        UpscaleJob(photo_crop(5, 40, 36, 36), (0.25, 1.0), "adain"),
    ]  # every tile 36×36: tiles batch by shape (a side under the tile gets its own, see below)
    upscaler = Upscaler(runner, tile=36, overlap=16, max_batch=8)
    tiles = [len(upscaler.canvas(job).grid) for job in jobs]
    assert tiles == [6, 2, 1]

    alone = [upscaler.run([job])[0] for job in jobs]
    batch_sizes = count_calls(monkeypatch, runner.student, "generate", lambda lr, alphas, **kw: lr.shape[0])
    progress: list[int] = []
    together = upscaler.run(jobs, progress=progress.append)

    assert batch_sizes.calls == [8, 1]  # 9 tiles of 3 images in 2 forward passes
    assert batch_sizes.count == math.ceil(sum(tiles) / 8) < sum(tiles)
    assert sum(progress) == sum(tiles)
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a.shape == b.shape == (len(jobs[i].alphas), 3, jobs[i].image.shape[1] * 4, jobs[i].image.shape[2] * 4)
        assert float((a - b).abs().max()) <= 1e-5, f"job {i}"
    # each job really got its own alphas: job 2's alpha-1 output is not its alpha-0.25 output
    assert float((together[2][0] - together[2][1]).abs().max()) > 1e-2


def test_each_result_is_handed_over_once_its_last_tile_is_in(runner: TileRunner) -> None:
    """``on_result``: a one-tile job's result comes after the first forward pass, while the
    six-tile job's batches still run; every job once, equal to what ``run`` returns."""
    jobs = [UpscaleJob(photo_crop(5, 30, 36, 36), (0.5,), "none"), UpscaleJob(photo_tensor(70, 53), (0.0, 1.0), "none")]
    events: list[tuple[str, int]] = []
    results = Upscaler(runner, tile=36, overlap=16, max_batch=2).run(
        jobs, progress=lambda n: events.append(("pass", n)), on_result=lambda i, t: events.append(("result", i))
    )
    assert events == [("pass", 2), ("result", 0), ("pass", 2), ("pass", 2), ("pass", 1), ("result", 1)]
    alone = Upscaler(runner, tile=36, overlap=16, max_batch=2).run(jobs)
    assert all(torch.equal(a, b) for a, b in zip(alone, results, strict=True))


def test_image_smaller_than_tile(runner: TileRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """No padding to a whole tile: the model sees (and is charged for) the image itself, and the
    result equals whole-image inference everywhere, borders included (what `ctsr eval` measures)."""
    image = photo_crop(11, 13, 21, 14)
    shapes = count_calls(monkeypatch, runner.student, "generate", lambda lr, alphas, **kw: tuple(lr.shape[-2:]))
    (out,) = Upscaler(runner, tile=48, overlap=16).run([UpscaleJob(image, (0.0, 1.0), "wavelet")])
    assert shapes.calls == [(14, 21)]
    assert out.shape == (2, 3, 56, 84)
    (whole,) = Upscaler(runner, tile=0).run([UpscaleJob(image, (0.0, 1.0), "wavelet")])
    assert float((out - whole).abs().max()) <= 1e-5


def test_image_narrower_than_tile_keeps_its_borders(runner: TileRunner) -> None:
    """Longer than a tile one way, shorter the other: tiled only along the long side."""
    image = photo_crop(3, 7, 90, 20)
    upscaler = Upscaler(runner, tile=40, overlap=16)
    grid = upscaler.canvas(UpscaleJob(image)).grid
    assert (grid.tile_h, grid.tile_w, len(grid.ys)) == (20, 40, 1) and len(grid.xs) > 1
    (out,) = upscaler.run([UpscaleJob(image, (0.5,), "wavelet")])
    (whole,) = Upscaler(runner, tile=0).run([UpscaleJob(image, (0.5,), "wavelet")])
    diff = (out - whole).abs()
    assert float(diff[..., :4, :].max()) <= 2 / 255 and float(diff[..., -4:, :].max()) <= 2 / 255
    assert float(diff.mean()) <= 0.5 / 255


def test_canvas_refuses_partial_result(runner: TileRunner) -> None:
    upscaler = Upscaler(runner, tile=36, overlap=16)
    canvas: JobCanvas = upscaler.canvas(UpscaleJob(photo_tensor(70, 53), (0.5,), "none"))
    works = list(canvas.works())
    assert len(works) == len(canvas.grid) == 6
    assert all(tuple(w.lr.shape) == (3, 36, 36) for w in works)
    for work, out in zip(works[:-1], runner.run(works[:-1]), strict=True):
        canvas.add(work, out)
    assert not canvas.done
    with pytest.raises(RuntimeError, match="1 tile"):
        canvas.result()
    canvas.add(works[-1], runner.run(works[-1:])[0])
    assert canvas.result().shape == (1, 3, 53 * 4, 70 * 4)
    with pytest.raises(RuntimeError, match="already taken"):  # made in place, so there is only one
        canvas.result()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alphas": (1.5,)}, "alpha must be in"),
        ({"alphas": (float("nan"),)}, "alpha must be in"),
        ({"alphas": ()}, "at least one alpha"),
        ({"color_fix": "sharpen"}, "unknown colour fix"),
        ({"image": torch.zeros(1, 8, 8)}, "expected a"),
    ],
)
def test_upscale_job_validation(kwargs: dict, match: str) -> None:
    args = {"image": torch.zeros(3, 8, 8), "alphas": (0.5,), "color_fix": "none", **kwargs}
    with pytest.raises(ConfigError, match=match):
        UpscaleJob(**args)


def test_upscaler_rejects_zero_batch(runner: TileRunner) -> None:
    with pytest.raises(ConfigError, match="max_batch"):
        Upscaler(runner, max_batch=0)


class MultipleOf8(CompactStudent):
    size_multiple = 8


def test_inputs_are_padded_to_the_size_multiple(monkeypatch: pytest.MonkeyPatch) -> None:
    student = MultipleOf8(compact_config())
    runner = TileRunner(student, device="cpu")
    shapes = count_calls(monkeypatch, runner.student, "encode", lambda lr: tuple(lr.shape[-2:]))
    image = photo_tensor(70, 53)
    (whole,) = Upscaler(runner, tile=0).run([UpscaleJob(image, (0.5,), "none")])
    (tiled,) = Upscaler(runner, tile=30, overlap=12).run([UpscaleJob(image, (0.5,), "none")])
    assert shapes.calls[0] == (56, 72)
    assert set(shapes.calls[1:]) == {(32, 32)}
    assert whole.shape == tiled.shape == (1, 3, 212, 280)


def test_sd21_runs_through_the_pipeline() -> None:
    """The runner fuses the adapters; the result still matches the unfused student."""
    student = make_sd21()
    image = photo_crop(3, 4, 13, 9)
    with torch.no_grad():
        expected = student(image[None].expand(2, -1, -1, -1), torch.tensor([0.0, 1.0])).clamp(0, 1)
    runner = TileRunner(student, device="cpu")
    assert student.unet_velocity is not None
    (out,) = Upscaler(runner, tile=0).run([UpscaleJob(image, (0.0, 1.0), "none")])
    assert out.shape == (2, 3, 36, 52)
    assert float((out - expected).abs().max()) <= 1e-4
    assert float((out[0] - out[1]).abs().max()) > 1e-2


@pytest.mark.parametrize(
    "make",
    [lambda: make_compact(velocity_gain=30.0), make_rrdb],  # rrdb: its tail's transposed convs in bf16
    ids=["compact", "rrdb"],
)
def test_bf16_on_cpu_returns_float32_close_to_fp32(make: Callable[[], CTSRStudent]) -> None:
    image = photo_tensor(40, 30)
    job = UpscaleJob(image, (0.0, 1.0), "wavelet")
    (fp32,) = Upscaler(TileRunner(make(), device="cpu"), tile=36, overlap=16).run([job])
    runner = TileRunner(make(), device="cpu", dtype="bf16")
    assert next(runner.student.parameters()).dtype == torch.bfloat16
    (bf16,) = Upscaler(runner, tile=36, overlap=16).run([job])
    assert bf16.dtype == fp32.dtype and bf16.shape == fp32.shape  # the canvas's, never the model's bf16
    assert float((bf16 - fp32).abs().mean()) < 0.01
    assert float((bf16 - fp32).abs().max()) < 0.15


# -- out of memory ------------------------------------------------------------------------------
class OOMAboveBatch(CompactStudent):
    """A real compact student whose encode runs out of memory above ``limit`` samples."""

    limit = 2

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        if lr.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return super().encode(lr)


def _oom_runner(limit: int, reference: CompactStudent) -> TileRunner:
    student = OOMAboveBatch(compact_config())
    student.limit = limit
    student.load_state_dict(reference.state_dict())
    return TileRunner(student, device="cpu")


def _six_tiles() -> list:
    reference = make_compact(velocity_gain=30.0)
    upscaler = Upscaler(TileRunner(reference, device="cpu"), tile=36, overlap=16)
    works = list(upscaler.canvas(UpscaleJob(photo_tensor(70, 53), (0.0, 0.7), "wavelet")).works())
    assert len(works) == 6
    return reference, upscaler.runner, works


def test_out_of_memory_splits_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, ref_runner, works = _six_tiles()
    expected = ref_runner.run(works)
    assert ref_runner.oom_retries == 0

    runner = _oom_runner(2, reference)
    sizes = count_calls(monkeypatch, runner.student, "generate", lambda lr, alphas, **kw: lr.shape[0])
    result = runner.run(works)
    assert runner.oom_retries > 0
    assert sizes.calls[0] == 6  # first tried as one batch
    assert sum(s for s in sizes.calls if s <= 2) == 6, "every tile ran exactly once in a batch that fit"
    assert len(result) == len(expected) == 6
    for got, want in zip(result, expected, strict=True):
        assert got.shape == want.shape == (2, 3, 144, 144)
        assert float((got - want).abs().max()) <= 1e-5


def test_out_of_memory_on_a_single_tile_is_a_user_error() -> None:
    reference, _, works = _six_tiles()
    runner = _oom_runner(0, reference)
    with pytest.raises(CTSRError) as info:
        runner.run(works)
    assert "smaller tile" in str(info.value)
    assert "36x36" in str(info.value)
    assert runner.oom_retries > 0


def test_other_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    reference, _, works = _six_tiles()
    runner = TileRunner(reference, device="cpu")

    def broken(lr: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch somewhere")

    monkeypatch.setattr(runner.student, "encode", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        runner.run(works)
    assert runner.oom_retries == 0


# -- colour fix ---------------------------------------------------------------------------------
def _lr_and_up() -> tuple[torch.Tensor, torch.Tensor]:
    lr = photo_tensor(24, 18)[None]
    up = F.interpolate(lr, size=(72, 96), mode="bicubic", align_corners=False).clamp(0, 1)
    return lr, up


def _channel_mean_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.mean((2, 3)) - b.mean((2, 3))).abs().max())


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_colour_fix_removes_a_colour_cast(method: str) -> None:
    lr, up = _lr_and_up()
    shifted = up + torch.tensor([0.2, -0.1, 0.15]).view(1, 3, 1, 1)
    assert _channel_mean_error(shifted, up) >= 0.1
    fixed = apply_color_fix(shifted, lr, [method])
    assert _channel_mean_error(fixed, up) < 0.01
    direct = wavelet_color_fix(shifted, lr) if method == "wavelet" else adain_color_fix(shifted, up)
    assert _channel_mean_error(direct, up) < 0.01


def test_colour_fix_none_leaves_output_alone() -> None:
    lr, up = _lr_and_up()
    shifted = up + 0.2
    assert torch.equal(apply_color_fix(shifted, lr, ["none"]), shifted)


def test_wavelet_keeps_high_frequency_detail() -> None:
    lr, up = _lr_and_up()
    yy, xx = torch.meshgrid(torch.arange(72), torch.arange(96), indexing="ij")
    detail = ((yy + xx) % 2 * 2 - 1).float().mul(0.05).expand(1, 3, -1, -1)  # a pixel checkerboard
    fixed = wavelet_color_fix(up + 0.2 + detail, lr)
    recovered = (fixed - up)[..., 8:-8, 8:-8]
    assert float((recovered - detail[..., 8:-8, 8:-8]).abs().max()) < 0.01
    assert _channel_mean_error(fixed, up) < 0.01


def test_wavelet_at_lr_size_matches_the_full_size_pyramid() -> None:
    """The fix runs its pyramid at LR size; on a real photo it stays within a level of 255 of the
    textbook version (five à-trous levels on the output-size difference to the bicubic input)."""
    hr = photo_tensor(192, 144)[None]
    lr = F.interpolate(hr, scale_factor=0.25, mode="area") + torch.tensor([0.05, -0.03, 0.02]).view(1, 3, 1, 1)
    ref = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    low = ref - hr
    for d in (1, 2, 4, 8, 16):
        low = F.pad(low, (d, d, d, d), mode="replicate")
        low = (low[..., :, : -2 * d] + 2 * low[..., :, d:-d] + low[..., :, 2 * d :]) / 4
        low = (low[..., : -2 * d, :] + 2 * low[..., d:-d, :] + low[..., 2 * d :, :]) / 4
    textbook = hr + low
    fixed = wavelet_color_fix(hr, lr)
    diff = (fixed - textbook).abs() * 255
    assert float(diff.mean()) < 0.1 and float(diff.max()) < 2
    assert float((fixed - hr).abs().mean() * 255) > 5  # it did move the colours (the cast)
    with pytest.raises(ValueError, match="not a whole multiple"):
        wavelet_color_fix(hr[..., :-1], lr)


def test_colour_fix_leaves_its_input_alone() -> None:
    lr, up = _lr_and_up()
    out = (up + 0.2).expand(3, -1, -1, -1).contiguous()
    before = out.clone()
    apply_color_fix(out, lr.expand(3, -1, -1, -1), ["wavelet", "adain", "none"])
    apply_color_fix(out, lr.expand(3, -1, -1, -1), ["wavelet"] * 3)
    assert torch.equal(out, before)


def test_colour_fix_per_sample_methods() -> None:
    lr, up = _lr_and_up()
    lr3, shifted = lr.expand(3, -1, -1, -1), (up + 0.2).expand(3, -1, -1, -1)
    fixed = apply_color_fix(shifted, lr3, ["wavelet", "adain", "none"])
    for i, method in enumerate(["wavelet", "adain", "none"]):
        alone = apply_color_fix(shifted[i : i + 1], lr3[i : i + 1], [method])
        torch.testing.assert_close(fixed[i : i + 1], alone, atol=1e-6, rtol=0)
    assert _channel_mean_error(fixed[2:], up) > 0.19


def test_unknown_colour_fix_is_a_config_error() -> None:
    assert all(check_color_fix(name) == name for name in COLOR_FIXES)
    with pytest.raises(ConfigError, match="unknown colour fix 'histogram'"):
        check_color_fix("histogram")
