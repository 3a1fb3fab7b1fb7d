"""The RQ job function named in :data:`ctsr.contract.JOB_FUNC`.

``ctsr worker`` never calls it: it pulls jobs in groups and batches them. It is here so that a
job stays a normal RQ job (visible in ``rq info`` / rq-dashboard, runnable by a plain
``rq worker`` in a pinch, one job at a time with a model cached per process).
"""

from __future__ import annotations

from typing import Any

_engine = None


def upscale(payload: dict[str, Any]) -> dict[str, Any]:
    from ctsr.settings import Settings

    from .engine import BatchEngine
    from .process import process_jobs

    global _engine
    if _engine is None:
        _engine = BatchEngine(Settings())
    (outcome,) = process_jobs(_engine, [payload])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
