"""Access control on the gateway: hashed API keys, job ownership, per-key rate limits, CORS,
security headers and no stack traces. Real Redis, real ASGI app, real HTTP semantics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from conftest import REPO
from fastapi.testclient import TestClient
from service_helpers import Proc, answers_ok, free_port, jpeg, service_env, wait_for

from ctsr.settings import Settings
from service.access import hash_key, new_key
from service.app import create_app

ALICE, BOB = new_key(), new_key()
KEYS = {"alice": hash_key(ALICE), "bob": hash_key(BOB)}

Client = Callable[..., TestClient]


@pytest.fixture
def client(redis: Any) -> Client:
    def make(**settings: Any) -> TestClient:
        return TestClient(create_app(Settings(redis_url=None, **settings), redis), raise_server_exceptions=False)

    return make


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _upload(c: TestClient, headers: dict[str, str] | None = None) -> Any:
    files = {"image": ("in.jpg", jpeg(48, 32), "image/jpeg")}
    return c.post("/upscale", files=files, data={"alpha": "0.5"}, headers=headers or {})


def test_without_keys_the_api_is_open(client: Client) -> None:
    c = client()
    r = _upload(c)
    assert r.status_code == 202
    assert c.get(f"/jobs/{r.json()['id']}").status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic YTpi"},
        {"Authorization": "Bearer ctsr_wrong"},
        {"Authorization": f"Bearer {hash_key(ALICE)}"},
    ],
    ids=["none", "empty", "basic", "unknown", "the-hash-itself"],
)
def test_keys_are_required_when_configured(client: Client, redis: Any, headers: dict[str, str]) -> None:
    c = client(api_keys=KEYS)
    before = set(redis.keys())
    r = _upload(c, headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert set(redis.keys()) == before  # nothing stored, nothing queued
    assert c.get("/jobs/00000000-0000-4000-8000-000000000000", headers=headers).status_code == 401


def test_health_stays_open_and_metrics_can_be_closed(client: Client) -> None:
    c = client(api_keys=KEYS, metrics_need_key=True)
    assert c.get("/livez").status_code == 200
    assert c.get("/readyz").status_code == 503  # no worker, but answered without a key
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers=_bearer(ALICE)).status_code == 200
    assert client(api_keys=KEYS).get("/metrics").status_code == 200  # open unless asked


def test_readiness_without_workers_for_scale_to_zero(client: Client) -> None:
    """Under KEDA the workers start only once jobs queue up: a gateway that waited for a worker
    before taking uploads would never let that happen."""
    body = client(ready_needs_worker=False).get("/readyz")
    assert body.status_code == 200 and body.json() == {"status": "ok", "redis": True, "workers": 0}


def test_a_job_is_visible_only_to_the_key_that_made_it(client: Client) -> None:
    c = client(api_keys=KEYS)
    r = _upload(c, _bearer(ALICE))
    assert r.status_code == 202
    job = r.json()["id"]
    assert c.get(f"/jobs/{job}", headers=_bearer(ALICE)).status_code == 200
    for method, path in (("GET", f"/jobs/{job}"), ("GET", f"/jobs/{job}/result"), ("DELETE", f"/jobs/{job}")):
        denied = c.request(method, path, headers=_bearer(BOB))
        assert denied.status_code == 404, (method, path)  # "no such job": ids do not leak
        assert denied.json()["error"]["code"] == "unknown_job"
    assert c.get(f"/jobs/{job}", headers=_bearer(ALICE)).json()["status"] == "queued"  # bob's DELETE did nothing
    assert c.delete(f"/jobs/{job}", headers=_bearer(ALICE)).json()["status"] == "canceled"


def test_rate_limit_per_key_with_headers(client: Client, redis: Any) -> None:
    c = client(api_keys=KEYS, rate_limit_per_min=3)
    seen = [_upload(c, _bearer(ALICE)) for _ in range(3)]
    assert [r.status_code for r in seen] == [202, 202, 202]
    assert [r.headers["X-RateLimit-Remaining"] for r in seen] == ["2", "1", "0"]
    assert all(r.headers["X-RateLimit-Limit"] == "3" for r in seen)
    queued = redis.llen("rq:queue:ctsr")
    over = _upload(c, _bearer(ALICE))
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    assert over.headers["X-RateLimit-Remaining"] == "0"
    assert redis.llen("rq:queue:ctsr") == queued  # the refused upload was not queued
    assert _upload(c, _bearer(BOB)).status_code == 202  # another key has its own budget


def test_rate_limit_is_shared_by_gateways_through_redis(client: Client) -> None:
    a, b = client(rate_limit_per_min=2), client(rate_limit_per_min=2)
    assert _upload(a).status_code == 202
    assert _upload(b).status_code == 202
    assert _upload(a).status_code == 429  # same client address, counted across both gateways


def test_security_headers_on_every_response(client: Client) -> None:
    c = client(api_keys=KEYS)
    for r in (c.get("/livez"), _upload(c), c.get("/jobs/not-a-job", headers=_bearer(ALICE)), c.get("/nope")):
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    docs = c.get("/docs")
    assert docs.status_code == 200 and "Content-Security-Policy" not in docs.headers  # its scripts must load


def test_cors_is_off_by_default_and_configurable(client: Client) -> None:
    origin = {"Origin": "https://app.example"}
    assert "access-control-allow-origin" not in client().get("/livez", headers=origin).headers
    c = client(cors_origins=["https://app.example"])
    assert c.get("/livez", headers=origin).headers["access-control-allow-origin"] == "https://app.example"
    pre = c.options("/upscale", headers={**origin, "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "authorization"})  # fmt: skip
    assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]
    other = c.get("/livez", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_an_internal_error_is_json_without_a_traceback(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    c = client()
    job = _upload(c).json()["id"]
    monkeypatch.setattr("service.app.JobPayload.from_dict", lambda *_: 1 / 0)  # a bug in the status path
    r = c.get(f"/jobs/{job}")
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal", "message": "internal error; it has been logged"}}
    assert "Traceback" not in r.text and "ZeroDivision" not in r.text
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_bad_key_configuration_is_one_line_at_startup(tmp_path: Any) -> None:
    env = {**os.environ, "CTSR_API_KEYS": json.dumps({"alice": "plaintext-key"}), "CTSR_REDIS_URL": "redis://x:1/0"}
    done = subprocess.run([sys.executable, "-m", "ctsr.cli", "gateway", "--port", "1"], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "SHA-256" in done.stderr, done.stderr


def test_key_new_prints_a_key_and_its_hash() -> None:
    done = subprocess.run([sys.executable, "-m", "ctsr.cli", "key", "new", "carol"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    key = done.stdout.split(": ", 1)[1].splitlines()[0].strip()
    entry = json.loads(done.stdout.splitlines()[1].split(": ", 1)[1])
    assert entry == {"carol": hash_key(key)} and key.startswith("ctsr_")


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_for_counts_only_from_trusted_proxies(redis: Any, tmp_path: Any, trusted: bool) -> None:
    """A real `ctsr gateway` process (uvicorn's own proxy handling, not a test client)."""
    port = free_port()
    env = service_env(redis_url=f"unix://{redis.socket_file}", rate_limit_per_min=2)
    if trusted:
        env["CTSR_TRUSTED_PROXIES"] = '["127.0.0.0/8"]'
    gateway = Proc(["gateway", "--port", str(port)], env, tmp_path / "gateway.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers_ok(f"{url}/livez"), 60, what="the gateway")
        if time.time() % 60 > 40:  # the limiter counts in fixed minutes: keep the three in one
            time.sleep(60.5 - time.time() % 60)
        codes = []
        for i in range(3):  # three different claimed clients from one real peer
            files = {"image": ("in.jpg", jpeg(40, 32), "image/jpeg")}
            headers = {"X-Forwarded-For": f"203.0.113.{i + 1}"}
            codes.append(httpx.post(f"{url}/upscale", files=files, headers=headers, timeout=30).status_code)
        # untrusted: the header is ignored, one peer gets two uploads a minute; trusted: three clients
        assert codes == ([202, 202, 202] if trusted else [202, 202, 429]), gateway.output[-2000:]
    finally:
        gateway.stop()


def test_a_client_dropping_mid_upload_is_one_log_line_and_a_metric(redis: Any, tmp_path: Any) -> None:
    import socket

    port = free_port()
    gateway = Proc(["gateway", "--port", str(port)], service_env(redis_url=f"unix://{redis.socket_file}"),
                   tmp_path / "gateway.log")  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers_ok(f"{url}/livez"), 60, what="the gateway")
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n' + b"x" * 1000
        with socket.create_connection(("127.0.0.1", port)) as sock:  # promises 100 kB, sends 1 kB, leaves
            sock.sendall(b"POST /upscale HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000\r\n\r\n" + part)  # fmt: skip
            time.sleep(0.3)
        wait_for(lambda: "disconnected" in gateway.output, 10, what="the log line")
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert 'ctsr_jobs_rejected_total{reason="client_disconnected"} 1.0' in metrics
        assert "Traceback" not in gateway.output, gateway.output[-3000:]
        assert redis.keys("ctsr:blob:*") == []
    finally:
        gateway.stop()
