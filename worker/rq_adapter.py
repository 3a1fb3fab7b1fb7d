"""Every call the batch worker makes into RQ's private or undocumented API, in one place.

RQ documents how to enqueue, fetch and inspect jobs and how to run ``Worker.work()``; it does not
document the lifecycle steps inside ``work()``. ``BatchWorker`` runs several jobs per loop, so it
drives those steps itself, through the functions below and nothing else. ``RQ_INTERNALS`` names
each RQ attribute they use (with the parameters passed) and ``OVERRIDDEN_HOOKS`` each
``rq.worker.Worker`` method that ``BatchWorker`` overrides; ``tests/test_rq_adapter.py`` checks
both against the installed RQ and runs every function on a real job, so an RQ upgrade that
moves any of them fails there, by name, rather than in production.
"""

from __future__ import annotations

import types
from typing import Any, NamedTuple

import rq.exceptions
from redis.client import PubSubWorkerThread
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested as StopRequested  # re-exported: raised by RQ's SIGTERM handler
from rq.executions import Execution as Execution  # re-exported: BatchWorker annotates with it
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.utils import now
from rq.worker import WorkerStatus


class Internal(NamedTuple):
    """An RQ attribute the adapter uses: ``params`` are the leading parameter names (after
    ``self``) it passes, in order, or ``None`` for an attribute that is read or set, not called."""

    owner: type | types.ModuleType
    name: str
    params: tuple[str, ...] | None = None


RQ_INTERNALS: tuple[Internal, ...] = (
    Internal(rq.exceptions, "StopRequested"),
    Internal(SimpleWorker, "bootstrap", ()),
    Internal(SimpleWorker, "_install_signal_handlers", ()),
    Internal(SimpleWorker, "_stop_requested"),
    Internal(SimpleWorker, "key"),
    Internal(SimpleWorker, "pubsub_thread"),
    Internal(PubSubWorkerThread, "stop", ("timeout",)),
    Internal(SimpleWorker, "register_birth", ()),
    Internal(SimpleWorker, "set_state", ("state",)),
    Internal(SimpleWorker, "should_run_maintenance_tasks"),
    Internal(SimpleWorker, "dequeue_timeout"),
    Internal(SimpleWorker, "dequeue_job_and_maintain_ttl", ("timeout",)),
    Internal(SimpleWorker, "queue_class"),
    Internal(SimpleWorker, "job_class"),
    Internal(SimpleWorker, "serializer"),
    Internal(SimpleWorker, "prepare_execution", ("job",)),
    Internal(SimpleWorker, "prepare_job_execution", ("job", "remove_from_intermediate_queue")),
    Internal(SimpleWorker, "maintain_heartbeats", ("job", "execution")),
    Internal(SimpleWorker, "cleanup_execution", ("job", "pipeline", "execution")),
    Internal(SimpleWorker, "_finalize_success", ("job", "queue", "execution", "return_value")),
    Internal(SimpleWorker, "_finalize_failure", ("job", "queue", "execution", "exc_info")),
    Internal(Queue, "dequeue_any", ("queues", "timeout", "connection", "job_class", "serializer")),
    Internal(Queue, "DEFAULT_TIMEOUT"),
    Internal(Queue, "intermediate_queue_key"),
    Internal(Queue, "started_job_registry"),
    Internal(StartedJobRegistry, "get_job_count", ("cleanup",)),
    Internal(StartedJobRegistry, "key"),
    Internal(Execution, "composite_key"),
    Internal(Job, "retries_left"),
    Internal(Job, "started_at"),
)

#: ``rq.worker.Worker`` methods ``BatchWorker`` overrides (RQ calls them from its own lifecycle
#: code), with the parameter names (after ``self``) of the overriding signature.
OVERRIDDEN_HOOKS: dict[str, tuple[str, ...]] = {
    "get_heartbeat_ttl": ("job", "working_time"),  # RQ adds a fixed 60 s; ours heartbeat_grace_s
    "heartbeat": ("timeout", "pipeline"),  # also refreshes the worker's readiness key
    "run_maintenance_tasks": (),  # also sweeps expired file blobs
    "teardown": (),  # also withdraws readiness and stops the command listener first
}


# -- the loop ------------------------------------------------------------------------------------
def bootstrap(worker: SimpleWorker) -> None:
    """The prologue of ``Worker.work()``: ``bootstrap()`` (log set-up, birth registration, command
    channel) and ``_install_signal_handlers()`` (SIGTERM/SIGINT: a warm, then a cold shutdown)."""
    worker.bootstrap()
    worker._install_signal_handlers()


def stop_command_listener(worker: SimpleWorker) -> None:
    """Tell RQ's command-channel thread (``pubsub_thread``) to stop, without waiting for it.

    The thread reads with a 60 s timeout, and ``teardown()`` sends UNSUBSCRIBE, then clears the
    thread's run flag and joins it without a bound (redis-py 8). When the thread read the
    UNSUBSCRIBE reply before the flag was cleared, it went back to waiting up to 60 s for a
    subscription, and the worker took a minute to exit after SIGTERM (seen in CI). With the flag
    cleared first, that reply ends the thread's loop at once."""
    thread: PubSubWorkerThread | None = worker.pubsub_thread  # RQ annotates it as None (its initial value)
    if thread is not None:
        thread.stop(timeout=0)


