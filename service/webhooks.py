"""Webhooks: tell a client's URL when its job ends, signed, retried, and never to internal hosts.

* **SSRF guard.** A URL must be http(s), carry no credentials, and every address its host
  resolves to must be public (:func:`check_url`): loopback, private, link-local (cloud metadata
  at 169.254.169.254 included), multicast and reserved ranges are refused unless the host is in
  ``CTSR_WEBHOOK_ALLOW_HOSTS`` or ``CTSR_WEBHOOK_ALLOW_PRIVATE`` is set. It runs when the job is
  submitted and again right before each delivery (a DNS answer can change in between).
* **Signature.** ``X-CTSR-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``;
  a receiver recomputes it and rejects old timestamps (replays).
* **Delivery** runs in the gateways (:class:`Deliverer`): workers only push a record onto a Redis
  list. A failed attempt is retried after 1, 2, 4, … s, up to ``CTSR_WEBHOOK_ATTEMPTS`` tries.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from redis import Redis

from ctsr.contract import WEBHOOK_QUEUE_KEY, WEBHOOK_RETRY_KEY
from ctsr.settings import Settings

from .errors import APIError

log = logging.getLogger("ctsr.webhooks")
Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def check_url(url: str, settings: Settings, resolver: Resolver = resolve) -> None:
    """Refuse (400) a webhook URL that is malformed or reaches a non-public address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise APIError(400, "invalid_webhook", "webhook must be an http(s) URL")
    if parts.username or parts.password:
        raise APIError(400, "invalid_webhook", "webhook URLs may not carry credentials")
    if len(url) > 2048:
        raise APIError(400, "invalid_webhook", "webhook URL is longer than 2048 characters")
    host = parts.hostname
    if host in settings.webhook_allow_hosts or settings.webhook_allow_private:
        return
    try:
        addresses = resolver(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (OSError, UnicodeError):
        raise APIError(400, "webhook_unresolvable", f"webhook host {host!r} does not resolve") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global or ip.is_multicast:
            raise APIError(400, "webhook_not_allowed", f"webhook host {host!r} resolves to a non-public address")


def sign(secret: str, body: bytes, timestamp: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def body_for(record: dict[str, Any]) -> bytes:
    job = record["job_id"]
    event = {"event": f"job.{record['status']}", "job": {"id": job, "status": record["status"],
             "urls": {"job": f"/jobs/{job}", "result": f"/jobs/{job}/result"}}}  # fmt: skip
    return json.dumps(event, separators=(",", ":")).encode()


class Deliverer:
    """Takes webhook records from Redis and POSTs them; one per gateway process."""

    def __init__(self, redis: Redis, settings: Settings, resolver: Resolver = resolve) -> None:
        self.redis, self.settings, self.resolver = redis, settings, resolver
        self.delivered = self.failed = self.dropped = 0

    def _promote_due(self) -> None:
        """Move retries whose time has come back onto the queue (ZREM decides which gateway)."""
        for raw in self.redis.zrangebyscore(WEBHOOK_RETRY_KEY, 0, time.time(), start=0, num=50):
            if self.redis.zrem(WEBHOOK_RETRY_KEY, raw):
                self.redis.rpush(WEBHOOK_QUEUE_KEY, raw)

    async def deliver(self, record: dict[str, Any], client: httpx.AsyncClient) -> str:
        """One attempt: ``delivered`` (2xx), ``retry`` or ``dropped`` (the URL is no longer allowed)."""
        try:
            check_url(record["url"], self.settings, self.resolver)  # again: DNS may have changed
        except APIError as exc:
            log.warning("webhook for %s dropped: %s", record["job_id"], exc.message)
            return "dropped"
        body = body_for(record)
        assert self.settings.webhook_secret
        headers = {"Content-Type": "application/json", "User-Agent": "ctsr-webhook/1",
                   "X-CTSR-Signature": sign(self.settings.webhook_secret, body, int(time.time()))}  # fmt: skip
        try:
            response = await client.post(record["url"], content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.info("webhook for %s failed: %s", record["job_id"], exc)
            return "retry"
        return "delivered" if 200 <= response.status_code < 300 else "retry"

    async def run_once(self, client: httpx.AsyncClient, wait_s: float = 1.0) -> bool:
        """Deliver at most one record; False when there was none within ``wait_s``."""
        self._promote_due()
        loop = asyncio.get_running_loop()
        item = await loop.run_in_executor(None, self.redis.blpop, [WEBHOOK_QUEUE_KEY], wait_s)
        if not item:
            return False
        record = json.loads(item[1])
        outcome = await self.deliver(record, client)
        if outcome != "retry":
            setattr(self, outcome, getattr(self, outcome) + 1)
            return True
        record["attempt"] += 1
        if record["attempt"] >= self.settings.webhook_attempts:
            self.failed += 1
            log.warning("webhook for %s given up after %d attempts", record["job_id"], record["attempt"])
            return True
        delay = 2 ** (record["attempt"] - 1)
        self.redis.zadd(WEBHOOK_RETRY_KEY, {json.dumps(record): time.time() + delay})
        return True

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, follow_redirects=False) as client:
            while True:
                try:
                    await self.run_once(client)
                except asyncio.CancelledError:
                    raise
                except Exception:  # Redis down or a bad record: log, back off, keep the loop alive
                    log.exception("webhook delivery loop error")
                    await asyncio.sleep(1)


@contextlib.asynccontextmanager
async def delivery_task(deliverer: Deliverer) -> Any:
    """Run the deliverer for the app's lifetime."""
    task = asyncio.create_task(deliverer.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
