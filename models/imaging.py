"""Image files ↔ tensors, with every input mode handled explicitly.

What comes in (after EXIF orientation is applied):

=================  ==============================================  ==============
input mode         what the model sees                             written back as
=================  ==============================================  ==============
RGB                RGB                                             RGB
RGBA, LA, PA, P+t  RGB; the alpha channel is upscaled separately   RGBA / LA
                   (bicubic) and recombined
L, 1               grey replicated to RGB                          L
I;16 (16-bit grey) grey at full 16-bit precision                   I;16 (16-bit PNG)
P (palette)        its RGB colours                                 RGB
CMYK, YCbCr, LAB   converted to RGB by Pillow (no ICC transform)   RGB
=================  ==============================================  ==============

Pillow decodes 16-bit-per-channel *colour* PNGs to 8-bit RGB, so those lose their extra
precision. Animated GIF/WebP/APNG: the first frame is used.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class LoadedImage:
    rgb: torch.Tensor  # [3, H, W] float32 in [0, 1]
    alpha: torch.Tensor | None  # [1, H, W] float32 in [0, 1]
    mode: str  # the mode written back: RGB, RGBA, L, LA or I;16
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), like Pillow."""
        return self.rgb.shape[2], self.rgb.shape[1]


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """Turn Pillow's many failure modes into one :class:`ImageError` naming the input."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: not a readable image ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None


def _source(source: str | Path | bytes | BinaryIO) -> tuple[str, str | Path | BinaryIO]:
    if isinstance(source, bytes):
        return "image", io.BytesIO(source)
    return (str(source) if isinstance(source, (str, Path)) else "image"), source


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} is {width * height} pixels, over the limit of {max_pixels}")


def probe_image(source: str | Path | bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the header; checks the pixel limit."""
    name, fp = _source(source)
    with _reading(name), Image.open(fp) as img:
        width, height = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
    _check_pixels(name, width, height, max_pixels)
    return width, height


def _open(source: str | Path | bytes | BinaryIO, max_pixels: int) -> Image.Image:
    name, fp = _source(source)
    with _reading(name):
        img = Image.open(fp)
        _check_pixels(name, img.width, img.height, max_pixels)
        img.load()
    return img