def stop_requested(worker: SimpleWorker) -> bool:
    """``_stop_requested``: a SIGTERM came while the worker was busy; stop after this batch."""
    return worker._stop_requested


def maintenance_due(worker: SimpleWorker) -> bool:
    """``should_run_maintenance_tasks``: ``maintenance_interval`` has passed since the last run."""
    return bool(worker.should_run_maintenance_tasks)


def ensure_registered(worker: SimpleWorker) -> None:
    """Register the worker again (``register_birth()``) unless its hash (``worker.key``) is there:
    after a failover a promoted replica may not have it, and RQ would not count the worker."""
    if not worker.connection.exists(worker.key):
        worker.register_birth()


def mark_busy(worker: SimpleWorker) -> None:
    """``set_state(BUSY)``: from here RQ's SIGTERM handler asks to stop after the batch in hand
    (``_stop_requested``) instead of raising ``StopRequested`` at once."""
    worker.set_state(WorkerStatus.BUSY)


def mark_idle(worker: SimpleWorker) -> None:
    """``set_state(IDLE)``: between batches (and what ``rq info`` shows)."""
    worker.set_state(WorkerStatus.IDLE)


# -- dequeuing ----------------------------------------------------------------------------------
def dequeue_first(worker: SimpleWorker, block_s: int | None) -> tuple[Job, Queue] | None:
    """RQ's own blocking dequeue (``dequeue_job_and_maintain_ttl``: heartbeats, maintenance, the
    intermediate queue), blocking at most ``block_s`` (capped by ``dequeue_timeout``); ``None``:
    do not block (burst)."""
    timeout = None if block_s is None else min(worker.dequeue_timeout, block_s)
    return worker.dequeue_job_and_maintain_ttl(timeout)


def dequeue_nowait(worker: SimpleWorker) -> tuple[Job, Queue] | None:
    """One more queued job without blocking (``Queue.dequeue_any`` with no timeout), moved to the
    intermediate queue as RQ's own dequeue does; ``None`` if the queues are empty."""
    return worker.queue_class.dequeue_any(
        worker.queues, None, connection=worker.connection, job_class=worker.job_class, serializer=worker.serializer
    )


def drop_dequeued(worker: SimpleWorker, queue: Queue, job: Job) -> None:
    """Forget a dequeued job that will not start: remove it from ``queue.intermediate_queue_key``
    (else RQ's maintenance would take it for a lost job and enqueue it again)."""
    worker.connection.lrem(queue.intermediate_queue_key, 1, job.id)


def jobs_running(worker: SimpleWorker) -> bool:
    """Any job started on the worker's queues, by any worker (``get_job_count(cleanup=False)``:
    the documented ``count`` runs the registry clean-up on every call)."""
    return any(q.started_job_registry.get_job_count(cleanup=False) for q in worker.queues)


# -- one job's execution --------------------------------------------------------------------------
def start_execution(worker: SimpleWorker, job: Job) -> Execution:
    """What ``SimpleWorker.execute_job`` and ``perform_job`` do before calling the job:
    ``prepare_execution`` (an execution in the started registry, worker busy) and
    ``prepare_job_execution`` (status *started*, heartbeats, off the intermediate queue), then
    ``job.started_at``."""
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
    job.started_at = now()
    return execution


def heartbeat_execution(worker: SimpleWorker, job: Job, execution: Execution) -> None:
    """``maintain_heartbeats``: extend the worker, the execution and the job while a batch runs
    (a forking worker's monitor loop does this; a ``SimpleWorker`` never does)."""
    worker.maintain_heartbeats(job, execution)


def owns_execution(worker: SimpleWorker, queue: Queue, execution: Execution) -> bool:
    """The execution is still in the started registry (``started_job_registry.key``, member
    ``execution.composite_key``): RQ's abandoned-job clean-up removes one whose heartbeat lapsed."""
    return worker.connection.zscore(queue.started_job_registry.key, execution.composite_key) is not None


def finish_success(worker: SimpleWorker, job: Job, queue: Queue, execution: Execution, result: Any) -> None:
    """``_finalize_success``: result, finished registry, dependents, callbacks, as after a job."""
    worker._finalize_success(job, queue, execution, result)


def finish_failure(worker: SimpleWorker, job: Job, queue: Queue, execution: Execution, exc: BaseException) -> None:
    """``_finalize_failure``: a retry while ``retries_left``, else failed registry and result."""
    worker._finalize_failure(job, queue, execution, (type(exc), exc, exc.__traceback__))


def forbid_retries(job: Job) -> None:
    """``retries_left = 0``: the next ``finish_failure`` fails the job for good."""
    job.retries_left = 0


def retries_left(job: Job) -> int | None:
    """``job.retries_left``: ``None`` for a job enqueued without ``Retry``."""
    return job.retries_left


def drop_execution(worker: SimpleWorker, job: Job, execution: Execution) -> None:
    """``cleanup_execution``: remove the execution from the started registry and the worker,
    recording no outcome (the caller records the job as canceled)."""
    with worker.connection.pipeline() as pipe:
        worker.cleanup_execution(job, pipeline=pipe, execution=execution)
        pipe.execute()


def job_timeout(worker: SimpleWorker, job: Job) -> float:
    """The job's timeout, or ``Queue.DEFAULT_TIMEOUT`` as ``perform_job`` uses."""
    return job.timeout or worker.queue_class.DEFAULT_TIMEOUT
