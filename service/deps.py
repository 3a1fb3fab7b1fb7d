"""What the routes share, and the ``Depends`` that hand it to them.

``create_app`` builds one :class:`Gateway` per app and keeps it on ``app.state.gateway``; a route
names what it needs as a parameter (``gateway: GatewayDep``, ``jobs: Jobs``, ``owner: Caller``),
so nothing is a closure over ``create_app``'s locals and each piece can be built alone in a test.
These parameters add nothing to the OpenAPI document: the dependencies read only the request.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from rq import Queue

from ctsr.blobs import BlobStore
from ctsr.settings import Settings

from .access import KeyRing, RateLimiter
from .jobs import JobLookup
from .metrics import GatewayMetrics
from .webhooks import Deliverer


@dataclass
class Gateway:
    """One gateway's connections, stores and counters (one per :func:`service.app.create_app`)."""

    settings: Settings
    redis: Redis
    queue: Queue
    store: BlobStore
    metrics: GatewayMetrics
    keys: KeyRing
    limiter: RateLimiter
    jobs: JobLookup
    #: ``Prefer: wait`` requests block in BLPOP; the default executor (cores + 4 threads) is too small
    waiters: ThreadPoolExecutor
    deliverer: Deliverer | None = None
    waiting: int = 0  # requests in a ``Prefer: wait`` now (one event loop: no lock needed)


# async: FastAPI runs a plain ``def`` dependency in a worker thread, for what is an attribute read
async def gateway(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state


async def job_lookup(request: Request) -> JobLookup:
    return (await gateway(request)).jobs


async def caller(request: Request) -> str | None:
    """The caller's API key name (None when keys are off); 401 without a valid key."""
    return (await gateway(request)).keys.identify(request)


GatewayDep = Annotated[Gateway, Depends(gateway)]
Jobs = Annotated[JobLookup, Depends(job_lookup)]
Caller = Annotated[str | None, Depends(caller)]
