"""The worker's PNG writer: every mode it is given decodes to the same pixels, in any number of strips."""

import io
import itertools
import zlib

import numpy as np
import pytest
from PIL import Image

from models import png
from models.png import encode_png

RNG = np.random.default_rng(0)


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img)


@pytest.mark.parametrize(
    ("shape", "dtype", "mode"),
    [
        ((37, 53, 3), np.uint8, "RGB"),
        ((37, 53, 4), np.uint8, "RGBA"),
        ((37, 53), np.uint8, "L"),
        ((37, 53, 2), np.uint8, "LA"),
        ((37, 53), np.uint16, "I;16"),
        ((1, 1, 3), np.uint8, "RGB"),
    ],
)
def test_every_mode_round_trips(shape: tuple[int, ...], dtype: type, mode: str) -> None:
    pixels = RNG.integers(0, np.iinfo(dtype).max + 1, size=shape, dtype=dtype)
    pixels[: shape[0] // 2] = pixels[0]  # runs of equal rows: the Up filter's zeros
    data = encode_png(pixels)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == mode and img.size == (shape[1], shape[0])
    assert np.array_equal(decoded(data), pixels)


def test_strips_join_seamlessly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strips of 3 rows (and a last one of 1): each strip's first row is filtered against the
    previous strip's last, and every IDAT chunk carries a valid CRC (Pillow checks them)."""
    monkeypatch.setattr(png, "STRIP_BYTES", 3 * 20 * 3)
    pixels = RNG.integers(0, 256, size=(10, 20, 3), dtype=np.uint8)
    data = encode_png(pixels)
    assert data.count(b"IDAT") >= 2
    assert np.array_equal(decoded(data), pixels)


def test_a_photo_packs_smaller_than_pillows_fastest_level() -> None:
    """Smooth content (a gradient with mild noise, like an upscaled photo) is where the Up filter
    and Huffman coding pay; the writer must not trade size away for its speed there."""
    y, x = np.mgrid[0:256, 0:256]
    base = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.int16)
    pixels = np.clip(base + RNG.integers(-3, 4, size=base.shape), 0, 255).astype(np.uint8)
    pillow = io.BytesIO()
    Image.fromarray(pixels).save(pillow, "PNG", compress_level=1)
    assert len(encode_png(pixels)) < len(pillow.getvalue())


def test_non_contiguous_and_big_endian_input() -> None:
    pixels = RNG.integers(0, 65536, size=(9, 14), dtype=np.uint16)
    assert np.array_equal(decoded(encode_png(pixels.astype(">u2"))), pixels)
    rgb = RNG.integers(0, 256, size=(12, 8, 3), dtype=np.uint8)
    assert np.array_equal(decoded(encode_png(rgb.transpose(1, 0, 2))), rgb.transpose(1, 0, 2))


@pytest.mark.parametrize(
    "pixels",
    [
        np.zeros((4, 4, 3), np.float32),
        np.zeros((4, 4, 5), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros(4, np.uint8),
    ],
)
def test_what_png_cannot_hold_is_refused(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="PNG"):
        encode_png(pixels)


def idat_stream(data: bytes) -> bytes:
    idat, pos = b"", 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return idat


def test_the_stream_is_one_valid_zlib_stream() -> None:
    pixels = RNG.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    raw = zlib.decompress(idat_stream(encode_png(pixels)))  # checks the Adler-32 too
    assert len(raw) == 16 * (1 + 16 * 3) and raw[0] == 2  # every row: the Up filter


@pytest.mark.parametrize("cuts", [(1,), (5, 6), (3, 9, 10), tuple(range(1, 17))])
def test_bands_deflated_apart_join_into_one_valid_stream(cuts: tuple[int, ...]) -> None:
    """What the worker's encoder threads do with one result: each band of rows is filtered against
    the row above it and deflated on its own; the joined file is one zlib stream whose Adler-32
    (checked by zlib) and pixels are the whole image's."""
    pixels = RNG.integers(0, 256, size=(17, 11, 3), dtype=np.uint8)
    pixels[8:12] = pixels[7]  # equal rows across a cut: zeros after the Up filter
    edges = [0, *cuts, 17]
    bands = [
        png.deflate_band([pixels[top:bottom]], above=pixels[:top] if top else None)
        for top, bottom in itertools.pairwise(edges)
    ]
    data = png.assemble_png(bands)
    assert np.array_equal(decoded(data), pixels)
    assert zlib.decompress(idat_stream(data)) == zlib.decompress(idat_stream(encode_png(pixels)))
    grey = RNG.integers(0, 65536, size=(9, 6), dtype=np.uint16)
    bands = [png.deflate_band([grey[:4]]), png.deflate_band([grey[4:7], grey[7:]], above=grey[:4])]
    assert np.array_equal(decoded(png.assemble_png(bands)), grey)


def test_adler32_of_joined_bytes_from_the_parts() -> None:
    for first, second in [(b"", b""), (b"abc", b""), (b"", b"xyz"), (RNG.bytes(70000), RNG.bytes(123457))]:
        combined = png._adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
        assert combined == zlib.adler32(first + second)


def test_bands_of_different_images_are_refused() -> None:
    rgb, rgba = np.zeros((2, 4, 3), np.uint8), np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="does not continue"):
        png.assemble_png([png.deflate_band([rgb]), png.deflate_band([rgba])])
    with pytest.raises(ValueError, match="row above the band"):
        png.deflate_band([rgb], above=np.zeros((1, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        png.assemble_png([])


def test_strips_from_an_iterable_make_the_same_file() -> None:
    """The worker hands its result over a strip at a time (never the whole 8-bit image)."""
    pixels = RNG.integers(0, 256, size=(23, 17, 3), dtype=np.uint8)
    strips = (pixels[top : top + 5] for top in range(0, 23, 5))
    assert encode_png(strips) == encode_png(pixels)
    grey = RNG.integers(0, 65536, size=(9, 6), dtype=np.uint16)
    assert np.array_equal(decoded(encode_png([grey[:4], grey[4:]])), grey)


def test_strips_that_do_not_continue_the_image_are_refused() -> None:
    with pytest.raises(ValueError, match="does not continue"):
        encode_png([np.zeros((2, 4, 3), np.uint8), np.zeros((2, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="empty"):
        encode_png([])


def test_zlib_ng_deflates_the_same_bytes_as_the_system_zlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model extra installs zlib-ng (twice as fast here); files must not depend on which ran."""
    assert png.zlib.__name__ == "zlib_ng.zlib_ng"
    y, x = np.mgrid[0:96, 0:128]
    pixels = np.clip(np.stack([x, y, x + y], -1) + RNG.integers(-9, 10, (96, 128, 3)), 0, 255).astype(np.uint8)
    fast = encode_png(pixels)
    monkeypatch.setattr(png, "zlib", zlib)
    assert encode_png(pixels) == fast
