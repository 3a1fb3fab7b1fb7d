"""The worker's own HTTP port: ``/metrics`` for Prometheus, ``/livez`` and ``/readyz`` for probes.

Readiness means what an orchestrator needs before it counts the worker: the model is loaded and
warm and the worker is taking jobs (``ctsr_worker_model_ready``). Liveness only says the process
answers; a worker stuck in a batch is caught by RQ's heartbeats, not by killing it here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from .metrics import WorkerMetrics


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: no access log
        pass


def health_app(metrics: WorkerMetrics) -> Callable[..., Iterable[bytes]]:
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in ("/livez", "/readyz"):
            metrics_page: Iterable[bytes] = prometheus(environ, start_response)
            return metrics_page
        ok = path == "/livez" or metrics.ready
        body = b"ok\n" if ok else b"model not loaded yet\n"
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return app


def start_health_server(metrics: WorkerMetrics, host: str, port: int) -> WSGIServer:
    """Serve in a daemon thread; raises ``OSError`` when the port cannot be bound."""
    server = make_server(host, port, health_app(metrics), server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="ctsr-worker-http", daemon=True).start()
    return server
