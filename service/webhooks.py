"""Webhooks: tell a client's URL when its job ends, signed, retried, and never to internal hosts.

* **SSRF guard.** A URL must be http(s), carry no credentials, spaces or control characters, and
  every address its host resolves to must be public (:func:`check_url`): loopback, private,
  link-local (cloud metadata at 169.254.169.254 included), multicast and reserved ranges are
  refused, also when written inside an IPv6 address (mapped, compatible, NAT64, 6to4, Teredo),
  unless ``host:port`` is in ``CTSR_WEBHOOK_ALLOW_HOSTS`` or ``CTSR_WEBHOOK_ALLOW_PRIVATE`` is set.
  It runs when the job is submitted and again right before each delivery, and the delivery
  connects to the address it checked (the name goes in ``Host`` and TLS SNI), so DNS rebinding
  between check and connect cannot turn it inward.
* **Signature.** ``X-CTSR-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``;
  a receiver recomputes it and rejects old timestamps (replays).
* **Delivery** runs in the gateways (:class:`Deliverer`): workers only push a record onto a Redis
  list. Attempts run concurrently (``CTSR_WEBHOOK_CONCURRENCY`` per gateway, at most
  ``CTSR_WEBHOOK_PER_HOST`` per receiver), so slow receivers delay only themselves. A failed
  attempt is retried after 1, 2, 4, … s, up to ``CTSR_WEBHOOK_ATTEMPTS`` tries.
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
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from redis import Redis

from ctsr.contract import WEBHOOK_QUEUE_KEY, WEBHOOK_RETRY_KEY
from ctsr.settings import Settings

from .errors import APIError

log = logging.getLogger("ctsr.webhooks")
Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, NAT64, 6to4, Teredo).

    Each is a way to reach that IPv4 host (a NAT64 gateway, a 6to4 relay, a dual-stack kernel),
    so the guard must judge it as the IPv4 address it is.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        return []
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if any(ip in net for net in NAT64) or (ip in IPV4_COMPATIBLE and int(ip) > 1):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return all(a.is_global and not a.is_multicast for a in (ip, *embedded_ipv4(ip)))


@dataclass(frozen=True)
class Target:
    """Where a checked webhook URL goes: the delivery connects to ``address``, the address that
    was checked, so a DNS answer that changes afterwards (rebinding) cannot redirect it."""

    url: str
    host: str
    port: int
    address: str

    def request_url(self) -> str:
        """The URL with its host replaced by the checked address (the Host header keeps the name)."""
        parts = urlsplit(self.url)
        literal = f"[{self.address}]" if ":" in self.address else self.address
        return urlunsplit(parts._replace(netloc=f"{literal}:{self.port}"))

    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.url.lower().startswith("https:") else 80
        return name if self.port == default else f"{name}:{self.port}"


def allowed_host(host: str, port: int, settings: Settings) -> bool:
    """``CTSR_WEBHOOK_ALLOW_HOSTS`` names ``host:port`` pairs (``[v6]:port`` for IPv6)."""
    name = f"[{host}]" if ":" in host else host
    return f"{name}:{port}".lower() in {entry.lower() for entry in settings.webhook_allow_hosts}


def check_url(url: str, settings: Settings, resolver: Resolver = resolve) -> Target:
    """Refuse (400) a webhook URL that is malformed or reaches a non-public address; else say
    which address a delivery must connect to."""
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise APIError(400, "invalid_webhook", "webhook URLs may not contain spaces or control characters")
    if len(url) > 2048:
        raise APIError(400, "invalid_webhook", "webhook URL is longer than 2048 characters")
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise APIError(400, "invalid_webhook", "webhook URL has an invalid port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise APIError(400, "invalid_webhook", "webhook must be an http(s) URL")
    if parts.username or parts.password:
        raise APIError(400, "invalid_webhook", "webhook URLs may not carry credentials")
    host = parts.hostname
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError):
        raise APIError(400, "webhook_unresolvable", f"webhook host {host!r} does not resolve") from None
    if not addresses:
        raise APIError(400, "webhook_unresolvable", f"webhook host {host!r} does not resolve")
    trusted = settings.webhook_allow_private or allowed_host(host, port, settings)
    if not trusted and not all(is_public(a) for a in addresses):
        raise APIError(400, "webhook_not_allowed", f"webhook host {host!r} resolves to a non-public address")
    return Target(url, host, port, addresses[0].split("%", 1)[0])


def redact(url: str) -> str:
    """A URL fit for logs: scheme, host and path, without the query (tokens often travel there)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="", fragment=""))


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
        self.busy: dict[str, int] = {}  # attempts in flight per receiver (host:port)

    def _promote_due(self) -> None:
        """Move retries whose time has come back onto the queue (ZREM decides which gateway)."""
        due: list[bytes] = self.redis.zrangebyscore(WEBHOOK_RETRY_KEY, 0, time.time(), start=0, num=50)  # type: ignore[assignment]  # redis-py types every reply as a union
        for raw in due:
            if self.redis.zrem(WEBHOOK_RETRY_KEY, raw):
                self.redis.rpush(WEBHOOK_QUEUE_KEY, raw)

    async def deliver(self, record: dict[str, Any], client: httpx.AsyncClient) -> str:
        """One attempt: ``delivered`` (2xx), ``retry`` or ``dropped`` (the URL is no longer allowed)."""
        loop = asyncio.get_running_loop()
        try:  # again: DNS may have changed since the upload
            target = await loop.run_in_executor(None, check_url, record["url"], self.settings, self.resolver)
        except APIError as exc:
            log.warning("webhook for %s dropped: %s", record["job_id"], exc.message)
            return "dropped"
        body = body_for(record)
        assert self.settings.webhook_secret
        headers = {"Content-Type": "application/json", "User-Agent": "ctsr-webhook/1", "Host": target.host_header(),
                   "X-CTSR-Signature": sign(self.settings.webhook_secret, body, int(time.time()))}  # fmt: skip
        # TLS still verifies the certificate against the name (SNI), not the pinned address
        extensions = {"sni_hostname": target.host} if target.url.lower().startswith("https:") else {}
        try:
            response = await client.post(target.request_url(), content=body, headers=headers, extensions=extensions)
        except httpx.HTTPError as exc:
            log.info("webhook for %s to %s failed: %s", record["job_id"], redact(record["url"]), exc)
            return "retry"
        return "delivered" if 200 <= response.status_code < 300 else "retry"

    async def _take(self, wait_s: float) -> dict[str, Any] | None:
        """The next record (retries that are due first), or None after ``wait_s``."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._promote_due)
        item = await loop.run_in_executor(None, self.redis.blpop, [WEBHOOK_QUEUE_KEY], wait_s)
        return json.loads(item[1]) if item else None

    async def handle(self, record: dict[str, Any], client: httpx.AsyncClient) -> None:
        """One attempt at ``record``, then its bookkeeping: counted, or scheduled to retry.

        At most ``webhook_per_host`` attempts run at once per receiver (host and port); a record
        for a receiver at its limit goes back to wait half a second, without using up an attempt,
        so a slow receiver holds neither the pool nor anyone else's delivery.
        """
        loop = asyncio.get_running_loop()
        parts = urlsplit(record["url"])
        receiver = f"{parts.hostname}:{parts.port}"
        if self.busy.get(receiver, 0) >= self.settings.webhook_per_host:
            await loop.run_in_executor(None, self._schedule, record, 0.5)
            return
        self.busy[receiver] = self.busy.get(receiver, 0) + 1
        try:
            outcome = await self.deliver(record, client)
        finally:
            self.busy[receiver] -= 1
            if not self.busy[receiver]:
                del self.busy[receiver]
        if outcome != "retry":
            setattr(self, outcome, getattr(self, outcome) + 1)
            return
        record["attempt"] += 1
        if record["attempt"] >= self.settings.webhook_attempts:
            self.failed += 1
            log.warning("webhook for %s given up after %d attempts", record["job_id"], record["attempt"])
            return
        await loop.run_in_executor(None, self._schedule, record, 2 ** (record["attempt"] - 1))

    def _schedule(self, record: dict[str, Any], delay_s: float) -> None:
        self.redis.zadd(WEBHOOK_RETRY_KEY, {json.dumps(record): time.time() + delay_s})

    async def run_once(self, client: httpx.AsyncClient, wait_s: float = 1.0) -> bool:
        """Take and handle at most one record; False when there was none within ``wait_s``."""
        record = await self._take(wait_s)
        if record is None:
            return False
        await self.handle(record, client)
        return True

    async def run(self) -> None:
        """Deliver concurrently: up to ``webhook_concurrency`` attempts in flight per gateway."""
        limits = httpx.Limits(max_connections=self.settings.webhook_concurrency)
        pool = asyncio.Semaphore(self.settings.webhook_concurrency)
        running: set[asyncio.Task[None]] = set()

        async def attempt(record: dict[str, Any], client: httpx.AsyncClient) -> None:
            try:
                await self.handle(record, client)
            except Exception:
                log.exception("webhook for %s: delivery error", record.get("job_id"))
            finally:
                pool.release()

        async with httpx.AsyncClient(
            timeout=self.settings.webhook_timeout_s, follow_redirects=False, limits=limits
        ) as client:
            try:
                while True:
                    await pool.acquire()
                    try:
                        record = await self._take(1.0)
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # Redis down or a bad record: log, back off, keep the loop alive
                        pool.release()
                        log.exception("webhook delivery loop error")
                        await asyncio.sleep(1)
                        continue
                    if record is None:
                        pool.release()
                        continue
                    task = asyncio.create_task(attempt(record, client))
                    running.add(task)
                    task.add_done_callback(running.discard)
            finally:
                for task in running:
                    task.cancel()


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
