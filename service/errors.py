"""Client errors as JSON with a stable ``code`` a program can branch on."""

from __future__ import annotations

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

#: Codes for the errors Starlette raises itself (no route, wrong method, unparseable form).
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


async def api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    body = {"error": {"code": exc.code, "message": exc.message}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def http_error_handler(_: Request, exc: Exception) -> Response:
    """Starlette's own ``HTTPException`` (FastAPI answers it with ``{"detail": ...}``) in the
    same shape as :class:`APIError`. Register for ``starlette.exceptions.HTTPException``."""
    assert isinstance(exc, HTTPException)
    if exc.status_code < 200 or exc.status_code in (204, 205, 304):  # no body allowed
        return Response(status_code=exc.status_code, headers=exc.headers)
    code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    body = {"error": {"code": code, "message": str(exc.detail)}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)
