"""Upload checks done at the edge, before anything is queued or stored.

The body is counted while it streams in (an oversized upload is cut off, not read to the end);
the image is identified from its header by Pillow with the decompression-bomb guard armed, so
a 50 KB file claiming 100k×100k pixels never allocates anything.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile, UnidentifiedImageError

from ctsr.contract import (
    COLOR_FIXES,
    DEFAULT_ALPHA,
    DEFAULT_COLOR_FIX,
    DEFAULT_FORMAT,
    DEFAULT_QUALITY,
    FORMAT_MAX_SIDE,
    OUTPUT_FORMATS,
    QUALITY_RANGE,
    alpha_label,
)
from ctsr.settings import Settings

from .errors import APIError

#: Formats decoded by the worker; everything else is refused with 415.
ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "MPO"}
MIN_SIDE = 8

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


class BodyTooLarge(Exception):
    pass


def limited_receive(receive: Receive, limit: int) -> Receive:
    """An ASGI ``receive`` that raises :class:`BodyTooLarge` once ``limit`` body bytes passed."""
    seen = 0

    async def wrapped() -> MutableMapping[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge
        return message

    return wrapped


@dataclass
class UpscaleOptions:
    alphas: list[float]
    format: str
    quality: int
    color_fix: str


#: Plain ASCII decimals: Python's float()/int() also take Unicode digits ("٠.٥") and underscores
#: ("1_0"), which no client means and no other implementation of this API would accept.
DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
INTEGER = re.compile(r"[+-]?[0-9]+")


def parse_alpha(raw: Any) -> float:
    if not isinstance(raw, str) or not DECIMAL.fullmatch(raw.strip()):
        raise APIError(422, "invalid_alpha", f"alpha must be a number in [0, 1], got {str(raw)[:32]!r}")
    value = float(raw)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise APIError(422, "invalid_alpha", f"alpha must be in [0, 1], got {str(raw)[:32]}")
    return value + 0.0  # -0.0 → 0.0: "-0" would otherwise get its own label ("-0") next to "0"


def parse_options(form: Any, settings: Settings) -> UpscaleOptions:
    raw_alphas = form.getlist("alpha")
    if len(raw_alphas) > settings.max_alphas:
        raise APIError(422, "too_many_alphas", f"at most {settings.max_alphas} alpha values per request")
    alphas: list[float] = []
    for raw in raw_alphas:
        value = parse_alpha(raw)
        if alpha_label(value) in {alpha_label(a) for a in alphas}:
            raise APIError(422, "invalid_alpha", f"alpha {raw} repeats another once rounded to 3 decimals")
        alphas.append(value)
    fmt = str(form.get("format") or DEFAULT_FORMAT).lower()
    if fmt not in OUTPUT_FORMATS:
        raise APIError(422, "invalid_format", f"format must be one of {', '.join(OUTPUT_FORMATS)}")
    low, high = QUALITY_RANGE
    raw_quality = form.get("quality") or str(DEFAULT_QUALITY)
    if not isinstance(raw_quality, str) or not INTEGER.fullmatch(raw_quality.strip()):
        raise APIError(422, "invalid_quality", f"quality must be an integer in [{low}, {high}]")
    quality = int(raw_quality)
    if not low <= quality <= high:
        raise APIError(422, "invalid_quality", f"quality must be an integer in [{low}, {high}]")
    color_fix = str(form.get("color_fix") or DEFAULT_COLOR_FIX)
    if color_fix not in COLOR_FIXES:
        raise APIError(422, "invalid_color_fix", f"color_fix must be one of {', '.join(COLOR_FIXES)}")
    return UpscaleOptions(alphas or [DEFAULT_ALPHA], fmt, quality, color_fix)


def _orientation(exif: bytes | None) -> int:
    """The EXIF orientation tag in raw EXIF bytes (1 when absent)."""
    if not exif:
        return 1
    parsed = Image.Exif()
    parsed.load(exif)
    return int(parsed.get(0x0112, 1))


def _jpeg_extent(img: ImageFile.ImageFile, data: bytes) -> None:
    """Opening stops at the first scan; without an end-of-image marker after it the file was cut
    short, and the worker's decoder refuses it."""
    if img.fp is not None and data.rfind(b"\xff\xd9", img.fp.tell()) < 0:
        raise ValueError("no end-of-image marker: truncated JPEG")


