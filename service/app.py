"""FastAPI application: ``POST /upscale``, ``/jobs/{id}``, results, cancel, health and metrics.

:func:`create_app` only wires: settings and connections into one :class:`~service.deps.Gateway`,
middleware, exception handlers and the routers (``service/routes/``: ``jobs`` and ``ops``). The
routes get what they need through ``Depends`` (``service/deps.py``); job lookups are
:class:`service.jobs.JobLookup`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from rq import Queue
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctsr.blobs import open_blob_store
from ctsr.contract import VERSION
from ctsr.contract import JobPayload as JobPayload  # re-exported: tests patch service.app.JobPayload
from ctsr.redis_conn import connect, redis_configured
from ctsr.settings import Settings

from .access import API_CSP, PAGE_CSP, SECURITY_HEADERS, KeyRing, RateLimiter
from .deps import Gateway
from .docs import mount_docs
from .errors import APIError, api_error_handler, http_error_handler
from .jobs import JobLookup
from .metrics import GatewayMetrics
from .routes import jobs, ops
from .routes.ops import STATIC as STATIC  # the web page's files (tests read them from here)
from .webhooks import Deliverer, delivery_task

HTML_PAGES = ("/docs", "/redoc")  # and /docs-assets: scripts and styles; every other response gets API_CSP
log = logging.getLogger("ctsr.gateway")


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
    keys = KeyRing(settings.api_keys)
    deliverer = Deliverer(redis, settings) if settings.webhook_secret else None
    gateway = Gateway(
        settings=settings,
        redis=redis,
        queue=queue,
        store=store,
        metrics=GatewayMetrics(queue),
        keys=keys,
        limiter=RateLimiter(redis, settings.rate_limit_per_min),
        jobs=JobLookup(redis, queue, store, check_owner=keys.enabled),
        waiters=ThreadPoolExecutor(max_workers=settings.max_waiters, thread_name_prefix="ctsr-wait"),
        deliverer=deliverer,
    )
    app = FastAPI(
        lifespan=(lambda _: delivery_task(deliverer)) if deliverer else None,  # a delivery loop only with webhooks on
        title="CTSR super-resolution",
        version=VERSION,
        description="Upload an image with `alpha` in [0, 1] (0 = realness, 1 = fidelity); poll the job; "
        "download the ×4 result.",
        docs_url=None,  # served from local files instead of a CDN (service/docs.py)
        redoc_url=None,
        # operationIds are the handlers' names (upscale, get_job, ...): what generated clients call
        generate_unique_id_function=operation_id,
    )
    app.state.gateway = gateway
    app.state.settings, app.state.redis, app.state.queue = settings, redis, queue
    app.state.deliverer = deliverer

    mount_docs(app)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)  # 404/405 in the same JSON shape
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(RedisError, redis_down)
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
    app.middleware("http")(observe)  # added last: outermost, so it sees every answer, CORS's too

    app.include_router(jobs.router)
    app.include_router(ops.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def operation_id(route: APIRoute) -> str:
    """A route's operationId: its handler's name (``upscale``, ``get_job``, ...)."""
    return route.name


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug must not leak a stack trace: log it, answer a plain JSON 500."""
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    body = {"error": {"code": "internal", "message": "internal error; it has been logged"}}
    return JSONResponse(body, status_code=500, headers={**SECURITY_HEADERS, "Content-Security-Policy": API_CSP})


async def redis_down(_: Request, exc: Exception) -> JSONResponse:
    body = {"error": {"code": "unavailable", "message": "the job store is unreachable; retry shortly"}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Count and time every request by its route, and add the security headers to every answer."""
    metrics = request.app.state.gateway.metrics
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
