"""Jobs: ``POST /upscale``, ``GET /jobs/{job_id}``, ``GET /jobs/{job_id}/result``, ``DELETE /jobs/{job_id}``.

The handlers' names are the operationIds generated clients call (``upscale``, ``get_job``, ...):
keep them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from rq import Retry as JobRetry
from rq.job import Job, JobStatus
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from ctsr.contract import (
    ACCEPTED_KEY,
    COLOR_FIXES,
    DEFAULT_COLOR_FIX,
    DEFAULT_FORMAT,
    DEFAULT_QUALITY,
    JOB_FUNC,
    OUTPUT_FORMATS,
    QUALITY_RANGE,
    JobPayload,
    alpha_label,
    announce_end,
    cancel_job,
    canceled_key,
    claim_key,
    done_key,
    input_key,
    new_job_id,
)

from ..access import caller_id
from ..deps import Caller, Gateway, GatewayDep, Jobs
from ..errors import APIError
from ..jobs import JobLookup, StoredResult, job_urls
from ..schemas import PREFER_PARAMETER, ROUTE_RESPONSES
from ..uploads import (
    BodyTooLarge,
    UpscaleOptions,
    check_image,
    check_output_size,
    limited_receive,
    parse_alpha,
    parse_options,
)
from ..webhooks import check_url

FORM_SLACK = 64 * 1024  # multipart boundaries and the small fields around the image
log = logging.getLogger("ctsr.gateway")

#: ``POST /upscale`` reads its multipart body by hand (streamed, size-capped): its schema is written out.
UPLOAD_SCHEMA = {
    "parameters": [PREFER_PARAMETER],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "alpha": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
                        "format": {"type": "string", "enum": list(OUTPUT_FORMATS), "default": DEFAULT_FORMAT},
                        "quality": {
                            "type": "integer",
                            "minimum": QUALITY_RANGE[0],
                            "maximum": QUALITY_RANGE[1],
                            "default": DEFAULT_QUALITY,
                        },
                        "color_fix": {"type": "string", "enum": list(COLOR_FIXES), "default": DEFAULT_COLOR_FIX},
                        "webhook": {
                            "type": "string",
                            "format": "uri",
                            "description": "POSTed (signed) when the job ends",
                        },
                    },
                }
            }
        },
    },
}

router = APIRouter()


@router.post(
    "/upscale",
    status_code=202,
    openapi_extra=UPLOAD_SCHEMA,
    summary="Queue an image for ×4 upscaling",
    responses=ROUTE_RESPONSES["POST /upscale"],
)
async def upscale(request: Request, gateway: GatewayDep, jobs: Jobs, owner: Caller) -> Response:
    settings, metrics, loop = gateway.settings, gateway.metrics, asyncio.get_running_loop()
    # Redis round trips and Pillow run in threads: a slow one must not stall the event loop,
    # which serves every other connection of this gateway
    caller = caller_id(request, owner)
    rate_headers = await loop.run_in_executor(None, gateway.limiter.hit, caller)  # before reading the body
    queued = await loop.run_in_executor(None, lambda: gateway.queue.count)
    if queued >= settings.max_queue_depth:
        metrics.rejected.labels("queue_full").inc()  # refused before a byte of the body is read
        raise APIError(429, "queue_full", "the queue is full; retry later", {"Retry-After": "10"})
    limit = settings.max_upload_bytes + FORM_SLACK
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        metrics.rejected.labels("upload_too_large").inc()
        raise APIError(413, "upload_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes")
    try:
        form = await Request(request.scope, limited_receive(request.receive, limit)).form(
            max_files=1, max_fields=32, max_part_size=4096
        )
    except ClientDisconnect:  # the client went away mid-upload: nothing to answer, nothing stored
        metrics.rejected.labels("client_disconnected").inc()
        log.info("upload from %s: the client disconnected before its body ended", caller_id(request, owner))
        return Response(status_code=400)
    except BodyTooLarge:
        metrics.rejected.labels("upload_too_large").inc()
        raise APIError(413, "upload_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes") from None
    except (MultiPartException, StarletteHTTPException, AssertionError, ValueError) as exc:
        # Starlette turns multipart parse errors into its HTTPException when an app is in scope
        metrics.rejected.labels("malformed_form").inc()
        detail = str(getattr(exc, "detail", exc))[:80]
        raise APIError(400, "malformed_form", f"expected multipart/form-data ({detail})") from None
    try:
        response = await _accept(request, form, owner, gateway, jobs)
        response.headers.update(rate_headers)
        return response
    except APIError as exc:
        metrics.rejected.labels(exc.code).inc()
        raise
    finally:
        await form.close()


async def _accept(request: Request, form: FormData, owner: str | None, gateway: Gateway, jobs: JobLookup) -> Response:
    settings, loop = gateway.settings, asyncio.get_running_loop()
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "missing_image", "send the image as a file in the multipart field 'image'")
    options = parse_options(form, settings)
    webhook = form.get("webhook") or None
    if webhook is not None:
        if not isinstance(webhook, str):
            raise APIError(400, "invalid_webhook", "webhook must be a URL string")
        if not settings.webhook_secret:
            raise APIError(400, "webhooks_disabled", "this service has no webhook secret configured")
        await loop.run_in_executor(None, check_url, webhook, settings)
    data = await upload.read()
    job_id = await loop.run_in_executor(None, _admit, gateway, data, options, owner, webhook)
    if settings.redis_min_replica_acks:
        await loop.run_in_executor(None, _await_replicas, gateway, job_id)
    gateway.metrics.submitted.inc()
    body = {"id": job_id, "status": "queued", "urls": job_urls(job_id)}
    wait = prefer_wait(request.headers.get("prefer"))
    # Past CTSR_MAX_WAITERS the preference is not applied (RFC 7240 lets a server ignore it):
    # the job is queued all the same and the client gets its 202 at once, never a late one.
    if wait and gateway.waiting < settings.max_waiters:
        gateway.waiting += 1
        try:
            job = await _wait_for(gateway, job_id, min(wait, settings.max_wait_s))
        finally:
            gateway.waiting -= 1
        return await loop.run_in_executor(gateway.waiters, _answer_after_wait, jobs, job, len(options.alphas), body)
    return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job_id}"})


def _admit(gateway: Gateway, data: bytes, options: UpscaleOptions, owner: str | None, webhook: str | None) -> str:
    """Check the image (no pixel is decoded), store it and enqueue its job; the new job's id.

    Blocking (Pillow, Redis): runs in a thread."""
    settings, queue = gateway.settings, gateway.queue
    width, height = check_image(data, settings)
    check_output_size(width, height, options.format, len(options.alphas), settings)
    if queue.count >= settings.max_queue_depth:
        raise APIError(429, "queue_full", "the queue is full; retry later", {"Retry-After": "10"})
    job_id = new_job_id()
    now = time.time()
    payload = JobPayload(
        job_id, options.alphas, options.format, options.quality, options.color_fix, width, height,
        submitted_at=now, deadline=now + settings.max_queue_wait_s, owner=owner, webhook=webhook,
    )  # fmt: skip
    ttl = settings.result_ttl_s
    gateway.store.put(input_key(job_id), data, ttl)
    queue.enqueue(
        JOB_FUNC,
        payload.to_dict(),
        job_id=job_id,
        job_timeout=settings.job_timeout_s,
        result_ttl=ttl,
        failure_ttl=ttl,
        retry=JobRetry(max=settings.job_retries) if settings.job_retries else None,
        description=f"upscale {width}x{height} alphas={','.join(map(alpha_label, options.alphas))}",
    )
    return job_id


def _answer_after_wait(jobs: JobLookup, job: Job, alphas: int, body: dict[str, Any]) -> Response:
    """The answer to ``Prefer: wait`` once the wait ended: the image, the job, or the 202 body.

    Blocking (reads the result from Redis): runs in a thread."""
    status = job.get_status(refresh=False)
    if status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED):
        if alphas == 1 and status == JobStatus.FINISHED:  # the image itself
            return _image(jobs.result(job, None))
        return JSONResponse(jobs.describe(job), status_code=200)
    body["status"] = jobs.status(job)  # queued or started by now
    return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job.id}"})


def _await_replicas(gateway: Gateway, job_id: str) -> None:
    """Answer 202 only for a job that survives losing the primary: WAIT for the replicas on
    the connection that made the last write (WAIT counts that connection's writes; the
    replication stream is ordered, so the input blob and the enqueue are covered too)."""
    settings, redis = gateway.settings, gateway.redis
    with redis.pipeline(transaction=False) as pipe:
        pipe.incr(ACCEPTED_KEY)
        pipe.execute_command("WAIT", settings.redis_min_replica_acks, settings.redis_replica_wait_ms)
        acks = pipe.execute()[-1]
    if acks < settings.redis_min_replica_acks:  # not durable: do not run it, let the client retry
        cancel_job(Job.fetch(job_id, connection=redis), settings.result_ttl_s)
        gateway.store.delete(input_key(job_id))
        gateway.metrics.rejected.labels("not_replicated").inc()
        raise APIError(
            503, "not_replicated",
            f"the job store could not confirm {settings.redis_min_replica_acks} replica(s) in time; retry shortly",
            {"Retry-After": "5"},
        )  # fmt: skip


async def _wait_for(gateway: Gateway, job_id: str, seconds: float) -> Job:
    """Block (in a thread, on BLPOP) until the worker announces the job's end or ``seconds``
    pass; the job as it is then."""
    loop, redis = asyncio.get_running_loop(), gateway.redis
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        # short BLPOP rounds: the client's socket timeout must not fire while Redis blocks
        timeout = min(max(left, 0.01), 3)
        if await loop.run_in_executor(gateway.waiters, redis.blpop, [done_key(job_id)], timeout):
            break
    return await loop.run_in_executor(gateway.waiters, Job.fetch, job_id, redis)


def prefer_wait(header: str | None) -> float:
    """``Prefer: wait=N`` (RFC 7240) → N seconds, 0 when absent or malformed."""
    for part in (header or "").split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "wait":
            try:
                return max(float(value), 0.0)
            except ValueError:
                return 0.0
    return 0.0


def _image(result: StoredResult) -> StreamingResponse:
    """A result sent a piece at a time (in a thread): never the whole image in memory."""
    headers = {"X-CTSR-Alpha": result.label, "Content-Length": str(result.size)}
    return StreamingResponse(result.pieces, media_type=result.content_type, headers=headers)


@router.get("/jobs/{job_id}", summary="Job status", responses=ROUTE_RESPONSES["GET /jobs/{job_id}"])
def get_job(job_id: str, jobs: Jobs, owner: Caller) -> JSONResponse:
    return JSONResponse(jobs.describe(jobs.fetch(job_id, owner)))


@router.get(
    "/jobs/{job_id}/result",
    summary="The upscaled image (`alpha` picks a sweep member)",
    response_class=Response,  # no JSON default: 200 is an image, errors stay JSON
    responses=ROUTE_RESPONSES["GET /jobs/{job_id}/result"],
)
def get_result(
    job_id: str, jobs: Jobs, owner: Caller, alpha: str | None = Query(None, description="a sweep member, in [0, 1]")
) -> Response:
    job = jobs.fetch(job_id, owner)
    status = jobs.status(job)
    if status == "expired":
        raise APIError(410, "expired", "the job expired before it ran")
    if status != "finished":
        raise APIError(409, "not_finished", f"the job is {status}")
    return _image(jobs.result(job, None if alpha is None else parse_alpha(alpha)))


@router.delete("/jobs/{job_id}", summary="Cancel a job", responses=ROUTE_RESPONSES["DELETE /jobs/{job_id}"])
def delete_job(job_id: str, gateway: GatewayDep, jobs: Jobs, owner: Caller) -> JSONResponse:
    settings, redis = gateway.settings, gateway.redis
    job = jobs.fetch(job_id, owner)
    status = job.get_status(refresh=False)
    if status == JobStatus.QUEUED and jobs.status(job) == "expired":
        # past its queue deadline: it will never run, and expiring it is the worker's (JobLookup)
        return JSONResponse({"id": job.id, "status": "canceled"})
    if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED) and redis.set(
        claim_key(job.id), "cancel", nx=True, ex=settings.result_ttl_s
    ):  # no worker has claimed it: it will never start
        cancel_job(job, settings.result_ttl_s)
        gateway.store.delete(input_key(job.id))
        with redis.pipeline() as pipe:  # its waiters and its webhook hear of it, as of any other end
            announce_end(pipe, JobPayload.from_dict(job.args[0]), "canceled")
            pipe.execute()
        return JSONResponse({"id": job.id, "status": "canceled"})
    if status in (JobStatus.STARTED, JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
        # running, or claimed by a worker that is starting it: it stops at the end of its batch
        redis.set(canceled_key(job.id), "1", ex=settings.result_ttl_s)
        return JSONResponse({"id": job.id, "status": "canceling"}, status_code=202)
    if status == JobStatus.CANCELED:
        return JSONResponse({"id": job.id, "status": "canceled"})
    raise APIError(409, "already_finished", f"the job is already {status.value if status else 'gone'}")