def _bmp_extent(img: ImageFile.ImageFile, data: bytes) -> None:
    """Uncompressed: ``height`` rows of the stride Pillow reads, from the pixel offset, the last
    one without its padding (Pillow reads a file that leaves it out). Run-length coded: the coded
    size the header states (``biSizeImage``), where it states one."""
    codec, _, offset, args = img.tile[0]
    stride = args[1] if codec == "raw" and isinstance(args, tuple) and isinstance(args[1], int) else 0
    header = int.from_bytes(data[14:18], "little")
    if stride:
        bits = int.from_bytes(data[28:30] if header >= 40 else data[24:26], "little")
        needed = offset + stride * (img.size[1] - 1) + min(stride, (img.size[0] * bits + 7) // 8)
    else:
        needed = offset + (int.from_bytes(data[34:38], "little") if header >= 40 else 0)
    if needed > len(data):
        raise ValueError(f"truncated BMP: pixel data needs {needed} bytes, the file has {len(data)}")


def _tiff_extent(img: ImageFile.ImageFile, data: bytes) -> None:
    """The first page's strips (or tiles) as its directory places them: offsets + byte counts."""
    tags = img.tag_v2  # type: ignore[attr-defined]
    offsets, counts = tags.get(273) or tags.get(324), tags.get(279) or tags.get(325)
    if offsets is not None and counts is not None:
        offsets = offsets if isinstance(offsets, tuple) else (offsets,)
        counts = counts if isinstance(counts, tuple) else (counts,)
        needed = max((o + c for o, c in zip(offsets, counts, strict=False)), default=0)
        if needed > len(data):
            raise ValueError(f"truncated TIFF: its strips end at byte {needed}, the file has {len(data)}")


def _gif_extent(img: ImageFile.ImageFile, data: bytes) -> None:
    """The first frame's pixel data, a chain of length-prefixed sub-blocks ended by an empty one
    (the frame the worker decodes), must end inside the file. Walking it reads one byte per 256."""
    position = img.tile[0][2]
    while position < len(data) and data[position]:
        position += 1 + data[position]
    if position >= len(data):
        raise ValueError("truncated GIF: the first frame's pixel data is cut short")


#: Per format, a check that the pixel data is all there, without decoding it: a cut file raises.
#: (PNG's chunk CRCs are checked by ``verify``; a WebP cut short does not open.)
PIXEL_DATA_EXTENT: dict[str, Callable[[ImageFile.ImageFile, bytes], None]] = {
    "JPEG": _jpeg_extent,
    "MPO": _jpeg_extent,
    "BMP": _bmp_extent,
    "TIFF": _tiff_extent,
    "GIF": _gif_extent,
}


def check_image(data: bytes, settings: Settings) -> tuple[int, int]:
    """(width, height) as the worker will see them (after EXIF orientation), or an
    :class:`APIError` saying what is wrong. Reads headers, and checks that the pixel data they
    describe is all there (PNG's CRCs, :data:`PIXEL_DATA_EXTENT` for the others); never decodes pixels."""
    if not data:
        raise APIError(400, "empty_image", "the image field is empty")
    if len(data) > settings.max_upload_bytes:
        raise APIError(413, "upload_too_large", f"images are limited to {settings.max_upload_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size  # TIFF: Pillow's size is already oriented
                orientation = 1
                if fmt == "PNG":
                    orientation = _orientation(img.info.get("exif"))  # an eXIf chunk before IDAT, read by open
                    img.verify()  # chunk CRCs, without decoding pixels (must come right after open)
                elif fmt in ("JPEG", "MPO", "WEBP"):
                    orientation = img.getexif().get(0x0112, 1)  # header only
                if fmt in PIXEL_DATA_EXTENT:
                    PIXEL_DATA_EXTENT[fmt](img, data)
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, "image_too_large", "image declares more pixels than the decompression limit") from None
    except UnidentifiedImageError:
        raise APIError(415, "unsupported_image", "not an image in a supported format") from None
    except Exception as exc:  # Pillow raises more than OSError on hostile headers (IndexError, struct.error...)
        raise APIError(422, "corrupt_image", f"the image cannot be read ({str(exc)[:80]})") from None
    if fmt not in ALLOWED_FORMATS:
        raise APIError(415, "unsupported_image", f"{fmt} images are not accepted")
    if width * height > settings.max_pixels or max(width, height) > settings.max_side:
        raise APIError(
            413,
            "image_too_large",
            f"{width}x{height} exceeds the limit ({settings.max_pixels} pixels, {settings.max_side} per side)",
        )
    if min(width, height) < MIN_SIDE:
        raise APIError(422, "image_too_small", f"{width}x{height}: both sides must be at least {MIN_SIDE} pixels")
    return width, height


def check_output_size(width: int, height: int, fmt: str, alphas: int, settings: Settings) -> None:
    """Refuse, before queueing, what a worker could not afford to make (CTSR_MAX_OUTPUT_PIXELS, all
    alphas together) or the requested format cannot hold (WebP: 16383 px a side)."""
    out_w, out_h = width * settings.scale, height * settings.scale
    limit = FORMAT_MAX_SIDE[fmt]
    if max(out_w, out_h) > limit:
        raise APIError(
            422,
            "output_too_large_for_format",
            f"{width}x{height} upscales to {out_w}x{out_h}, beyond {fmt}'s {limit}-pixel side limit; ask for png",
        )
    if out_w * out_h * alphas > settings.max_output_pixels:
        raise APIError(
            413,
            "output_too_large",
            f"{width}x{height} at {alphas} alpha(s) makes {out_w * out_h * alphas} output pixels; the limit is "
            f"{settings.max_output_pixels} (fewer alphas or a smaller image)",
        )
