"""The model side of a worker: bytes in, encoded images out, many jobs per forward pass.

Built on ``models.pipeline``: every job's image is cut into fixed-size tiles, and tiles of
different jobs (different sizes, alphas and colour fixes) fill the same batches. Encoding the
results is the worker's largest piece of work beside the model, so every alpha of every job of a
batch is encoded at once in a thread pool (PNG by ``models.png``, 3x faster than Pillow's and in
bands of rows on every encoder thread at once; JPEG and WebP by Pillow; all release the GIL); on an
accelerator a job's encoding starts while the batch's later forward passes run.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ctsr.contract import JobPayload, alpha_label
from ctsr.settings import Settings
from models import load_student
from models.errors import CTSRError
from models.imaging import LoadedImage, load_image, quantized_strips, strip_rows, to_pil
from models.pipeline import TileRunner, UpscaleJob, Upscaler, output_alpha
from models.png import Band, assemble_png, deflate_band, encode_png
from models.presets import resolve_model

from .memory import TRIM_ABOVE_MB, fix_mmap_threshold, release_free_memory


class EncodeError(CTSRError):
    """The result cannot be written in the requested format (a retry would fail the same way)."""


@dataclass
class EncodedOutputs:
    images: dict[str, bytes]  # alpha label → encoded image
    width: int
    height: int


@dataclass
class Encoding:
    """A job's images being encoded on the engine's threads: per alpha, the parts being made (a
    PNG's bands of rows, or the whole encoded image) and how they join into the file."""

    payload: JobPayload
    parts: list[list[Future[Any]]]
    join: Callable[[list[Any]], bytes]
    width: int
    height: int

    def result(self) -> EncodedOutputs | EncodeError:
        """Wait for every alpha; an alpha its format cannot hold fails the job (other errors raise)."""
        try:
            images = {
                alpha_label(a): self.join([f.result() for f in futures])
                for a, futures in zip(self.payload.alphas, self.parts, strict=True)
            }
        except EncodeError as exc:
            self.cancel()  # the job has failed; its other alphas need not be encoded
            return exc
        return EncodedOutputs(images, self.width, self.height)

    def cancel(self) -> None:
        for futures in self.parts:
            for f in futures:
                f.cancel()


class BatchEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: With the threshold fixed, free heap pages go back after forward passes (worker/memory.py).
        self.trims_heap = fix_mmap_threshold(settings.malloc_mmap_threshold_mb)
        student = load_student(resolve_model(settings.model))
        if student.scale != settings.scale:
            raise CTSRError(
                f"the model upscales x{student.scale} but CTSR_SCALE is {settings.scale}: the gateways admit "
                "uploads by the output size they expect; set CTSR_SCALE to the model's factor on both"
            )
        self.runner = TileRunner(student, settings.device, settings.dtype, compile=settings.compile)
        self.max_batch = settings.max_batch or self.default_max_batch(self.runner.device)
        self.upscaler = Upscaler(self.runner, tile=settings.tile, max_batch=self.max_batch)
        self.forward_passes = 0
        self.encode_threads = settings.encode_threads or min(os.cpu_count() or 1, 8)
        self.encoders = ThreadPoolExecutor(max_workers=self.encode_threads, thread_name_prefix="ctsr-encode")

    @staticmethod
    def default_max_batch(device: torch.device) -> int:
        """Tiles per forward pass when ``CTSR_MAX_BATCH`` is unset. On a CPU one tile already keeps
        every core busy, and a batch only costs more per tile: on 2 cores the default model ran
        0.25-0.26 images/s one tile at a time and 0.22-0.23 in batches of 4 (two runs), compact
        4.8-5.0 from 1 to 4 tiles and 4.1 at 8 (``benchmarks/bench_model.py --model rrdb
        --batches 1,2,4``; ``results/batch_cpu_*.json``). An accelerator needs batches to fill."""
        return 1 if device.type == "cpu" else 8

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def encodes_during_forward(self) -> bool:
        """Start a job's encoding while the batch's later forward passes run: only where the model
        runs on an accelerator. On a CPU both would share the same cores, and torch's intra-op
        threads stall whenever an encoder thread holds one of them (on a 2-core machine the service
        at 16 clients fell from 2.36 to 2.12 images/s with it, benchmarks/bench_service.py)."""
        return self.device.type != "cpu"

    def tiles_for(self, width: int, height: int) -> int:
        """How many tiles a ``width × height`` input needs (for filling batches)."""
        return len(self.upscaler.grid(height, width))

    def decode(self, data: bytes) -> LoadedImage:
        return load_image(data, max_pixels=self.settings.max_pixels)

    def run(
        self,
        jobs: Sequence[tuple[JobPayload, LoadedImage]],
        on_batch: Callable[[int], None] | None = None,
        on_result: Callable[[int, torch.Tensor], object] | None = None,
    ) -> list[torch.Tensor]:
        """SR tensors ``[A, 3, H*s, W*s]`` per job; tiles of all jobs share forward passes.
        ``on_result(index, sr)`` gets each job's as soon as its last tile is done."""

        def progress(tiles: int) -> None:
            self.forward_passes += 1
            if self.trims_heap:
                release_free_memory(TRIM_ABOVE_MB)
            if on_batch:
                on_batch(tiles)

        work = [UpscaleJob(image.rgb, payload.alphas, payload.color_fix) for payload, image in jobs]
        return self.upscaler.run(work, progress=progress, on_result=on_result)

    def start_encoding(self, payload: JobPayload, image: LoadedImage, sr: torch.Tensor) -> Encoding:
        """Hand a job's SR tensors ``[A, 3, H, W]`` to the encoder threads, every alpha at once; a
        PNG result in bands of rows, one per encoder thread, so even one image keeps them all busy."""
        height, width = sr.shape[-2:]
        if payload.format == "png" and image.mode in ("RGB", "I;16"):
            grey, bands = image.mode == "I;16", png_bands(height, width, self.encode_threads)
            parts = [[self.encoders.submit(png_band, rgb, *rows, grey) for rows in bands] for rgb in sr]
            return Encoding(payload, parts, assemble_png, width, height)
        alpha = output_alpha(image, sr)
        whole = [[self.encoders.submit(_encode_one, rgb, image.mode, alpha, payload)] for rgb in sr]
        return Encoding(payload, whole, _only, width, height)

    def warmup(self) -> float:
        """One real forward pass at the serving tile size (and its compile, if enabled)."""
        start = time.perf_counter()
        side = self.settings.tile
        self.upscaler.run([UpscaleJob(torch.rand(3, side, side), (0.0, 1.0), "wavelet")])
        return time.perf_counter() - start


def png_bands(height: int, width: int, threads: int) -> list[tuple[int, int]]:
    """Rows ``[top, bottom)`` of an output's PNG bands: one per encoder thread, in whole strips."""
    rows = strip_rows(width)
    step = max(1, math.ceil(height / threads / rows)) * rows
    return [(top, min(top + step, height)) for top in range(0, height, step)]


def png_band(rgb: torch.Tensor, top: int, bottom: int, grey: bool) -> Band:
    """Rows ``[top, bottom)`` of one alpha's SR tensor → a deflated PNG band (in an encoder thread).
    Quantized and written a strip of rows at a time: the 8-bit image (50 MB at 4096²), a Pillow
    copy of it and an array of that are never made."""
    above = next(quantized_strips(rgb[:, top - 1 : top], grey)) if top else None
    return deflate_band(quantized_strips(rgb[:, top:bottom], grey), above)


def _only(parts: list[Any]) -> bytes:
    (image,) = parts
    return bytes(image)


def _encode_one(rgb: torch.Tensor, mode: str, alpha: torch.Tensor | None, payload: JobPayload) -> bytes:
    """One alpha's SR tensor → the encoded image (in an encoder thread)."""
    pil = to_pil(rgb, mode, alpha)
    buf = io.BytesIO()
    try:
        if pil.mode == "I;16" and payload.format != "png":  # 8-bit formats: scale, don't clip
            pil = Image.fromarray((np.asarray(pil, dtype=np.uint16) // 257).astype(np.uint8), "L")
        if payload.format == "jpeg":
            pil = pil.convert("RGB")  # JPEG has no alpha channel and no 16-bit mode
            pil.save(buf, "JPEG", quality=payload.quality)
        elif payload.format == "webp":
            pil = pil if pil.mode in ("RGB", "RGBA") else pil.convert("RGBA" if "A" in pil.mode else "RGB")
            pil.save(buf, "WEBP", quality=payload.quality)
        else:
            return encode_png(np.asarray(pil))
    except (OSError, ValueError) as exc:
        width, height = pil.size
        raise EncodeError(f"the {width}x{height} result cannot be written as {payload.format}: {exc}") from None
    return buf.getvalue()
