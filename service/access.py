"""Who may call the API and how often: hashed API keys, job ownership, per-key rate limits,
security headers.

Keys are never stored, only their SHA-256 (``CTSR_API_KEYS='{"alice": "<sha256 hex>"}'``;
``ctsr key new alice`` makes one). A request names its key as ``Authorization: Bearer <key>``;
the caller's name then owns the jobs it creates, and other keys see those jobs as missing (404,
not 403, so ids do not leak). With no keys configured the API is open and rate limits count per
client address.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from fastapi import Request
from redis import Redis

from .errors import APIError

KEY_PREFIX = "ctsr_"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}
#: API responses (JSON, images) need no scripts, styles or frames; the HTML pages (docs) keep theirs.
API_CSP = "default-src 'none'; frame-ancestors 'none'"
#: The web page (``GET /`` and ``/static/*``): its own files only, result images as blob: URLs.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; object-src 'none'; frame-ancestors 'none'"
)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """The configured keys, by SHA-256; an empty ring means authentication is off."""

    def __init__(self, hashed: dict[str, str]) -> None:
        self._by_hash = {digest.lower(): name for name, digest in hashed.items()}  # validated by Settings

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash)

    def identify(self, request: Request) -> str | None:
        """The caller's key name (None when authentication is off); 401 without a valid key."""
        if not self.enabled:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "unauthorized", "send an API key: Authorization: Bearer <key>", _CHALLENGE)
        digest = hash_key(key.strip())
        for known, name in self._by_hash.items():  # constant-time compare against every key
            if hmac.compare_digest(known, digest):
                return name
        raise APIError(401, "unauthorized", "unknown API key", _CHALLENGE)


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ctsr"'}


class RateLimiter:
    """Fixed one-minute windows in Redis (one INCR + EXPIRE per request, shared by all gateways)."""

    def __init__(self, redis: Redis, per_minute: int, prefix: str = "ctsr:ratelimit") -> None:
        self.redis, self.limit, self.prefix = redis, per_minute, prefix

    def hit(self, who: str) -> dict[str, str]:
        """Count one request by ``who``: the ``X-RateLimit-*`` headers, or 429 past the limit."""
        if self.limit <= 0:
            return {}
        now = time.time()
        window = int(now // 60)
        key = f"{self.prefix}:{who}:{window}"
        pipe = self.redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, 120)
        count = int(pipe.execute()[0])
        reset = max(1, int((window + 1) * 60 - now + 0.999))
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(0, self.limit - count)),
            "X-RateLimit-Reset": str(reset),
        }
        if count > self.limit:
            raise APIError(429, "rate_limited", f"at most {self.limit} uploads a minute; retry in {reset} s",
                           {**headers, "Retry-After": str(reset)})  # fmt: skip
        return headers


def caller_id(request: Request, name: str | None) -> str:
    """What rate limits count by: the key's name, else the client's address."""
    if name is not None:
        return f"key:{name}"
    return f"addr:{request.client.host if request.client else 'unknown'}"
