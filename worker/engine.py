"""The model side of a worker: bytes in, encoded images out, many jobs per forward pass.

Built on ``models.pipeline``: every job's image is cut into fixed-size tiles, and tiles of
different jobs (different sizes, alphas and colour fixes) fill the same batches.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ctsr.contract import JobPayload, alpha_label
from ctsr.settings import Settings
from models import load_student
from models.errors import CTSRError
from models.imaging import LoadedImage, load_image
from models.pipeline import TileRunner, UpscaleJob, Upscaler, finish_images
from models.presets import resolve_model

from .memory import fix_mmap_threshold


class EncodeError(CTSRError):
    """The result cannot be written in the requested format (a retry would fail the same way)."""


@dataclass
class EncodedOutputs:
    images: dict[str, bytes]  # alpha label → encoded image
    width: int
    height: int


class BatchEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        fix_mmap_threshold(settings.malloc_mmap_threshold_mb)
        student = load_student(resolve_model(settings.model))
        if student.scale != settings.scale:
            raise CTSRError(
                f"the model upscales x{student.scale} but CTSR_SCALE is {settings.scale}: the gateways admit "
                "uploads by the output size they expect; set CTSR_SCALE to the model's factor on both"
            )
        self.runner = TileRunner(student, settings.device, settings.dtype, compile=settings.compile)
        self.upscaler = Upscaler(self.runner, tile=settings.tile, max_batch=settings.max_batch)
        self.forward_passes = 0

    @property
    def device(self) -> torch.device:
        return self.runner.device

    def tiles_for(self, width: int, height: int) -> int:
        """How many tiles a ``width × height`` input needs (for filling batches)."""
        return len(self.upscaler.grid(height, width))

    def decode(self, data: bytes) -> LoadedImage:
        return load_image(data, max_pixels=self.settings.max_pixels)

    def run(
        self, jobs: Sequence[tuple[JobPayload, LoadedImage]], on_batch: Callable[[int], None] | None = None
    ) -> list[torch.Tensor]:
        """SR tensors ``[A, 3, H*s, W*s]`` per job; tiles of all jobs share forward passes."""

        def progress(tiles: int) -> None:
            self.forward_passes += 1
            if on_batch:
                on_batch(tiles)

        work = [UpscaleJob(image.rgb, payload.alphas, payload.color_fix) for payload, image in jobs]
        return self.upscaler.run(work, progress=progress)

    def encode(self, payload: JobPayload, image: LoadedImage, sr: torch.Tensor) -> EncodedOutputs:
        images: dict[str, bytes] = {}
        pils = finish_images(image, sr)
        for alpha, pil in zip(payload.alphas, pils, strict=True):
            try:
                images[alpha_label(alpha)] = _encode_one(pil, payload)
            except (OSError, ValueError) as exc:
                width, height = pil.size
                raise EncodeError(f"the {width}x{height} result cannot be written as {payload.format}: {exc}") from None
        width, height = pils[0].size
        return EncodedOutputs(images, width, height)

    def warmup(self) -> float:
        """One real forward pass at the serving tile size (and its compile, if enabled)."""
        start = time.perf_counter()
        side = self.settings.tile
        self.upscaler.run([UpscaleJob(torch.rand(3, side, side), (0.0, 1.0), "wavelet")])
        return time.perf_counter() - start


def _encode_one(pil: Image.Image, payload: JobPayload) -> bytes:
    buf = io.BytesIO()
    if pil.mode == "I;16" and payload.format != "png":  # 8-bit formats: scale, don't clip
        pil = Image.fromarray((np.asarray(pil, dtype=np.uint16) // 257).astype(np.uint8), "L")
    if payload.format == "jpeg":
        pil = pil.convert("RGB")  # JPEG has no alpha channel and no 16-bit mode
        pil.save(buf, "JPEG", quality=payload.quality)
    elif payload.format == "webp":
        pil = pil if pil.mode in ("RGB", "RGBA") else pil.convert("RGBA" if "A" in pil.mode else "RGB")
        pil.save(buf, "WEBP", quality=payload.quality)
    else:
        pil.save(buf, "PNG", compress_level=1)
    return buf.getvalue()
