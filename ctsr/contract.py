"""The queue contract between the gateway (``service/``) and the workers (``worker/``).

Everything both sides must agree on lives here and nowhere else: the RQ function name, the job
payload and its defaults, the output formats, the colour fixes, Redis key names, the result
shape and the release's version string. The gateway reads these names from here only (never
from ``models/``). Imports no torch and no web framework.

Where the values come from: what only the wire knows (output formats and their limits, the
default format and quality, key names) is defined here. What the model pipeline itself knows (its
colour fixes, its default alpha and colour fix) is defined in :mod:`models.defaults` and
re-exported here, because ``models/`` must not import ``ctsr`` (nor any web or queue code) while
the contract may import a torch-free leaf of ``models``: ``models.defaults`` imports nothing, and
``models/__init__`` loads its torch-backed names lazily, so this module still loads without torch
(``tests/test_contract.py`` checks it in a fresh interpreter). One definition of each value, and
the arrow points from the queue to the model, never back. The version string is the installed
package's (``[project] version`` in ``pyproject.toml``), read once, in ``ctsr/__init__.py``.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# the model's own values (see the module docstring); the ``as`` marks them as re-exported
from models.defaults import COLOR_FIXES as COLOR_FIXES
from models.defaults import DEFAULT_ALPHA as DEFAULT_ALPHA
from models.defaults import DEFAULT_COLOR_FIX as DEFAULT_COLOR_FIX

from . import __version__

#: This release's version (the package's, from pyproject.toml): the API's ``info.version``.
VERSION = __version__

#: RQ calls this for a job; the batching worker runs the same code for many jobs at once.
JOB_FUNC = "worker.tasks.upscale"
KEY_PREFIX = "ctsr"
#: Output format → the content type of its results.
OUTPUT_FORMATS = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
DEFAULT_FORMAT = "png"
#: The encoder quality a client may ask for (webp, jpeg), inclusive, and the default.
QUALITY_RANGE = (1, 100)
DEFAULT_QUALITY = 90
#: The longest side each output format can hold; the gateway refuses what a worker could not encode.
FORMAT_MAX_SIDE = {"png": 2**31 - 1, "webp": 16383, "jpeg": 65535}


def new_job_id() -> str:
    return str(uuid.uuid4())


def is_job_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def input_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:blob:{job_id}:in"


def output_key(job_id: str, alpha: float) -> str:
    return f"{KEY_PREFIX}:blob:{job_id}:out:{alpha_label(alpha)}"


def progress_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:progress:{job_id}"


def canceled_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:canceled:{job_id}"


def claim_key(job_id: str) -> str:
    """Who got to a queued job first: ``start`` (a worker, SET NX just before it marks the job
    started) or ``cancel`` (a DELETE, SET NX). Makes a cancel and a start that race exclusive."""
    return f"{KEY_PREFIX}:claim:{job_id}"


def done_key(job_id: str) -> str:
    """A list the worker pushes to when a job ends, so ``Prefer: wait`` needs no polling."""
    return f"{KEY_PREFIX}:done:{job_id}"


def expired_key(job_id: str) -> str:
    """Marks a job that outlived its queue deadline (it is canceled in RQ, "expired" to clients).

    Written only by gateways of earlier releases, which expired a queued job when it was polled;
    expiry is now the worker's alone (it fails the job with :class:`JobExpired`). Still read, so a
    job such a gateway expired keeps reading as expired during a rolling deploy."""
    return f"{KEY_PREFIX}:expired:{job_id}"


def ready_key(worker_name: str) -> str:
    """Set (with a TTL refreshed by heartbeats) once a worker has loaded and warmed its model."""
    return f"{KEY_PREFIX}:ready:{worker_name}"


READY_PATTERN = f"{KEY_PREFIX}:ready:*"
#: Jobs accepted by any gateway (a counter). Its INCR is the write the gateway's WAIT for replicas
#: follows (CTSR_REDIS_MIN_REPLICA_ACKS).
ACCEPTED_KEY = f"{KEY_PREFIX}:accepted"
#: Webhook deliveries waiting for a gateway (a list of JSON records), and those waiting to retry
#: (a sorted set scored by the unix time of the next attempt).
WEBHOOK_QUEUE_KEY = f"{KEY_PREFIX}:webhooks"
WEBHOOK_RETRY_KEY = f"{KEY_PREFIX}:webhooks:retry"


def webhook_record(payload: JobPayload, status: str) -> str | None:
    """What a worker pushes onto :data:`WEBHOOK_QUEUE_KEY` when a job ends (None: no webhook).

    One RPUSH in the worker's end-of-job pipeline: delivery (network, retries) is the gateways'
    work, so a slow or dead receiver never holds a GPU worker.
    """
    if not payload.webhook:
        return None
    return json.dumps({"job_id": payload.job_id, "url": payload.webhook, "status": status, "attempt": 0})


def announce_end(pipe: Any, payload: JobPayload, status: str) -> None:
    """Queue on ``pipe`` (a Redis pipeline) what every end of a job owes its watchers: wake the
    ``Prefer: wait`` requests blocked on it and queue its webhook. Workers call it when a job
    finishes, fails or is dropped from a batch; gateways when they cancel a queued job."""
    pipe.rpush(done_key(payload.job_id), status)
    pipe.expire(done_key(payload.job_id), 120)
    record = webhook_record(payload, status)
    if record is not None:
        pipe.rpush(WEBHOOK_QUEUE_KEY, record)


def alpha_label(alpha: float) -> str:
    """0.5 → '0.5', 1.0 → '1': how an alpha appears in keys, URLs and file names."""
    return f"{alpha:.3f}".rstrip("0").rstrip(".")


#: The payload's format version. During a rolling deploy gateways and workers of two releases share
#: one queue: a reader ignores fields it does not know (added by a newer writer) and fills fields an
#: older writer did not send with their defaults; a change that cannot be read that way bumps this.
PAYLOAD_VERSION = 1


@dataclass
class JobPayload:
    """The one argument of :data:`JOB_FUNC`: keys and options, never image bytes."""

    job_id: str
    alphas: list[float]
    format: str = DEFAULT_FORMAT
    quality: int = DEFAULT_QUALITY
    color_fix: str = DEFAULT_COLOR_FIX
    width: int = 0  # LR size, checked by the gateway
    height: int = 0
    submitted_at: float = field(default_factory=time.time)
    deadline: float = 0.0  # unix time after which a job not yet started is expired
    owner: str | None = None  # the API key's name that created the job (None: open API)
    webhook: str | None = None  # URL told when the job ends (checked by the gateway)
    version: int = PAYLOAD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobPayload:
        """Read a payload written by any release: fields this one does not know (a newer writer's)
        are ignored, fields it does not find (an older writer's) take their defaults."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class JobResult:
    """What the worker returns to RQ (stored as the job's result)."""

    outputs: dict[str, str]  # alpha label → output blob key
    content_type: str
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cancel_job(job: Any, ttl_s: int) -> None:
    """Cancel an RQ job and give its record the same TTL as results: RQ keeps canceled jobs
    forever otherwise, and nothing here may outlive its TTL."""
    from rq.exceptions import InvalidJobOperation

    with contextlib.suppress(InvalidJobOperation):  # already canceled
        job.cancel()
    job.connection.expire(job.key, ttl_s)


class JobExpired(Exception):
    """A job waited in the queue past its deadline; the worker skips it."""
