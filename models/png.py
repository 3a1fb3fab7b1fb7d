"""A fast PNG writer for served results: the Up filter on every row, Huffman-only deflate.

Pillow's PNG encoder tries all five row filters on every row and deflates with LZ77 matching.
At ``compress_level=1`` (what the worker used) a 512² compact result took it 23 ms (median of
27 photos) on this 2-core CPU: a tenth of the job, spent after the forward pass. An Up-filtered
photo is mostly small residuals, which Huffman coding alone packs well: this writer takes 8 ms
(2.3-4.1x faster) and its files are 8 % smaller in all (-18 % to +3 % per photo); on noise,
where nothing compresses, 7 % larger. ``python benchmarks/bench_png.py runs/photos``. numpy and
zlib release the GIL, so the worker's encoder threads run side by side. Rows are filtered and
compressed in strips, so the extra memory stays small for huge results.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels → PNG colour type: grey, grey + alpha, RGB, RGBA
UP_FILTER = 2
STRIP_BYTES = 1 << 22  # filtered bytes compressed at a time


def encode_png(pixels: np.ndarray) -> bytes:
    """``[H, W]`` or ``[H, W, C]`` (C = 1-4: grey, grey + alpha, RGB, RGBA), uint8 or uint16 → PNG."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    unsigned = pixels.dtype.kind == "u" and pixels.dtype.itemsize in (1, 2)  # 8 or 16 bits, either byte order
    if pixels.ndim != 3 or pixels.shape[2] not in COLOUR_TYPES or not unsigned:
        raise ValueError(f"cannot write a {pixels.dtype} array of shape {pixels.shape} as PNG")
    height, width, channels = pixels.shape
    if not height or not width:
        raise ValueError("cannot write an empty image as PNG")
    stride = width * channels * pixels.dtype.itemsize
    header = struct.pack(">IIBBBBB", width, height, 8 * pixels.dtype.itemsize, COLOUR_TYPES[channels], 0, 0, 0)
    parts = [SIGNATURE, _chunk(b"IHDR", header)]

    deflate = zlib.compressobj(zlib.Z_BEST_SPEED, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    above = np.zeros(stride, np.uint8)  # the row before the first counts as zeros
    step = max(1, STRIP_BYTES // stride)
    for top in range(0, height, step):
        # PNG stores samples big-endian; uint8 needs no conversion (and no copy when contiguous)
        rows = np.ascontiguousarray(pixels[top : top + step], dtype=pixels.dtype.newbyteorder(">"))
        rows = rows.view(np.uint8).reshape(-1, stride)
        filtered = np.empty((len(rows), stride + 1), np.uint8)
        filtered[:, 0] = UP_FILTER
        np.subtract(rows[0], above, out=filtered[0, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's does
        np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
        above = rows[-1]
        parts.append(_chunk(b"IDAT", deflate.compress(filtered.data)))
    parts.append(_chunk(b"IDAT", deflate.flush()))
    parts.append(_chunk(b"IEND", b""))
    return b"".join(p for p in parts if p)


def _chunk(tag: bytes, data: bytes) -> bytes:
    if not data and tag == b"IDAT":
        return b""  # deflate may hold a whole strip back; an empty IDAT is legal but pointless
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))
