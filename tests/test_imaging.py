"""Image files in every mode the pipeline promises to handle, and every way they can be broken."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PHOTO, make_compact
from PIL import Image

from models import ImageError
from models.imaging import list_images, load_image, probe_image, to_pil, upscale_alpha
from models.pipeline import TileRunner, Upscaler, finish_images


def _save(img: Image.Image, path: Path, **params: object) -> Path:
    img.save(path, **params)
    return path


def _nearest_x4(rgb: torch.Tensor) -> torch.Tensor:
    """A stand-in SR output ``[1, 3, 4H, 4W]`` for checks of the writing side."""
    return F.interpolate(rgb[None], scale_factor=4, mode="nearest")


def _photo(size: tuple[int, int] = (24, 20)) -> Image.Image:
    return Image.open(PHOTO).convert("RGB").resize(size, Image.Resampling.LANCZOS)


def test_real_photo_loads() -> None:
    image = load_image(PHOTO)
    assert image.mode == "RGB" and image.alpha is None and image.notes == []
    assert image.size == (96, 72) and image.rgb.shape == (3, 72, 96)
    assert image.rgb.dtype == torch.float32
    reference = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.float32) / 255
    np.testing.assert_allclose(image.rgb.permute(1, 2, 0).numpy(), reference, atol=1e-6)
    assert probe_image(PHOTO) == (96, 72)
    assert load_image(PHOTO.read_bytes()).rgb.equal(image.rgb)
    with PHOTO.open("rb") as fp:
        assert load_image(fp).rgb.equal(image.rgb)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 24), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 24))  # left half red, right half blue
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rotated.jpg", exif=exif, quality=95)

    assert Image.open(path).size == (40, 24)
    assert probe_image(path) == (24, 40)
    image = load_image(path)
    assert image.size == (24, 40)
    assert any("EXIF orientation 6" in note for note in image.notes)
    top, bottom = image.rgb[:, 5, 12], image.rgb[:, -5, 12]
    assert top[0] > 0.9 and top[2] < 0.1, "the left (red) half ends up on top"
    assert bottom[2] > 0.9 and bottom[0] < 0.1


def test_rgba_keeps_its_alpha_channel(tmp_path: Path) -> None:
    alpha = np.full((20, 24), 255, np.uint8)
    alpha[2:12, 2:12] = 0  # a fully transparent square
    alpha[12:20, 14:24] = 128  # a half-transparent square
    img = _photo()
    img.putalpha(Image.fromarray(alpha))
    path = _save(img, tmp_path / "rgba.png")

    image = load_image(path)
    assert image.mode == "RGBA"
    assert image.alpha is not None and image.alpha.shape == (1, 20, 24)
    np.testing.assert_allclose(image.alpha[0].numpy(), alpha / 255, atol=1e-6)

    upscaler = Upscaler(TileRunner(make_compact(), device="cpu"), tile=0)
    (out,) = upscaler.upscale_image(image, alphas=(0.5,))
    assert out.mode == "RGBA" and out.size == (96, 80)
    out_alpha = np.asarray(out.getchannel("A"), dtype=np.float32)
    assert (out_alpha[5 * 4 : 9 * 4, 5 * 4 : 9 * 4] == 0).all(), "transparent stays transparent"
    assert np.abs(out_alpha[15 * 4 : 18 * 4, 17 * 4 : 22 * 4] - 128).max() <= 1
    assert (out_alpha[:4, 60:] == 255).all()
    bicubic = np.asarray(Image.fromarray(alpha).resize((96, 80), Image.Resampling.BICUBIC), dtype=np.float32)
    assert np.abs(out_alpha - bicubic).mean() < 3
    # the colour channels are the model's output, not the alpha
    rgb = np.asarray(out.convert("RGB"), dtype=np.float32)
    assert rgb.std() > 5


def test_la_stays_la(tmp_path: Path) -> None:
    grey = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (16, 1))
    alpha = np.full((16, 24), 255, np.uint8)
    alpha[:, :8] = 0
    path = _save(Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]), tmp_path / "la.png")

    image = load_image(path)
    assert image.mode == "LA" and image.alpha is not None
    assert torch.equal(image.rgb[0], image.rgb[1]) and torch.equal(image.rgb[1], image.rgb[2])
    np.testing.assert_allclose(image.rgb[0].numpy(), grey / 255, atol=1e-6)
    (out,) = finish_images(image, _nearest_x4(image.rgb))
    assert out.mode == "LA" and out.size == (96, 64)
    np.testing.assert_array_equal(np.asarray(out.getchannel("L"))[::4, ::4], grey)
    out_alpha = np.asarray(out.getchannel("A"))
    assert (out_alpha[:, :28] == 0).all() and (out_alpha[:, 36:] == 255).all()


@pytest.mark.parametrize("mode", ["L", "1"])
def test_greyscale_stays_greyscale(tmp_path: Path, mode: str) -> None:
    grey = np.asarray(_photo().convert("L"))
    img = Image.fromarray(grey).convert(mode)
    path = _save(img, tmp_path / "grey.png")
    image = load_image(path)
    assert image.mode == "L" and image.alpha is None
    assert torch.equal(image.rgb[0], image.rgb[2])
    expected = np.asarray(img.convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(image.rgb[0].numpy(), expected, atol=1e-6)
    (out,) = finish_images(image, _nearest_x4(image.rgb))
    assert out.mode == "L" and out.size == (96, 80)
    np.testing.assert_array_equal(np.asarray(out)[::4, ::4], (expected * 255).round().astype(np.uint8))


SIXTEEN_BIT = np.array(
    [
        [30000, 30001, 30100, 65535],  # 30000/30001/30100 are one value apart in 8 bits (117)
        [0, 1, 256, 1000],
        [40000, 40000, 12345, 54321],
    ],
    dtype=np.uint16,
)


def _sixteen_bit_png(tmp_path: Path) -> Path:
    img = Image.fromarray(SIXTEEN_BIT)
    assert img.mode == "I;16"
    return _save(img, tmp_path / "grey16.png")


def test_16bit_grey_loads_at_full_precision(tmp_path: Path) -> None:
    image = load_image(_sixteen_bit_png(tmp_path))
    assert image.mode == "I;16" and image.alpha is None
    assert image.rgb.shape == (3, 3, 4)
    np.testing.assert_allclose(image.rgb[0].numpy() * 65535, SIXTEEN_BIT, atol=0.01)
    row = image.rgb[0, 0]
    # neighbours one 16-bit step apart (the same value at 8 bits) are told apart
    assert abs(float(row[1] - row[0]) - 1 / 65535) < 1e-7
    assert abs(float(row[2] - row[0]) - 100 / 65535) < 1e-7


def test_16bit_grey_is_written_back_as_16bit(tmp_path: Path) -> None:
    image = load_image(_sixteen_bit_png(tmp_path))
    (out,) = finish_images(image, _nearest_x4(image.rgb))
    assert out.mode == "I;16" and out.size == (16, 12)
    values = np.asarray(out)
    np.testing.assert_array_equal(values[::4, ::4], SIXTEEN_BIT)
    out.save(tmp_path / "out.png")
    reloaded = np.asarray(Image.open(tmp_path / "out.png"))
    np.testing.assert_array_equal(reloaded[::4, ::4], SIXTEEN_BIT)


def test_palette_with_transparency_becomes_rgba(tmp_path: Path) -> None:
    img = Image.new("P", (16, 8), 0)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    img.paste(1, (0, 0, 8, 8))
    img.paste(2, (8, 0, 12, 8))
    path = _save(img, tmp_path / "palette.png", transparency=0)

    image = load_image(path)
    assert image.mode == "RGBA" and image.alpha is not None
    assert image.alpha[0, :, :12].eq(1).all() and image.alpha[0, :, 12:].eq(0).all()
    torch.testing.assert_close(image.rgb[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(image.rgb[:, 0, 9], torch.tensor([0.0, 1.0, 0.0]))
    (out,) = finish_images(image, _nearest_x4(image.rgb))
    assert out.mode == "RGBA" and out.size == (64, 32)


def test_palette_without_transparency_becomes_rgb(tmp_path: Path) -> None:
    path = _save(_photo().quantize(16), tmp_path / "palette.png")
    assert Image.open(path).mode == "P"
    image = load_image(path)
    assert image.mode == "RGB" and image.alpha is None


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB" and image.rgb.shape == (3, 12, 16)
    assert any("CMYK" in note for note in image.notes)
    red = image.rgb[:, 6, 8]
    assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 255, 255), (0, 0, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    image = load_image(path)
    assert any("first frame" in note for note in image.notes)
    assert float(image.rgb.min()) > 0.9


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    _photo((32, 32)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (lambda: _png_bytes()[: len(_png_bytes()) // 2], "corrupt or truncated"),
        (lambda: _png_bytes()[:-40], "corrupt or truncated"),
        (lambda: np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(), "not a readable image"),
        (lambda: b"", "not a readable image"),
        (lambda: b"hello, I am a text file\n", "not a readable image"),
    ],
    ids=["truncated-half", "truncated-tail", "random-bytes", "empty", "text"],
)
def test_corrupt_images_raise_image_error(tmp_path: Path, content, match: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content())
    with pytest.raises(ImageError, match=match) as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError):
        load_image(content())


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="no such file"):
        probe_image(tmp_path / "nope.png")


def test_pixel_limit() -> None:
    limit = 96 * 72
    assert load_image(PHOTO, max_pixels=limit).size == (96, 72)
    with pytest.raises(ImageError, match="over the limit of 6911"):
        load_image(PHOTO, max_pixels=limit - 1)
    with pytest.raises(ImageError, match="6912 pixels"):
        probe_image(PHOTO, max_pixels=limit - 1)


def test_upscale_alpha_and_to_pil() -> None:
    alpha = torch.zeros(1, 6, 6)
    alpha[:, 2:4, 2:4] = 1
    up = upscale_alpha(alpha, (24, 24))
    assert up.shape == (1, 24, 24)
    assert float(up.min()) >= 0 and float(up.max()) <= 1  # bicubic overshoot is clamped
    assert float(up[0, 0, 0]) == 0 and float(up[0, 12, 12]) > 0.9
    rgb = torch.rand(3, 5, 7) * 1.4 - 0.2  # out of range on purpose
    img = to_pil(rgb)
    assert img.mode == "RGB" and img.size == (7, 5)
    expected = (rgb.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_to_pil_converts_in_strips_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large results are quantised a few rows at a time; strips meet without a seam (8- and 16-bit)."""
    monkeypatch.setattr("models.imaging.STRIP_PIXELS", 4 * 6)  # strips of 4 rows
    rgb = torch.rand(3, 11, 6, dtype=torch.float64) * 1.2 - 0.1
    expected = (rgb.float().clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.asarray(to_pil(rgb)), expected)
    c = rgb.float().clamp(0, 1)
    grey = ((0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) * 65535).round().numpy().astype(np.uint16)
    np.testing.assert_array_equal(np.asarray(to_pil(rgb, "I;16")), grey)


def test_list_images(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("b.png", "a.JPG", "c.webp"):
        (folder / name).write_bytes(b"x")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub.png").mkdir()  # a folder named like an image is skipped
    single = tmp_path / "single.png"
    single.write_bytes(b"x")
    assert list_images([folder, single]) == [folder / "a.JPG", folder / "b.png", folder / "c.webp", single]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="holds no images"):
        list_images([empty])
    with pytest.raises(ImageError, match="no such file or folder"):
        list_images([tmp_path / "missing"])
