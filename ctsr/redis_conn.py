"""One way for gateways and workers to reach Redis: a URL, or a Sentinel-watched primary.

With ``CTSR_REDIS_SENTINELS`` set, clients ask the sentinels for the current primary of
``CTSR_REDIS_SENTINEL_MASTER`` and ask again whenever a connection fails, so a promoted replica is
found without restarting anything. ``CTSR_REDIS_PASSWORD`` (the data nodes' password) is kept out of
URLs, so it can come from a secret.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.sentinel import Sentinel

from .settings import Settings


def redis_configured(settings: Settings) -> bool:
    return bool(settings.redis_url or settings.redis_sentinels)


def connect(settings: Settings, **options: Any) -> Redis:
    """A client for the configured Redis; ``options`` (timeouts, retry) go to every connection."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    if settings.redis_sentinels:
        sentinels = [_host_port(entry) for entry in settings.redis_sentinels]
        sentinel_password = settings.redis_sentinel_password
        sentinel = Sentinel(
            sentinels,
            sentinel_kwargs={
                "password": sentinel_password.get_secret_value() if sentinel_password else None,
                "socket_timeout": options.get("socket_timeout", 2),
                "socket_connect_timeout": options.get("socket_connect_timeout", 2),
            },
        )
        primary: Redis = sentinel.master_for(settings.redis_sentinel_master, password=password, **options)
        return primary
    if not settings.redis_url:
        raise ValueError("set CTSR_REDIS_URL or CTSR_REDIS_SENTINELS")
    if password is not None:
        options["password"] = password
    return Redis.from_url(settings.redis_url, **options)


def _host_port(entry: str) -> tuple[str, int]:
    host, _, port = entry.rpartition(":")
    return host.strip("[]"), int(port)
