"""FastAPI application: ``POST /upscale``, ``/jobs/{id}``, results, cancel, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from rq import Queue
from rq import Retry as JobRetry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from ctsr.blobs import open_blob_store
from ctsr.contract import (
    ACCEPTED_KEY,
    JOB_FUNC,
    OUTPUT_FORMATS,
    READY_PATTERN,
    JobPayload,
    alpha_label,
    announce_end,
    cancel_job,
    canceled_key,
    claim_key,
    done_key,
    expired_key,
    input_key,
    is_job_id,
    new_job_id,
    progress_key,
)
from ctsr.redis_conn import connect, redis_configured
from ctsr.settings import Settings

from .access import API_CSP, PAGE_CSP, SECURITY_HEADERS, KeyRing, RateLimiter, caller_id
from .docs import mount_docs
from .errors import APIError, api_error_handler, http_error_handler
from .metrics import GatewayMetrics
from .schemas import PREFER_PARAMETER, ROUTE_RESPONSES
from .uploads import BodyTooLarge, check_image, check_output_size, limited_receive, parse_alpha, parse_options
from .webhooks import Deliverer, check_url, delivery_task

FORM_SLACK = 64 * 1024  # multipart boundaries and the small fields around the image
HTML_PAGES = ("/docs", "/redoc")  # and /docs-assets: scripts and styles; every other response gets API_CSP
STATIC = Path(__file__).resolve().parent / "static"  # the web page: plain HTML, CSS and JS, no build step
log = logging.getLogger("ctsr.gateway")

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
                        "format": {"type": "string", "enum": list(OUTPUT_FORMATS), "default": "png"},
                        "quality": {"type": "integer", "minimum": 1, "maximum": 100, "default": 90},
                        "color_fix": {"type": "string", "enum": ["wavelet", "adain", "none"], "default": "wavelet"},
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


def create_app(settings: Settings | None = None, redis: Redis | None = None) -> FastAPI:
    settings = settings or Settings()
    if redis is None:
        if not redis_configured(settings):
            raise RuntimeError("set CTSR_REDIS_URL or CTSR_REDIS_SENTINELS (or use `ctsr serve`)")
        # Two quick retries ride out a blip; an outage answers 503 in well under a second
        # (redis-py's default back-off would hold every request for seconds first).
        redis = connect(
            settings, socket_timeout=5, socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2),
        )  # fmt: skip
    queue = Queue(settings.queue, connection=redis)
    store = open_blob_store(settings.blob_store, redis, settings.blob_dir)
    metrics = GatewayMetrics(queue)
    # `Prefer: wait` requests block in BLPOP; the default executor (cores + 4 threads) is too small
    waiters = ThreadPoolExecutor(max_workers=settings.max_waiters, thread_name_prefix="ctsr-wait")
    waiting = [0]  # requests in a Prefer: wait now (one event loop: no lock needed)
    deliverer = Deliverer(redis, settings) if settings.webhook_secret else None
    app = FastAPI(
        lifespan=(lambda _: delivery_task(deliverer)) if deliverer else None,  # a delivery loop only with webhooks on
        title="CTSR super-resolution",
        version="0.1.0",
        description="Upload an image with `alpha` in [0, 1] (0 = realness, 1 = fidelity); poll the job; "
        "download the ×4 result.",
        docs_url=None,  # served from local files instead of a CDN (service/docs.py)
        redoc_url=None,
        # operationIds are the handlers' names (upscale, get_job, ...): what generated clients call
        generate_unique_id_function=lambda route: route.name,
    )
    mount_docs(app)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)  # 404/405 in the same JSON shape
    keys = KeyRing(settings.api_keys)
    limiter = RateLimiter(redis, settings.rate_limit_per_min)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Prefer"],
            expose_headers=[
                "Location",
                "Retry-After",
                "X-CTSR-Alpha",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
            ],
            max_age=600,
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug must not leak a stack trace: log it, answer a plain JSON 500."""
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        body = {"error": {"code": "internal", "message": "internal error; it has been logged"}}
        return JSONResponse(body, status_code=500, headers={**SECURITY_HEADERS, "Content-Security-Policy": API_CSP})

    @app.exception_handler(RedisError)
    async def redis_down(_: Request, exc: RedisError) -> JSONResponse:
        body = {"error": {"code": "unavailable", "message": "the job store is unreachable; retry shortly"}}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        metrics.latency.labels(request.method, path).observe(time.perf_counter() - start)
        response.headers.update(SECURITY_HEADERS)
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            response.headers["Content-Security-Policy"] = PAGE_CSP
        elif not request.url.path.startswith(HTML_PAGES):
            response.headers["Content-Security-Policy"] = API_CSP
        return response

    def urls(job_id: str) -> dict[str, str]:
        return {"job": f"/jobs/{job_id}", "result": f"/jobs/{job_id}/result", "cancel": f"/jobs/{job_id}"}

    def fetch(job_id: str, request: Request) -> Job:
        """The job, if it exists and belongs to the caller (another key's job is "no such job")."""
        owner = keys.identify(request)
        if not is_job_id(job_id):
            raise APIError(404, "unknown_job", "no such job (job ids are UUIDs)")
        try:
            job = Job.fetch(job_id, connection=redis)
        except NoSuchJobError:
            job = None
        if job is None or job.func_name != JOB_FUNC:  # a shared Redis may hold other applications' RQ jobs
            raise APIError(404, "unknown_job", "no such job (or it has expired and been removed)")
        if keys.enabled and JobPayload.from_dict(job.args[0]).owner != owner:
            raise APIError(404, "unknown_job", "no such job (or it has expired and been removed)")
        return job

    def describe(job: Job) -> dict[str, Any]:
        payload = JobPayload.from_dict(job.args[0])
        status = job.get_status(refresh=False)
        out: dict[str, Any] = {
            "id": job.id,
            "status": status.value if status else "unknown",
            "alphas": payload.alphas,
            "format": payload.format,
            "input": {"width": payload.width, "height": payload.height},
            "created_at": job.created_at.isoformat() if job.created_at else None,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "ended_at": job.ended_at.isoformat() if job.ended_at else None,
            "urls": urls(job.id),
        }
        if status == JobStatus.QUEUED:
            if payload.deadline and time.time() > payload.deadline:
                expire(job)
                out["status"] = "expired"
            else:
                position = queue.get_job_position(job.id)
                out["queue_position"] = position
        elif status == JobStatus.STARTED:
            progress = redis.get(progress_key(job.id))
            out["progress"] = float(progress) if progress else 0.0
        elif status == JobStatus.FINISHED:
            result = job.return_value() or {}
            out["output"] = {"width": result.get("width"), "height": result.get("height")}
        elif status == JobStatus.FAILED:
            latest = job.latest_result()
            reason = (latest.exc_string if latest else "") or ""
            last = reason.strip().splitlines()[-1] if reason.strip() else "unknown error"
            if "JobExpired" in last:
                out["status"] = "expired"
            out["error"] = {"message": last.split(": ", 1)[-1][:300]}
        elif status == JobStatus.CANCELED and redis.exists(expired_key(job.id)):
            out["status"] = "expired"  # canceled by the gateway because it outlived its queue deadline
        return out

    def expire(job: Job) -> None:
        cancel_job(job, settings.result_ttl_s)
        store.delete(input_key(job.id))
        redis.set(expired_key(job.id), "1", ex=settings.result_ttl_s)

    def _await_replicas(job_id: str) -> None:
        """Answer 202 only for a job that survives losing the primary: WAIT for the replicas on
        the connection that made the last write (WAIT counts that connection's writes; the
        replication stream is ordered, so the input blob and the enqueue are covered too)."""
        with redis.pipeline(transaction=False) as pipe:
            pipe.incr(ACCEPTED_KEY)
            pipe.execute_command("WAIT", settings.redis_min_replica_acks, settings.redis_replica_wait_ms)
            acks = pipe.execute()[-1]
        if acks < settings.redis_min_replica_acks:  # not durable: do not run it, let the client retry
            cancel_job(Job.fetch(job_id, connection=redis), settings.result_ttl_s)
            store.delete(input_key(job_id))
            metrics.rejected.labels("not_replicated").inc()
            raise APIError(
                503, "not_replicated",
                f"the job store could not confirm {settings.redis_min_replica_acks} replica(s) in time; retry shortly",
                {"Retry-After": "5"},
            )  # fmt: skip

    @app.post(
        "/upscale",
        status_code=202,
        openapi_extra=UPLOAD_SCHEMA,
        summary="Queue an image for ×4 upscaling",
        responses=ROUTE_RESPONSES["POST /upscale"],
    )
    async def upscale(request: Request) -> Response:
        owner = keys.identify(request)
        rate_headers = limiter.hit(caller_id(request, owner))  # before reading the body
        if await asyncio.get_running_loop().run_in_executor(None, lambda: queue.count) >= settings.max_queue_depth:
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
            raise APIError(
                413, "upload_too_large", f"uploads are limited to {settings.max_upload_bytes} bytes"
            ) from None
        except (MultiPartException, StarletteHTTPException, AssertionError, ValueError) as exc:
            # Starlette turns multipart parse errors into its HTTPException when an app is in scope
            metrics.rejected.labels("malformed_form").inc()
            detail = str(getattr(exc, "detail", exc))[:80]
            raise APIError(400, "malformed_form", f"expected multipart/form-data ({detail})") from None
        try:
            response = await _accept(request, form, owner)
            response.headers.update(rate_headers)
            return response
        except APIError as exc:
            metrics.rejected.labels(exc.code).inc()
            raise
        finally:
            await form.close()

    async def _accept(request: Request, form: Any, owner: str | None) -> Response:
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
            await asyncio.get_running_loop().run_in_executor(None, check_url, webhook, settings)
        data = await upload.read()
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
        store.put(input_key(job_id), data, ttl)
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
        if settings.redis_min_replica_acks:
            await asyncio.get_running_loop().run_in_executor(None, _await_replicas, job_id)
        metrics.submitted.inc()
        body = {"id": job_id, "status": "queued", "urls": urls(job_id)}
        wait = _prefer_wait(request.headers.get("prefer"))
        # Past CTSR_MAX_WAITERS the preference is not applied (RFC 7240 lets a server ignore it):
        # the job is queued all the same and the client gets its 202 at once, never a late one.
        if wait and waiting[0] < settings.max_waiters:
            waiting[0] += 1
            try:
                job = await _wait_for(job_id, min(wait, settings.max_wait_s))
            finally:
                waiting[0] -= 1
            status = job.get_status(refresh=False)
            if status in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED):
                if len(options.alphas) == 1 and status == JobStatus.FINISHED:  # the image itself
                    return _result_response(job, None)
                return JSONResponse(describe(job), status_code=200)
            body["status"] = describe(job)["status"]  # queued or started by now
        return JSONResponse(body, status_code=202, headers={"Location": f"/jobs/{job_id}"})

    async def _wait_for(job_id: str, seconds: float) -> Job:
        """Block (in a thread, on BLPOP) until the worker announces the job's end or ``seconds``
        pass; the job as it is then."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            # short BLPOP rounds: the client's socket timeout must not fire while Redis blocks
            timeout = min(max(left, 0.01), 3)
            if await asyncio.get_running_loop().run_in_executor(waiters, redis.blpop, [done_key(job_id)], timeout):
                break
        return await asyncio.get_running_loop().run_in_executor(waiters, Job.fetch, job_id, redis)

    def _result_response(job: Job, alpha: float | None) -> Response:
        result = job.return_value() or {}
        outputs: dict[str, str] = result.get("outputs", {})
        if alpha is None and len(outputs) > 1:  # a sweep: which member is the caller's to say
            raise APIError(422, "alpha_required", f"this job made a sweep; add ?alpha= one of {', '.join(outputs)}")
        label = alpha_label(alpha) if alpha is not None else next(iter(outputs), None)
        if label not in outputs:
            raise APIError(404, "unknown_alpha", f"this job has results for alpha {', '.join(outputs)}")
        blob = store.stream(outputs[label])
        if blob is None:
            raise APIError(410, "expired", "the result has expired")
        size, pieces = blob  # sent a piece at a time (in a thread): never the whole image in memory
        headers = {"X-CTSR-Alpha": label, "Content-Length": str(size)}
        return StreamingResponse(pieces, media_type=result["content_type"], headers=headers)

    @app.get("/jobs/{job_id}", summary="Job status", responses=ROUTE_RESPONSES["GET /jobs/{job_id}"])
    def get_job(job_id: str, request: Request) -> JSONResponse:
        job = fetch(job_id, request)
        return JSONResponse(describe(job))

    @app.get(
        "/jobs/{job_id}/result",
        summary="The upscaled image (`alpha` picks a sweep member)",
        response_class=Response,  # no JSON default: 200 is an image, errors stay JSON
        responses=ROUTE_RESPONSES["GET /jobs/{job_id}/result"],
    )
    def get_result(
        job_id: str, request: Request, alpha: str | None = Query(None, description="a sweep member, in [0, 1]")
    ) -> Response:
        job = fetch(job_id, request)
        status = describe(job)["status"]
        if status == "expired":
            raise APIError(410, "expired", "the job expired before it ran")
        if status != "finished":
            raise APIError(409, "not_finished", f"the job is {status}")
        return _result_response(job, None if alpha is None else parse_alpha(alpha))

    @app.delete("/jobs/{job_id}", summary="Cancel a job", responses=ROUTE_RESPONSES["DELETE /jobs/{job_id}"])
    def delete_job(job_id: str, request: Request) -> JSONResponse:
        job = fetch(job_id, request)
        status = job.get_status(refresh=False)
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED) and redis.set(
            claim_key(job.id), "cancel", nx=True, ex=settings.result_ttl_s
        ):  # no worker has claimed it: it will never start
            cancel_job(job, settings.result_ttl_s)
            store.delete(input_key(job.id))
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

    @app.get("/livez", summary="The process is up", responses=ROUTE_RESPONSES["GET /livez"])
    def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Redis answers and a warmed-up worker heart-beats (the latter unless CTSR_READY_NEEDS_WORKER=false)",
        responses=ROUTE_RESPONSES["GET /readyz"],
    )
    def readyz() -> JSONResponse:
        try:
            redis.ping()
            workers = sum(1 for _ in redis.scan_iter(READY_PATTERN, count=100))
        except RedisError:
            return JSONResponse({"status": "unavailable", "redis": False}, status_code=503)
        ready = workers > 0 or not settings.ready_needs_worker
        return JSONResponse({"status": "ok" if ready else "no_workers", "redis": True, "workers": workers},
                            status_code=200 if ready else 503)  # fmt: skip

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,  # no JSON default: 200 is text/plain, errors stay JSON
        responses=ROUTE_RESPONSES["GET /metrics"],
    )
    def get_metrics(request: Request) -> Response:
        if settings.metrics_need_key:
            keys.identify(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # HEAD for load balancers and uptime checkers: the GET answer without its body (kept out of
    # the schema, where it would be a second operation for generated clients to carry)
    for path, probe in (("/livez", livez), ("/readyz", readyz), ("/metrics", get_metrics)):
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)

    @app.get("/", include_in_schema=False)
    def web_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.state.settings, app.state.redis, app.state.queue = settings, redis, queue
    app.state.deliverer = deliverer
    return app


def _prefer_wait(header: str | None) -> float:
    """``Prefer: wait=N`` (RFC 7240) → N seconds, 0 when absent or malformed."""
    for part in (header or "").split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "wait":
            try:
                return max(float(value), 0.0)
            except ValueError:
                return 0.0
    return 0.0
