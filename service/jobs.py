"""Reading jobs back: find a caller's job, say where it stands, pick its result.

:class:`JobLookup` is what ``GET /jobs/{id}``, ``GET /jobs/{id}/result``, ``DELETE /jobs/{id}``
and ``Prefer: wait`` share. It only reads Redis and the blob store, so it can be tested on its own
against a Redis (``tests/test_job_lookup.py``) and a ``GET`` never changes a job.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from ctsr.blobs import BlobStore
from ctsr.contract import JOB_FUNC, JobPayload, alpha_label, expired_key, is_job_id, progress_key

from .errors import APIError


def job_urls(job_id: str) -> dict[str, str]:
    """The links every job answer carries (``JobLinks`` in the schema)."""
    return {"job": f"/jobs/{job_id}", "result": f"/jobs/{job_id}/result", "cancel": f"/jobs/{job_id}"}


@dataclass
class StoredResult:
    """One output image of a finished job, ready to be streamed: never the whole image in memory."""

    label: str  # the sweep member, as in ``X-CTSR-Alpha`` (e.g. ``0.5``)
    content_type: str
    size: int
    pieces: Iterator[bytes]


class JobLookup:
    """The caller's jobs as clients see them. Reads only: nothing here writes to Redis.

    **Expiry has one owner: the worker.** A job carries its queue deadline in its payload
    (``JobPayload.deadline``, set by ``POST /upscale``). The worker that dequeues a job past that
    deadline fails it with ``JobExpired`` before it starts, deletes its input and announces its end
    (``Prefer: wait`` waiters and its webhook hear of it). That is the one place that can decide
    it without a race: it has just claimed the job (``claim_key``), so no DELETE or other worker
    acts on it at the same time.

    The gateway used to expire a queued job too, when a client happened to poll it past its
    deadline (cancel in RQ, delete the input, set ``expired_key``): a ``GET`` that wrote, raced the
    worker's claim and woke no waiter or webhook. Now the lookup only *reports* such a job as
    ``expired`` (its deadline has passed: it will never run) and leaves it for the worker; until a
    worker reaches it, it holds its place in the queue and its input keeps its TTL. Jobs expired
    by the gateway before this change (canceled with ``expired_key`` set) still read as
    ``expired``.

    ``check_owner``: API keys are on, so a job made under another key is "no such job".
    """

    def __init__(self, redis: Redis, queue: Queue, store: BlobStore, *, check_owner: bool = False) -> None:
        self.redis, self.queue, self.store, self.check_owner = redis, queue, store, check_owner

    def fetch(self, job_id: str, owner: str | None) -> Job:
        """The job, if it exists and belongs to ``owner`` (another key's job is "no such job")."""
        if not is_job_id(job_id):
            raise APIError(404, "unknown_job", "no such job (job ids are UUIDs)")
        try:
            job = Job.fetch(job_id, connection=self.redis)
        except NoSuchJobError:
            job = None
        if job is None or job.func_name != JOB_FUNC:  # a shared Redis may hold other applications' RQ jobs
            raise APIError(404, "unknown_job", "no such job (or it has expired and been removed)")
        if self.check_owner and JobPayload.from_dict(job.args[0]).owner != owner:
            raise APIError(404, "unknown_job", "no such job (or it has expired and been removed)")
        return job

    def status(self, job: Job) -> str:
        """The public status: RQ's, or ``expired`` for a job that outlived its queue deadline."""
        return self._status(job, JobPayload.from_dict(job.args[0]))[0]

    def describe(self, job: Job) -> dict[str, Any]:
        """The ``GET /jobs/{id}`` body (``JobStatusBody`` in the schema)."""
        payload = JobPayload.from_dict(job.args[0])
        public, failure = self._status(job, payload)
        out: dict[str, Any] = {
            "id": job.id,
            "status": public,
            "alphas": payload.alphas,
            "format": payload.format,
            "input": {"width": payload.width, "height": payload.height},
            "created_at": job.created_at.isoformat() if job.created_at else None,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "ended_at": job.ended_at.isoformat() if job.ended_at else None,
            "urls": job_urls(job.id),
        }
        status = job.get_status(refresh=False)
        if public == "queued":
            out["queue_position"] = self.queue.get_job_position(job.id)
        elif status == JobStatus.STARTED:
            progress = self.redis.get(progress_key(job.id))
            out["progress"] = float(progress) if progress else 0.0
        elif status == JobStatus.FINISHED:
            result = job.return_value() or {}
            out["output"] = {"width": result.get("width"), "height": result.get("height")}
        elif status == JobStatus.FAILED:
            out["error"] = {"message": (failure or "").split(": ", 1)[-1][:300]}
        return out

    def _status(self, job: Job, payload: JobPayload) -> tuple[str, str | None]:
        """(public status, the last line of the failure for a failed job)."""
        status = job.get_status(refresh=False)
        if status == JobStatus.QUEUED:
            expired = payload.deadline and time.time() > payload.deadline
            return ("expired" if expired else "queued"), None
        if status == JobStatus.FAILED:
            latest = job.latest_result()
            reason = ((latest.exc_string if latest else "") or "").strip()
            last = reason.splitlines()[-1] if reason else "unknown error"
            return ("expired" if "JobExpired" in last else "failed"), last
        if status == JobStatus.CANCELED and self.redis.exists(expired_key(job.id)):
            return "expired", None  # expired by a gateway of an earlier release (see the class docstring)
        return (status.value if status else "unknown"), None

    def result(self, job: Job, alpha: float | None) -> StoredResult:
        """A finished job's output for ``alpha`` (None: its only one); 422 for a sweep without
        ``alpha``, 404 for an alpha it did not make, 410 once the output has expired."""
        result = job.return_value() or {}
        outputs: dict[str, str] = result.get("outputs", {})
        if alpha is None and len(outputs) > 1:  # a sweep: which member is the caller's to say
            raise APIError(422, "alpha_required", f"this job made a sweep; add ?alpha= one of {', '.join(outputs)}")
        label = alpha_label(alpha) if alpha is not None else next(iter(outputs), None)
        if label not in outputs:
            raise APIError(404, "unknown_alpha", f"this job has results for alpha {', '.join(outputs)}")
        blob = self.store.stream(outputs[label])
        if blob is None:
            raise APIError(410, "expired", "the result has expired")
        size, pieces = blob
        return StoredResult(label, result["content_type"], size, pieces)
