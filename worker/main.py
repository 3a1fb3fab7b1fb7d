"""``ctsr worker``: one process, one device, the model loaded once."""

from __future__ import annotations

import logging
import os
import socket

from rq import Queue

from ctsr.blobs import open_blob_store
from ctsr.redis_conn import connect, redis_configured
from ctsr.settings import Settings
from models.errors import CTSRError

from .engine import BatchEngine
from .health import start_health_server
from .metrics import WorkerMetrics
from .rq_worker import BatchWorker

log = logging.getLogger("ctsr.worker")


def run_worker(settings: Settings, burst: bool = False, name: str | None = None) -> int:
    if not redis_configured(settings):
        raise SystemExit("ctsr worker: set CTSR_REDIS_URL or CTSR_REDIS_SENTINELS (or use `ctsr serve`)")
    # A timeout longer than a blocking dequeue (at most maintenance_interval_s): a dead link fails a
    # call instead of hanging the worker for ever.
    redis = connect(settings, socket_timeout=settings.maintenance_interval_s + 20, socket_connect_timeout=5)
    metrics = WorkerMetrics()
    if settings.worker_metrics_port:
        where = f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
        try:
            start_health_server(metrics, settings.worker_metrics_host, settings.worker_metrics_port)
        except OSError as exc:
            raise CTSRError(
                f"the worker cannot serve its metrics on {where} ({exc.strerror or exc}); "
                "set CTSR_WORKER_METRICS_PORT to a free port (0: no metrics server)"
            ) from None
        log.info("worker metrics on http://%s/metrics (probes: /livez, /readyz)", where)
    engine = BatchEngine(settings)  # before registering: a model that fails to load never takes jobs
    queue = Queue(settings.queue, connection=redis)
    store = open_blob_store(settings.blob_store, redis, settings.blob_dir)
    worker = BatchWorker(queue, engine, store, settings, metrics, name=name or f"{socket.gethostname()}.{os.getpid()}")
    if settings.warmup:
        log.info("warm-up pass took %.2fs on %s", engine.warmup(), engine.device)
    log.info("worker %s ready on %s, queue %s", worker.name, engine.device, settings.queue)
    return worker.work_batches(burst=burst)
