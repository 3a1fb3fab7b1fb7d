"""Webhooks: the SSRF guard, HMAC signatures, retries with back-off, and the whole path from a
real worker finishing a job to a real HTTP receiver on this machine."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import make_compact
from fastapi.testclient import TestClient
from rq import Queue
from service_helpers import KeepSignalHandlers, jpeg, wait_for

import models
from ctsr.blobs import RedisBlobStore
from ctsr.contract import WEBHOOK_QUEUE_KEY, WEBHOOK_RETRY_KEY, JobPayload, webhook_record
from ctsr.settings import Settings
from service.app import create_app
from service.errors import APIError
from service.webhooks import Deliverer, check_url

SECRET = "whsec-test"

# -- the SSRF guard -------------------------------------------------------------------------------
FAKE_DNS = {"public.example": ["93.184.216.34"], "internal.example": ["10.0.0.5"],
            "mixed.example": ["93.184.216.34", "127.0.0.1"], "metadata.example": ["169.254.169.254"]}  # fmt: skip


def fake_resolver(host: str, port: int) -> list[str]:
    if host in FAKE_DNS:
        return FAKE_DNS[host]
    try:
        import ipaddress

        return [str(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        raise OSError("no such host") from None


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://127.0.0.1:9000/hook", "webhook_not_allowed"),
        ("http://[::1]/hook", "webhook_not_allowed"),
        ("http://10.1.2.3/hook", "webhook_not_allowed"),
        ("http://172.16.0.1/hook", "webhook_not_allowed"),
        ("http://192.168.1.1/hook", "webhook_not_allowed"),
        ("http://169.254.169.254/latest/meta-data/", "webhook_not_allowed"),
        ("http://[fd00:ec2::254]/", "webhook_not_allowed"),
        ("http://[fe80::1]/", "webhook_not_allowed"),
        ("http://0.0.0.0/", "webhook_not_allowed"),
        ("http://100.64.0.1/", "webhook_not_allowed"),
        ("http://224.0.0.1/", "webhook_not_allowed"),
        ("http://internal.example/hook", "webhook_not_allowed"),
        ("http://metadata.example/", "webhook_not_allowed"),
        ("http://mixed.example/hook", "webhook_not_allowed"),
        ("http://nowhere.example/hook", "webhook_unresolvable"),
        ("ftp://public.example/hook", "invalid_webhook"),
        ("file:///etc/passwd", "invalid_webhook"),
        ("http://user:pw@public.example/hook", "invalid_webhook"),
        ("https:///nohost", "invalid_webhook"),
        # IPv4 written inside IPv6: each reaches the IPv4 host it carries
        ("http://[64:ff9b::a9fe:a9fe]/", "webhook_not_allowed"),  # NAT64 of 169.254.169.254
        ("http://[64:ff9b:1::a9fe:a9fe]/", "webhook_not_allowed"),  # local-use NAT64 prefix
        ("http://[::127.0.0.1]/", "webhook_not_allowed"),  # IPv4-compatible
        ("http://[::ffff:10.0.0.1]/", "webhook_not_allowed"),  # IPv4-mapped
        ("http://[2002:a9fe:a9fe::]/", "webhook_not_allowed"),  # 6to4
        ("http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/", "webhook_not_allowed"),  # Teredo, client 10.0.0.1
        # a URL that would smuggle headers or split the request line
        ("http://public.example/hook\r\nX-Injected: 1", "invalid_webhook"),
        ("http://public.example/hook\n", "invalid_webhook"),
        ("http://public.example/a b", "invalid_webhook"),
        ("http://public.example:99999/", "invalid_webhook"),
    ],
)
def test_ssrf_guard_refuses(url: str, code: str) -> None:
    with pytest.raises(APIError) as info:
        check_url(url, Settings(), fake_resolver)
    assert info.value.status == 400 and info.value.code == code


def test_ssrf_guard_allows_public_and_explicitly_allowed_hosts() -> None:
    check_url("https://public.example/hooks?x=1", Settings(), fake_resolver)
    check_url("http://93.184.216.34:8080/", Settings(), fake_resolver)
    check_url("http://[2606:4700::6810:84e5]/", Settings(), fake_resolver)  # a public IPv6 address
    allowed = Settings(webhook_allow_hosts=["127.0.0.1:9000", "internal.example:80"])
    check_url("http://127.0.0.1:9000/hook", allowed, fake_resolver)
    check_url("http://internal.example/hook", allowed, fake_resolver)
    check_url("http://internal.example/hook", Settings(webhook_allow_private=True), fake_resolver)
    for url in ("http://127.0.0.1:9001/hook", "https://internal.example/hook"):  # same host, other port
        with pytest.raises(APIError):
            check_url(url, allowed, fake_resolver)


def test_allow_list_entries_must_name_a_port() -> None:
    with pytest.raises(ValueError, match="host and its port"):
        Settings(webhook_allow_hosts=["127.0.0.1"])
    Settings(webhook_allow_hosts=["[fd00::1]:443", "hooks.internal:8443"])


def test_delivery_connects_to_the_address_it_checked(redis: Any, receiver: Receiver) -> None:
    """DNS rebinding: the name is checked once per attempt and the connection goes to that answer."""
    port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])
    answers = iter([["127.0.0.1"], ["10.9.9.9"]])  # the first answer is checked; a later one must not matter

    def rebinding(host: str, _: int) -> list[str]:
        assert host == "hooks.test"
        return next(answers)

    settings = _settings(webhook_allow_hosts=[f"hooks.test:{port}"], webhook_allow_private=False)
    deliverer = Deliverer(redis, settings, rebinding)
    _push(redis, f"http://hooks.test:{port}/hook?token=s3cret")
    asyncio.run(_drain(deliverer, 1))
    ((headers, _),) = receiver.calls  # "hooks.test" has no real DNS: only the pinned address was used
    assert headers["Host"] == f"hooks.test:{port}"
    assert deliverer.delivered == 1


# -- a receiver on this machine ---------------------------------------------------------------
class Receiver:
    """An HTTP server that records POSTs and fails the first ``fail`` of them with a 500."""

    def __init__(self, fail: int = 0, delay_s: float = 0.0) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.arrived: list[float] = []  # monotonic time of each request
        self.fail = fail
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.arrived.append(time.monotonic())
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay_s)
                outer.calls.append((dict(self.headers), body))
                self.send_response(500 if len(outer.calls) <= outer.fail else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def verify(headers: dict[str, str], body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in headers["X-CTSR-Signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) < 60


def _settings(**kw: Any) -> Settings:
    kw.setdefault("webhook_allow_private", True)  # the receivers listen on loopback
    return Settings(redis_url=None, webhook_secret=SECRET, **kw)


def _push(redis: Any, url: str, status: str = "finished", job: int = 1) -> None:
    payload = JobPayload(f"00000000-0000-4000-8000-{job:012d}", [0.5], webhook=url)
    redis.rpush(WEBHOOK_QUEUE_KEY, webhook_record(payload, status))


async def _drain(deliverer: Deliverer, rounds: int) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(rounds):
            await deliverer.run_once(client, wait_s=0.2)


def test_delivery_is_signed(redis: Any, receiver: Receiver) -> None:
    _push(redis, receiver.url)
    asyncio.run(_drain(Deliverer(redis, _settings()), 1))
    ((headers, body),) = receiver.calls
    assert verify(headers, body)
    event = json.loads(body)
    assert event["event"] == "job.finished" and event["job"]["urls"]["result"].endswith("/result")
    tampered = body.replace(b"finished", b"failed__")
    assert not verify(headers, tampered)


def test_failed_deliveries_back_off_then_succeed_or_give_up(redis: Any) -> None:
    flaky = Receiver(fail=2)
    deliverer = Deliverer(redis, _settings(webhook_attempts=3))
    _push(redis, flaky.url)
    asyncio.run(_drain(deliverer, 1))
    ((raw, due),) = redis.zrange(WEBHOOK_RETRY_KEY, 0, -1, withscores=True)
    assert json.loads(raw)["attempt"] == 1 and 0 < due - time.time() <= 1.0  # first back-off: 1 s
    asyncio.run(_drain(deliverer, 1))
    assert len(flaky.calls) == 1  # not due yet: nothing sent
    redis.zadd(WEBHOOK_RETRY_KEY, {raw: 0})  # make it due now
    asyncio.run(_drain(deliverer, 1))
    ((raw, due),) = redis.zrange(WEBHOOK_RETRY_KEY, 0, -1, withscores=True)
    assert json.loads(raw)["attempt"] == 2 and 1.0 < due - time.time() <= 2.0  # doubled
    redis.zadd(WEBHOOK_RETRY_KEY, {raw: 0})
    asyncio.run(_drain(deliverer, 1))
    assert len(flaky.calls) == 3 and deliverer.delivered == 1 and redis.zcard(WEBHOOK_RETRY_KEY) == 0

    dead = Receiver(fail=99)
    _push(redis, dead.url)
    for _ in range(3):
        asyncio.run(_drain(deliverer, 1))
        for raw in redis.zrange(WEBHOOK_RETRY_KEY, 0, -1):
            redis.zadd(WEBHOOK_RETRY_KEY, {raw: 0})
    assert len(dead.calls) == 3 and deliverer.failed == 1  # bounded: webhook_attempts tries
    assert redis.llen(WEBHOOK_QUEUE_KEY) == 0 and redis.zcard(WEBHOOK_RETRY_KEY) == 0
    flaky.server.shutdown()
    dead.server.shutdown()


def test_slow_receivers_delay_only_themselves(redis: Any) -> None:
    slow, fast = Receiver(delay_s=2.0), Receiver()
    settings = _settings(webhook_per_host=2, webhook_timeout_s=10)
    for job in range(4):
        _push(redis, slow.url, job=job)
    _push(redis, fast.url, job=4)  # queued behind four deliveries that each take 2 s

    async def scenario() -> Deliverer:
        deliverer = Deliverer(redis, settings)
        started = time.monotonic()
        task = asyncio.create_task(deliverer.run())
        while not fast.arrived and time.monotonic() - started < 15:
            await asyncio.sleep(0.05)
        assert fast.arrived and fast.arrived[0] - started < 1.5, "the fast receiver waited for the slow ones"
        await asyncio.sleep(0.5)
        assert max(len(slow.arrived) - len(slow.calls), 0) <= 2, "more than webhook_per_host at one receiver"
        while deliverer.delivered < 5 and time.monotonic() - started < 20:
            await asyncio.sleep(0.1)
        task.cancel()
        return deliverer

    deliverer = asyncio.run(scenario())
    assert deliverer.delivered == 5 and len(slow.calls) == 4 and deliverer.failed == 0
    slow.server.shutdown()
    fast.server.shutdown()


def test_a_url_that_turned_private_is_dropped_at_delivery(redis: Any) -> None:
    deliverer = Deliverer(redis, Settings(redis_url=None, webhook_secret=SECRET), fake_resolver)
    _push(redis, "http://internal.example/hook")  # accepted earlier, its DNS now says 10.0.0.5
    asyncio.run(_drain(deliverer, 1))
    assert (deliverer.delivered, deliverer.dropped) == (0, 1)
    assert redis.zcard(WEBHOOK_RETRY_KEY) == 0 and redis.llen(WEBHOOK_QUEUE_KEY) == 0  # not retried either


# -- through the gateway and a real worker ----------------------------------------------------
def _upload(client: TestClient, **fields: str) -> httpx.Response:
    files = {"image": ("in.jpg", jpeg(40, 32), "image/jpeg")}
    return client.post("/upscale", files=files, data={"alpha": "0.5", **fields})


def test_gateway_checks_webhooks_before_storing_anything(redis: Any) -> None:
    off = TestClient(create_app(Settings(redis_url=None), redis), raise_server_exceptions=False)
    r = _upload(off, webhook="https://public.example/hook")
    assert r.status_code == 400 and r.json()["error"]["code"] == "webhooks_disabled"
    on = TestClient(create_app(Settings(redis_url=None, webhook_secret=SECRET), redis), raise_server_exceptions=False)
    r = _upload(on, webhook="http://169.254.169.254/latest/meta-data/")
    assert r.status_code == 400 and r.json()["error"]["code"] == "webhook_not_allowed"
    assert redis.keys("ctsr:blob:*") == [] and redis.llen("rq:queue:ctsr") == 0


def test_worker_end_reaches_the_receiver_without_blocking(redis: Any, receiver: Receiver, tmp_path: Path) -> None:
    from worker.engine import BatchEngine
    from worker.metrics import WorkerMetrics
    from worker.rq_worker import BatchWorker

    checkpoint = models.save_student(make_compact(), tmp_path / "ckpt")
    settings = _settings(model=checkpoint, tile=32, warmup=False, worker_metrics_port=0)
    with TestClient(create_app(settings, redis), raise_server_exceptions=False) as client:  # lifespan: deliverer
        r = _upload(client, webhook=receiver.url)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        queue = Queue(settings.queue, connection=redis)
        worker = BatchWorker(queue, BatchEngine(settings), RedisBlobStore(redis), settings, WorkerMetrics())
        started = time.perf_counter()
        with KeepSignalHandlers():
            worker.work_batches(burst=True)
        wait_for(lambda: receiver.calls, 10, what="the webhook")
        assert time.perf_counter() - started < 10
    ((headers, body),) = receiver.calls
    assert verify(headers, body) and json.loads(body)["job"] == {
        "id": job_id,
        "status": "finished",
        "urls": {"job": f"/jobs/{job_id}", "result": f"/jobs/{job_id}/result"},
    }
