"""The gateway's response bodies as pydantic models, for the OpenAPI document only.

The handlers build their JSON by hand (``JobLookup.describe()``, ``APIError``); these models say what that
JSON is, so that ``/openapi.json`` documents every answer (status code, content type, body,
headers) and a schema-driven client or fuzzer (``tests/test_schemathesis.py``) can hold the
gateway to it. ``ROUTE_RESPONSES`` holds the ``responses=`` argument of each route's decorator.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from ctsr.contract import OUTPUT_FORMATS


# -- errors -----------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable: branch on this (e.g. `queue_full`)")
    message: str = Field(description="for people; may change")


class ErrorBody(BaseModel):
    """Every 4xx/5xx the gateway makes itself."""

    error: ErrorDetail


# -- jobs -------------------------------------------------------------------------------------------
class JobLinks(BaseModel):
    job: str
    result: str
    cancel: str


class JobAccepted(BaseModel):
    """``POST /upscale`` → 202."""

    id: str = Field(description="a UUID")
    status: Literal["queued"]
    urls: JobLinks


class Size(BaseModel):
    width: int
    height: int


class OutputSize(BaseModel):
    width: int | None
    height: int | None


class JobFailure(BaseModel):
    message: str


JobState = Literal["queued", "started", "deferred", "scheduled", "finished", "failed", "stopped", "canceled", "expired"]


class JobStatusBody(BaseModel):
    """``GET /jobs/{job_id}``; the optional members depend on ``status``."""

    id: str
    status: JobState | Literal["unknown"]
    alphas: list[float]
    format: Literal[tuple(OUTPUT_FORMATS)]  # type: ignore[valid-type]  # the contract's formats, in its order
    input: Size
    created_at: str | None = Field(description="ISO 8601")
    started_at: str | None
    ended_at: str | None
    urls: JobLinks
    queue_position: int | None = Field(None, description="queued: jobs ahead of this one")
    progress: float | None = Field(None, ge=0, le=1, description="started: fraction done")
    output: OutputSize | None = Field(None, description="finished: the ×4 size")
    error: JobFailure | None = Field(None, description="failed or expired: why")


class CancelBody(BaseModel):
    """``DELETE /jobs/{job_id}``: 200 ``canceled`` (it never ran), 202 ``canceling`` (it is running)."""

    id: str
    status: Literal["canceled", "canceling"]


# -- health -----------------------------------------------------------------------------------------
class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ok", "no_workers", "unavailable"]
    redis: bool
    workers: int | None = Field(None, description="warmed-up workers heart-beating (absent when Redis is down)")


# -- request parts the handlers read by hand ------------------------------------------------------------
#: ``POST /upscale``'s ``Prefer`` header: add ``"parameters": [PREFER_PARAMETER]`` to routes/jobs.py's UPLOAD_SCHEMA.
PREFER_PARAMETER: dict[str, Any] = {
    "name": "Prefer",
    "in": "header",
    "required": False,
    "description": "`wait=N` (RFC 7240): hold the request up to N seconds (capped by CTSR_MAX_WAIT_S) and "
    "answer 200 with the result if the job ends by then",
    "schema": {"type": "string", "examples": ["wait=30"]},
}


# -- the responses= of each route -------------------------------------------------------------------
def _header(description: str, required: bool = True, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": kind}}


RETRY_AFTER = {"Retry-After": _header("seconds to wait before trying again", kind="integer")}
RATE_HEADERS = {
    "X-RateLimit-Limit": _header("uploads allowed a minute (when rate limits are on)", False, "integer"),
    "X-RateLimit-Remaining": _header("uploads left in this window", False, "integer"),
    "X-RateLimit-Reset": _header("seconds until the window resets", False, "integer"),
}
IMAGE = {"schema": {"type": "string", "format": "binary"}}
IMAGE_CONTENT = {"image/png": IMAGE, "image/webp": IMAGE, "image/jpeg": IMAGE}
ALPHA_HEADER = {"X-CTSR-Alpha": _header("the sweep member this image is, e.g. `0.5`")}


def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorBody, "description": description}
    if headers:
        out["headers"] = headers
    return out


UNAUTHORIZED = error(
    "no or unknown API key (only when API keys are configured)",
    {"WWW-Authenticate": _header('`Bearer realm="ctsr"`')},
)
UNAVAILABLE = error("the job store (Redis) is unreachable", RETRY_AFTER)
UNKNOWN_JOB = error("`unknown_job`: no such job, not a UUID, expired, or another key's")

ROUTE_RESPONSES: dict[str, dict[int | str, dict[str, Any]]] = {
    "POST /upscale": {
        200: {
            "model": JobStatusBody,  # application/json
            "content": IMAGE_CONTENT,
            "description": "only with `Prefer: wait=N` when the job ended in time: the image (one alpha, "
            "finished) or the job's status (several alphas, failed or canceled)",
        },
        202: {
            "model": JobAccepted,
            "description": "queued",
            "headers": {"Location": _header("the job's URL"), **RATE_HEADERS},
        },
        400: error("`missing_image`, `empty_image`, `malformed_form`, `invalid_webhook`, `webhooks_disabled`, ..."),
        401: UNAUTHORIZED,
        413: error("`upload_too_large`, `image_too_large`, `output_too_large` (all alphas' output pixels)"),
        415: error("`unsupported_image`"),
        422: error(
            "`corrupt_image`, `image_too_small`, `invalid_alpha`, `too_many_alphas`, `invalid_format`, "
            "`output_too_large_for_format`, ..."
        ),
        429: error("`queue_full` or `rate_limited`", {**RETRY_AFTER, **RATE_HEADERS}),
        503: error(
            "`unavailable` (the job store is unreachable) or `not_replicated` (no replica confirmed the job)",
            RETRY_AFTER,
        ),
    },
    "GET /jobs/{job_id}": {
        200: {"model": JobStatusBody, "description": "the job"},
        401: UNAUTHORIZED,
        404: UNKNOWN_JOB,
        503: UNAVAILABLE,
    },
    "GET /jobs/{job_id}/result": {
        200: {"description": "the ×4 image", "content": IMAGE_CONTENT, "headers": ALPHA_HEADER},
        401: UNAUTHORIZED,
        404: error("`unknown_job`, or `unknown_alpha`: the job made no result for that alpha"),
        409: error("`not_finished`: queued, started, failed or canceled"),
        410: error("`expired`: the job expired before it ran, or its result has been removed"),
        422: error("`invalid_alpha`, or `alpha_required`: the job made a sweep and `alpha` picks its member"),
        503: UNAVAILABLE,
    },
    "DELETE /jobs/{job_id}": {
        200: {"model": CancelBody, "description": "canceled before it ran (or already canceled)"},
        202: {"model": CancelBody, "description": "running: a worker will stop it"},
        401: UNAUTHORIZED,
        404: UNKNOWN_JOB,
        409: error("`already_finished`: finished or failed"),
        503: UNAVAILABLE,
    },
    "GET /livez": {200: {"model": Liveness, "description": "the process is up"}},
    "GET /readyz": {
        200: {"model": Readiness, "description": "ready: Redis answers and a warmed-up worker heart-beats"},
        503: {"model": Readiness, "description": "not ready: `no_workers` or `unavailable` (Redis down)"},
    },
    "GET /metrics": {
        200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}},
        401: UNAUTHORIZED,
    },
}