def _to_tensor(array: np.ndarray, peak: float) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / peak)
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def load_image(source: str | Path | bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode, orient and normalise an image; raises :class:`ImageError` with a reason."""
    img = _open(source, max_pixels)
    notes: list[str] = []
    frames = getattr(img, "n_frames", 1)  # multi-frame formats only
    if frames > 1:
        notes.append(f"animated ({frames} frames): first frame used")
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        notes.append(f"EXIF orientation {orientation} applied")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("1", "F"):
        img = img.convert("L")
    elif img.mode in ("PA", "RGBa", "La"):
        img = img.convert("RGBA")
    elif img.mode not in ("RGB", "RGBA", "L", "LA", *_SIXTEEN_BIT):
        notes.append(f"{img.mode} converted to RGB")
        img = img.convert("RGB")

    alpha = None
    if img.mode in _SIXTEEN_BIT:
        grey = _to_tensor(np.asarray(img).astype(np.float32).clip(0, 65535), 65535.0)
        return LoadedImage(grey.expand(3, -1, -1).contiguous(), None, "I;16", notes)
    if img.mode in ("RGBA", "LA"):
        alpha = _to_tensor(np.asarray(img.getchannel("A")), 255.0)
    colour = img.convert("L" if img.mode in ("L", "LA") else "RGB")
    rgb = _to_tensor(np.asarray(colour), 255.0)
    if rgb.shape[0] == 1:
        rgb = rgb.expand(3, -1, -1).contiguous()
    return LoadedImage(rgb, alpha, img.mode, notes)


def upscale_alpha(alpha: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Alpha is a mask, not a photo: resample it (bicubic) instead of running the model on it."""
    out = F.interpolate(alpha[None], size=size, mode="bicubic", align_corners=False)
    return out[0].clamp(0, 1)


#: Pixels converted at a time: a result's float → 8/16-bit conversion needs temporaries of one
#: strip of rows, not of the whole image (a 4096² float result is 200 MB). Small strips because
#: glibc keeps their freed blocks, in each encoder thread's arena: at 256 rows of 4096 the
#: encoding raised the worker's peak by 130 MB over its forward passes, at 64 rows by 36 MB; with
#: two encoder threads on one result, 64 rows raised the 4096² job's peak by 40 MB more than 32.
#: Narrow results get taller strips (fewer, cheaper calls: a 512² result is a few strips).
STRIP_PIXELS = 1 << 17


def strip_rows(width: int) -> int:
    """Rows per strip for a result ``width`` pixels wide."""
    return max(1, STRIP_PIXELS // max(width, 1))


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """A result tensor as a numpy array to quantize in numpy: a view of a host float32/float16
    tensor (what the pipeline returns), a copy of anything else.

    Encoder threads quantize in numpy, not torch: a torch op there starts an OpenMP team of that
    thread's own, and once the process has more OpenMP threads than cores, libgomp stops letting
    idle threads spin and puts them to sleep between parallel regions. The forward passes on the
    main thread then block ~130 times a pass: on 2 cores the compact model's pass went from
    227-236 to 254-318 ms in one process, and the worker ran the default model 12 % slower than
    the bare model (`tests/test_worker.py` counts the threads)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu" or tensor.dtype not in (torch.float32, torch.float16):
        tensor = tensor.to("cpu", torch.float32)
    return tensor.numpy()


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """Floats clipped to [0, 1] (float32, worked on in place) → uint8, rounded half to even."""
    np.rint(np.multiply(unit, 255, out=unit), out=unit)
    return unit.astype(np.uint8)


def quantized_strips(rgb: torch.Tensor, grey: bool = False) -> Iterator[np.ndarray]:
    """``[3, H, W]`` floats → uint8 ``[rows, W, 3]`` (or uint16 ``[rows, W]`` luma) strips, top to
    bottom, in numpy (encoder threads call it: :func:`host_array`)."""
    array = host_array(rgb)
    step = strip_rows(array.shape[-1])
    for top in range(0, array.shape[-2], step):
        # one float32 copy per strip, worked on in place: every temporary here is a strip-sized
        # block that the allocator keeps around once the result is written
        strip = np.clip(array[:, top : top + step], 0, 1, dtype=np.float32)
        if grey:
            luma = (0.299 * strip[0] + 0.587 * strip[1] + 0.114 * strip[2]) * 65535
            yield np.rint(luma, out=luma).astype(np.uint16)
        else:  # rounded to bytes before the HWC transpose: a quarter of the bytes to move
            yield _to_uint8(strip).transpose(1, 2, 0)


def quantized(rgb: torch.Tensor, grey: bool = False) -> np.ndarray:
    """``[3, H, W]`` floats → uint8 ``[H, W, 3]`` (or uint16 ``[H, W]`` luma), a strip at a time."""
    h, w = rgb.shape[-2:]
    out = np.empty((h, w) if grey else (h, w, 3), dtype=np.uint16 if grey else np.uint8)
    top = 0
    for strip in quantized_strips(rgb, grey):
        out[top : top + len(strip)] = strip
        top += len(strip)
    return out


def to_pil(rgb: torch.Tensor, mode: str = "RGB", alpha: torch.Tensor | None = None) -> Image.Image:
    """``[3, H, W]`` in [0, 1] (+ optional ``[1, H, W]`` alpha) → a Pillow image in ``mode``."""
    if mode == "I;16":
        return Image.fromarray(quantized(rgb, grey=True))  # uint16 → mode I;16
    img = Image.fromarray(quantized(rgb), mode="RGB")
    if mode in ("L", "LA"):
        img = img.convert("L")
    if alpha is not None and mode in ("RGBA", "LA"):
        a = _to_uint8(np.clip(host_array(alpha)[0], 0, 1, dtype=np.float32))
        img.putalpha(Image.fromarray(a, mode="L"))
    return img


def list_images(paths: list[Path]) -> list[Path]:
    """Expand folders (non-recursively, sorted) into the image files they hold."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise ImageError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ImageError(f"{path}: no such file or folder")
    return files
