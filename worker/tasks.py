"""The RQ job function named in :data:`ctsr.contract.JOB_FUNC`.

``ctsr worker`` never calls it: it pulls jobs in groups and batches them. It is here so that a
job stays a normal RQ job (visible in ``rq info`` / rq-dashboard, and runnable by a plain
``rq worker --worker-class rq.worker.SimpleWorker`` in a pinch: one job at a time, with the
model cached per process).
"""

from __future__ import annotations

from typing import Any

_engine = None


def upscale(payload: dict[str, Any]) -> dict[str, Any]:
    from rq import get_current_job

    from ctsr.blobs import open_blob_store
    from ctsr.contract import input_key
    from ctsr.settings import Settings

    from .engine import BatchEngine
    from .process import process_jobs

    global _engine
    settings = Settings()
    if _engine is None:
        _engine = BatchEngine(settings)
    job = get_current_job()
    assert job is not None, "upscale() runs inside an RQ job"
    redis = job.connection
    store = open_blob_store(settings.blob_store, redis, settings.blob_dir)
    (outcome,) = process_jobs(_engine, store, [payload], settings.result_ttl_s)
    if isinstance(outcome, BaseException):
        raise outcome
    store.delete(input_key(job.id))  # finished (RQ records it when this returns)
    return outcome
