"""Tiled, batched inference: any image size in bounded memory, tiles of many images per batch.

Three pieces, each usable on its own (the service's worker drives the lower two directly):

* :class:`JobCanvas` — one image and its alphas: cuts it into :class:`TileWork` items and blends
  the tiles' outputs back together;
* :class:`TileRunner` — runs a list of equally sized tiles, each with its own alphas and colour
  fix, through the student in one batch; on CUDA out-of-memory it splits the batch and retries;
* :class:`Upscaler` — the two together for a list of jobs (what the CLI uses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .color import apply_color_fix, check_color_fix
from .defaults import DEFAULT_ALPHA, DEFAULT_COLOR_FIX, DEFAULT_OVERLAP, DEFAULT_TILE
from .device import is_out_of_memory, resolve_device, resolve_dtype
from .errors import ConfigError, CTSRError
from .imaging import LoadedImage, to_pil, upscale_alpha
from .student import CTSRStudent
from .tiling import TileGrid


def check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    if not alphas:
        raise ConfigError("at least one alpha is needed")
    for a in alphas:
        if not (0.0 <= float(a) <= 1.0):  # also rejects NaN
            raise ConfigError(f"alpha must be in [0, 1], got {a}")
    return tuple(float(a) for a in alphas)


@dataclass
class UpscaleJob:
    """One LR image (``[3, H, W]`` in [0, 1]) to upscale at one or more alphas."""

    image: torch.Tensor
    alphas: Sequence[float] = (DEFAULT_ALPHA,)
    color_fix: str = DEFAULT_COLOR_FIX
    tag: Any = None  # the caller's handle, carried through untouched

    def __post_init__(self) -> None:
        self.alphas = check_alphas(self.alphas)
        check_color_fix(self.color_fix)
        if self.image.dim() != 3 or self.image.shape[0] != 3:
            raise ConfigError(f"expected a [3, H, W] image tensor, got {tuple(self.image.shape)}")


@dataclass
class TileWork:
    """One LR tile of one job, with everything needed to run it and put its output back."""

    lr: torch.Tensor  # [3, th, tw]
    alphas: Sequence[float]  # the job's (a tuple: UpscaleJob checks and normalises them)
    color_fix: str
    canvas: JobCanvas
    box: tuple[int, int]


@dataclass
class JobCanvas:
    """Accumulates the blended SR tiles of one job; ``result()`` once ``done`` (only once: it is
    made in place in the canvas's own buffer)."""

    job: UpscaleJob
    grid: TileGrid
    scale: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = len(self.grid)
        self._sum: torch.Tensor | None = None  # allocated on the first tile (multi-tile grids)
        self._single: torch.Tensor | None = None  # a one-tile grid needs no blending buffers

    @staticmethod
    def nbytes(grid: TileGrid, scale: int, alphas: int) -> int:
        """Bytes of the blending buffer for ``grid`` on an accelerator (float32; on the host, half)."""
        ph, pw = grid.padded
        return alphas * 3 * ph * scale * pw * scale * 4

    @property
    def dtype(self) -> torch.dtype:
        """Half precision on the host, where the canvas is what grows with the image: a 4096² result
        takes 100 MB instead of 201, and a pixel lands at most one level (of 255) from where a
        float32 canvas puts it (``tests/test_pipeline.py``). Float32 on an accelerator, where
        only canvases under ``Upscaler.canvas_limit`` stay."""
        return torch.float16 if self.device.type == "cpu" else torch.float32

    def works(self) -> Iterator[TileWork]:
        image = self.job.image
        ph, pw = self.grid.padded
        pad_h, pad_w = ph - self.grid.height, pw - self.grid.width
        if pad_h or pad_w:
            mode = "reflect" if pad_h < self.grid.height and pad_w < self.grid.width else "replicate"
            image = F.pad(image[None], (0, pad_w, 0, pad_h), mode=mode)[0]
        th, tw = self.grid.tile_h, self.grid.tile_w
        for y, x in self.grid.boxes:
            yield TileWork(image[:, y : y + th, x : x + tw], self.job.alphas, self.job.color_fix, self, (y, x))

    def add(self, work: TileWork, output: torch.Tensor) -> None:
        """Blend one tile's ``[A, 3, th*s, tw*s]`` output in."""
        output = output.to(self.device, torch.float32)
        self.remaining -= 1
        if len(self.grid) == 1:
            self._single = output
            return
        if self._sum is None:
            ph, pw = self.grid.padded
            s, a = self.scale, len(self.job.alphas)
            self._sum = torch.zeros(a, 3, ph * s, pw * s, device=self.device, dtype=self.dtype)
        s, (y, x) = self.scale, work.box
        rows, cols = slice(y * s, (y + self.grid.tile_h) * s), slice(x * s, (x + self.grid.tile_w) * s)
        self._sum[:, :, rows, cols] += output * self.grid.weight(y, x, s).to(self.device)

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def result(self) -> torch.Tensor:
        """``[A, 3, H*s, W*s]`` in [0, 1], on the canvas device: float32, or float16 where
        several tiles were blended on the host (``dtype``)."""
        if not self.done:
            raise RuntimeError(f"{self.remaining} tile(s) still missing")
        h, w = self.grid.height * self.scale, self.grid.width * self.scale
        if self._single is not None:
            return self._single[..., :h, :w].clamp(0, 1)
        if self._sum is None:
            raise RuntimeError("the result was already taken")
        # The weights sum to one, so the sum is the result; clamped in place (a second
        # whole-image float buffer would double the canvas's peak memory).
        out, self._sum = self._sum[..., :h, :w].clamp_(0, 1), None
        return out


class TileRunner:
    """Runs batches of equally sized tiles through a resident student on one device."""

    def __init__(
        self,
        student: CTSRStudent,
        device: str | torch.device = "auto",
        dtype: str = "auto",
        *,
        compile: bool = False,
    ) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # NHWC: oneDNN (CPU) and cuDNN (GPU) run these convolutions faster in it; on this 2-core
        # CPU the bundled model is 17-24 % faster and a 5-alpha sweep ~30 % (the 4x-resolution tail
        # gains most), identical to 2e-6 (benchmarks/bench_teachers.py runs both layouts).
        self.channels_last = self.device.type in ("cpu", "cuda")
        student.prepare_for_inference()
        student.to(self.device, self.dtype).eval().requires_grad_(False)
        if self.channels_last:
            student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch accepts it; its stubs omit it
        if compile:
            for stage in ("encode", "velocity", "decode"):
                setattr(student, stage, torch.compile(getattr(student, stage), dynamic=False))
        self.student = student
        self.scale = student.scale
        self.oom_retries = 0

    def _to_device(self, lr: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            lr = lr.pin_memory().to(self.device, non_blocking=True)
        lr = lr.to(self.device, self.dtype)
        return lr.contiguous(memory_format=torch.channels_last) if self.channels_last else lr

    @torch.inference_mode()
    def _forward(self, works: Sequence[TileWork], decode_batch: int) -> list[torch.Tensor]:
        lr = self._to_device(torch.stack([w.lr for w in works]))
        outputs = self.student.generate(lr, [w.alphas for w in works], decode_batch=decode_batch)
        flat = torch.cat(outputs)
        methods = [w.color_fix for w in works for _ in w.alphas]
        sources = torch.repeat_interleave(lr, torch.tensor([len(w.alphas) for w in works], device=lr.device), 0)
        fixed = apply_color_fix(flat, sources, methods)
        return list(fixed.split([len(w.alphas) for w in works]))

    def run(self, works: Sequence[TileWork], decode_batch: int | None = None) -> list[torch.Tensor]:
        """Outputs ``[len(w.alphas), 3, th*s, tw*s]`` (float, on the device), one per work."""
        if not works:
            return []
        decode_batch = decode_batch or len(works)
        try:
            return self._forward(works, decode_batch)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
        # Retry only here, outside the except block: the exception's traceback keeps the failed
        # attempt's activations alive, so retrying inside it would run out of memory again.
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(works) == 1 and decode_batch == 1:
            h, w = works[0].lr.shape[1:]
            raise CTSRError(f"out of memory on a single {h}x{w} tile; use a smaller tile")
        self.oom_retries += 1
        if len(works) == 1:
            return self.run(works, decode_batch=1)
        half = len(works) // 2
        return self.run(works[:half], decode_batch) + self.run(works[half:], decode_batch)


class Upscaler:
    """Tiled, batched upscaling of many images at once (the CLI's engine)."""

    def __init__(
        self,
        runner: TileRunner,
        tile: int = DEFAULT_TILE,
        overlap: int | None = None,
        max_batch: int = 4,
        canvas_device: str | torch.device = "auto",
        canvas_limit: int = 1 << 30,
    ) -> None:
        """``canvas_device="auto"`` blends on the runner's GPU while a job's buffers stay under
        ``canvas_limit`` bytes (large images blend in host memory, so GPU memory stays bounded)."""
        if max_batch < 1:
            raise ConfigError("max_batch must be >= 1")
        if overlap is None:  # the default, shrunk for small tiles so it stays under half a tile
            overlap = min(DEFAULT_OVERLAP, tile // 4)
        self.runner, self.tile, self.overlap, self.max_batch = runner, tile, overlap, max_batch
        self.canvas_device = None if canvas_device == "auto" else torch.device(canvas_device)
        self.canvas_limit = canvas_limit

    def grid(self, height: int, width: int) -> TileGrid:
        """Where the tiles of a ``height × width`` LR image go (no pixels needed)."""
        return TileGrid.plan(height, width, self.tile, self.overlap, self.runner.student.size_multiple)

    def canvas(self, job: UpscaleJob) -> JobCanvas:
        _, h, w = job.image.shape
        grid = self.grid(h, w)
        device = self.canvas_device
        if device is None:
            small = JobCanvas.nbytes(grid, self.runner.scale, len(job.alphas)) <= self.canvas_limit
            device = self.runner.device if small else torch.device("cpu")
        return JobCanvas(job, grid, self.runner.scale, device)

    def run(
        self,
        jobs: Sequence[UpscaleJob],
        progress: Callable[[int], object] | None = None,
        on_result: Callable[[int, torch.Tensor], object] | None = None,
    ) -> list[torch.Tensor]:
        """One ``[A, 3, H*s, W*s]`` CPU tensor per job (float16 if blended on the host from several
        tiles: ``JobCanvas.dtype``); tiles of all jobs share batches.

        ``progress(tiles)`` follows every forward pass; ``on_result(index, tensor)`` gets each
        job's result as soon as its last tile is in, while later batches still run (a worker
        encodes it meanwhile), with one device synchronisation per forward pass at most."""
        canvases = [self.canvas(job) for job in jobs]
        results: list[torch.Tensor | None] = [None] * len(jobs)
        position = {id(c): i for i, c in enumerate(canvases)}
        pending: dict[tuple[int, ...], list[TileWork]] = {}  # tiles by shape: each batch has one

        def flush(key: tuple[int, ...]) -> None:
            works = pending.pop(key)
            for work, out in zip(works, self.runner.run(works, self.max_batch), strict=True):
                work.canvas.add(work, out)
            if progress:
                progress(len(works))
            if on_result:
                done = sorted({position[id(w.canvas)] for w in works if w.canvas.done})
                for i, tensor in zip(done, _to_host([canvases[i].result() for i in done]), strict=True):
                    results[i] = tensor
                    on_result(i, tensor)

        for canvas in canvases:
            for work in canvas.works():
                key = tuple(work.lr.shape[1:])
                pending.setdefault(key, []).append(work)
                if len(pending[key]) >= self.max_batch:
                    flush(key)
        for key in list(pending):
            flush(key)
        rest = [i for i, r in enumerate(results) if r is None]
        for i, tensor in zip(rest, _to_host([canvases[i].result() for i in rest]), strict=True):
            results[i] = tensor
        return [r for r in results if r is not None]

    def upscale_image(
        self, image: LoadedImage, alphas: Sequence[float] = (DEFAULT_ALPHA,), color_fix: str = DEFAULT_COLOR_FIX
    ) -> list[Any]:
        """A loaded image → one Pillow image per alpha, in the input's mode (alpha recombined)."""
        (out,) = self.run([UpscaleJob(image.rgb, alphas, color_fix)])
        return finish_images(image, out)


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device → CPU for a list of results with one synchronisation instead of one per tensor."""
    devices = {t.device for t in tensors if t.is_cuda}
    if not devices:
        return tensors
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) if t.is_cuda else t for t in tensors]
    for dst, src in zip(host, tensors, strict=True):
        if src.is_cuda:
            dst.copy_(src, non_blocking=True)
    for device in devices:
        torch.cuda.synchronize(device)
    return host


def finish_images(image: LoadedImage, out: torch.Tensor) -> list[Any]:
    """SR tensors ``[A, 3, H', W']`` of ``image`` → Pillow images with its alpha and mode restored."""
    alpha = output_alpha(image, out)
    return [to_pil(rgb, image.mode, alpha) for rgb in out]


def output_alpha(image: LoadedImage, out: torch.Tensor) -> torch.Tensor | None:
    """The input's alpha channel at the size of its SR tensors ``out`` (None: it has none)."""
    return upscale_alpha(image.alpha, (out.shape[-2], out.shape[-1])) if image.alpha is not None else None
