"""Operations: ``/livez``, ``/readyz``, ``/metrics`` (each also as HEAD) and the web page at ``/``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from ctsr.contract import READY_PATTERN

from ..deps import GatewayDep
from ..schemas import ROUTE_RESPONSES

STATIC = Path(__file__).resolve().parent.parent / "static"  # the web page: plain HTML, CSS and JS, no build step

router = APIRouter()


@router.get("/livez", summary="The process is up", responses=ROUTE_RESPONSES["GET /livez"])
def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Redis answers and a warmed-up worker heart-beats (the latter unless CTSR_READY_NEEDS_WORKER=false)",
    responses=ROUTE_RESPONSES["GET /readyz"],
)
def readyz(gateway: GatewayDep) -> JSONResponse:
    try:
        gateway.redis.ping()
        workers = sum(1 for _ in gateway.redis.scan_iter(READY_PATTERN, count=100))
    except RedisError:
        return JSONResponse({"status": "unavailable", "redis": False}, status_code=503)
    ready = workers > 0 or not gateway.settings.ready_needs_worker
    return JSONResponse({"status": "ok" if ready else "no_workers", "redis": True, "workers": workers},
                        status_code=200 if ready else 503)  # fmt: skip


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,  # no JSON default: 200 is text/plain, errors stay JSON
    responses=ROUTE_RESPONSES["GET /metrics"],
)
def get_metrics(request: Request, gateway: GatewayDep) -> Response:
    if gateway.settings.metrics_need_key:
        gateway.keys.identify(request)
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# HEAD for load balancers and uptime checkers: the GET answer without its body (kept out of
# the schema, where it would be a second operation for generated clients to carry)
for _path, _probe in (("/livez", livez), ("/readyz", readyz), ("/metrics", get_metrics)):
    router.add_api_route(_path, _probe, methods=["HEAD"], include_in_schema=False)


@router.get("/", include_in_schema=False)
def web_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")
