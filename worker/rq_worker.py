"""An RQ worker that pulls several jobs at once and runs them as one batch.

RQ dequeues one job per loop and (by default) forks per job, which cannot reuse a CUDA
context. This worker keeps RQ's own bookkeeping — intermediate queue, started/finished/failed
registries, executions, results, retries, heartbeats — by calling the same lifecycle methods
RQ's SimpleWorker calls, only for a group of jobs around one batched model run. Those methods are
RQ internals: every call goes through ``worker/rq_adapter.py`` (checked against the installed RQ by
``tests/test_rq_adapter.py``), and this module uses only RQ's public API besides.

1. block for the first job (``dequeue_first``), then keep pulling without blocking
   (``dequeue_nowait``) until the group has ``max_batch`` tiles or ``max_batch_wait_ms`` has passed;
2. ``start_execution`` for each (status *started*, started registry, heartbeats);
3. run them together under the tightest job timeout (RQ's death penalty);
4. store the outputs, then ``finish_success`` / ``finish_failure`` for each (results, registries,
   retries) — on an accelerator on the finisher thread, while the next batch runs.

A worker killed mid-batch leaves its jobs in the started registry; their heartbeats expire
after ``heartbeat_grace_s`` and RQ's registry maintenance (run by any other worker every
``maintenance_interval_s``) re-enqueues them while they have retries left.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import Queue
from rq.job import Job, JobStatus
from rq.timeouts import JobTimeoutException
from rq.worker import SimpleWorker

from ctsr.blobs import BlobStore, FileBlobStore
from ctsr.contract import (
    JobExpired,
    JobPayload,
    announce_end,
    cancel_job,
    canceled_key,
    claim_key,
    input_key,
    progress_key,
    ready_key,
)
from ctsr.settings import Settings
from models.errors import CTSRError

from . import rq_adapter as rqa
from .engine import BatchEngine
from .metrics import WorkerMetrics
from .process import BatchAbandoned, Outcome, RanBatch, run_batch, store_batch
from .rq_adapter import Execution

OUTAGE_BACKOFF_MAX_S = 5.0  # longest wait between reconnection tries

PROGRESS_INTERVAL_S = 0.5

#: A busy worker's own heartbeat, between batches: at most this often (its TTLs are seconds to
#: minutes), not after every batch. With RQ's two per dequeue, heartbeats took ~2 % of the
#: worker's main thread with the compact model on a CPU (py-spy, 4 clients): 4 round trips each,
#: 0.53-0.58 ms on the embedded Redis, now one, 0.19-0.21 ms. A fast model on a GPU runs many
#: batches a second.
BUSY_HEARTBEAT_S = 1.0

#: Failures that no retry can fix: bad input, expired.
FINAL_ERRORS = (CTSRError, JobExpired)


class BatchWorker(SimpleWorker):
    def __init__(
        self,
        queue: Queue,
        engine: BatchEngine,
        store: BlobStore,
        settings: Settings,
        metrics: WorkerMetrics | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("maintenance_interval", settings.maintenance_interval_s)
        kwargs.setdefault("job_monitoring_interval", min(30, settings.heartbeat_grace_s))
        super().__init__([queue], connection=queue.connection, **kwargs)
        self.engine, self.store, self.settings = engine, store, settings
        self.metrics = metrics or WorkerMetrics()
        self.ready = False
        self.beat_at = 0.0  # time.monotonic() of the last heartbeat
        # Storing and finishing a batch while the next one runs: one batch at a time (memory).
        self.finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctsr-finish")
        self.finishing_batch: Future[None] | None = None

    @property
    def finishes_in_background(self) -> bool:
        """Store and finish a batch while the next one runs (``CTSR_FINISH_IN_BACKGROUND``; by
        default only on an accelerator, for the reason of ``BatchEngine.encodes_during_forward``)."""
        chosen = self.settings.finish_in_background
        return self.engine.encodes_during_forward if chosen is None else chosen

    # -- heartbeats and readiness ------------------------------------------------------------
    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """RQ adds a fixed 60 s; ours is ``heartbeat_grace_s`` so abandoned jobs return sooner."""
        interval = self.job_monitoring_interval
        if job.timeout and job.timeout > 0:
            interval = min(interval, max(job.timeout - working_time, 0))
        return int(interval) + self.settings.heartbeat_grace_s

    @property
    def ready_ttl(self) -> int:
        """Seconds the readiness key outlives the last heartbeat, so /readyz forgets a dead worker."""
        return self.settings.maintenance_interval_s + self.settings.heartbeat_grace_s

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's heartbeat (three commands) and the readiness key, in one round trip."""
        if pipeline is None:
            with self.connection.pipeline() as pipe:
                self.heartbeat(timeout, pipe)
                pipe.execute()
            return
        super().heartbeat(timeout, pipeline)
        if self.ready:
            pipeline.set(ready_key(self.name), "1", ex=self.ready_ttl)
        self.beat_at = time.monotonic()

    def heartbeat_if_due(self) -> None:
        """Between batches: a fast model finishes several a second, and each beat is a round trip."""
        if time.monotonic() - self.beat_at >= min(BUSY_HEARTBEAT_S, self.ready_ttl / 3):
            self.heartbeat()

    def mark_ready(self) -> None:
        self.ready = True
        self.metrics.set_ready(True)
        self.heartbeat()

    def run_maintenance_tasks(self) -> None:
        """RQ's registry clean-up (abandoned jobs come back here), plus expired file blobs."""
        super().run_maintenance_tasks()  # type: ignore[no-untyped-call]  # unannotated in rq (untyped_calls_exclude misses super())
        if isinstance(self.store, FileBlobStore):
            self.store.sweep()

    def teardown(self) -> None:
        self.connection.delete(ready_key(self.name))
        self.metrics.set_ready(False)
        rqa.stop_command_listener(self)  # before RQ's teardown joins it (rq_adapter)
        super().teardown()  # type: ignore[no-untyped-call]  # unannotated in rq (untyped_calls_exclude misses super())

    # -- the loop ------------------------------------------------------------------------------
    def work_batches(self, burst: bool = False, max_batches: int | None = None) -> int:
        """Run until stopped (SIGTERM/SIGINT finish the batch in hand first). Returns jobs done."""
        rqa.bootstrap(self)
        self.mark_ready()  # the caller has loaded (and warmed) the model by now
        done = batches = 0
        outage = 0.0  # seconds to wait before the next try while Redis is unreachable
        try:
            while not rqa.stop_requested(self):
                try:
                    if outage:
                        self._rejoin()
                        self.log.info("worker %s: Redis is back; taking jobs again", self.name)
                        outage = 0.0
                    if rqa.maintenance_due(self):
                        self.run_maintenance_tasks()
                    pulled = self.pull(burst)
                    if not pulled:
                        self.wait_finishing()  # idle: nothing to overlap the last batch's finish with
                        if burst:
                            break
                        continue
                    done += self.execute_batch(pulled)
                    batches += 1
                    self.heartbeat_if_due()
                    if max_batches is not None and batches >= max_batches:
                        break
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    # A failover or a cut link: keep the model, wait, reconnect (a Sentinel client
                    # asks for the new primary). Jobs of an interrupted batch stay "started" and are
                    # retried once their heartbeat lapses, by this worker or another.
                    if not outage:
                        self.log.warning("worker %s: Redis unreachable (%s); retrying", self.name, exc)
                        self.metrics.redis_outages.inc()
                    outage = min(max(outage * 2, 0.25), OUTAGE_BACKOFF_MAX_S)
                    self._sleep_unless_stopped(outage)
        except Exception as exc:  # StopRequested while idle, or a bug
            if not isinstance(exc, rqa.StopRequested):
                self.log.exception("worker %s: stopping after an unexpected error", self.name)
        finally:
            try:
                self.wait_finishing()  # a batch finishing in the background ends before the worker
            except Exception:  # Redis gone: those jobs stay started and are retried elsewhere
                self.log.exception("worker %s: finishing the last batch failed", self.name)
            self.teardown()
        return done

    def wait_finishing(self) -> None:
        """Wait for the batch being finished in the background, if any (its errors raise here)."""
        finishing, self.finishing_batch = self.finishing_batch, None
        if finishing is not None:
            finishing.result()

    def _rejoin(self) -> None:
        """After an outage: a promoted replica may not have this worker's registration (replication
        is asynchronous); register again so the worker counts as alive, then heart-beat."""
        rqa.ensure_registered(self)
        rqa.mark_idle(self)
        self.heartbeat()

    def _sleep_unless_stopped(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not rqa.stop_requested(self) and time.monotonic() < deadline:
            time.sleep(0.05)

    def pull(self, burst: bool = False) -> list[tuple[Job, Queue]]:
        # short blocking rounds: an idle worker must still run maintenance (abandoned-job recovery)
        first = rqa.dequeue_first(self, None if burst else self.settings.maintenance_interval_s)
        if first is None:
            return []
        rqa.mark_busy(self)  # from here SIGTERM only asks to stop after this batch
        pulled = [first]
        tiles = self._tiles(first[0])
        deadline = time.monotonic() + self.settings.max_batch_wait_ms / 1000
        waiting = None  # decided at the first empty look: is company likely?
        while len(pulled) < self.settings.max_jobs_per_pull and tiles < self.engine.max_batch:
            more = rqa.dequeue_nowait(self)
            if more is not None:
                pulled.append(more)
                tiles += self._tiles(more[0])
                continue
            if waiting is None:  # nothing queued: wait for company only while other jobs are running
                waiting = rqa.jobs_running(self)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        return pulled

    def _tiles(self, job: Job) -> int:
        payload = job.args[0]
        return self.engine.tiles_for(payload.get("width") or 1, payload.get("height") or 1)

    def execute_batch(self, pulled: list[tuple[Job, Queue]]) -> int:
        running = []
        for job, queue in pulled:
            if not self._claim(job):  # canceled between its dequeue and now: it must not start
                rqa.drop_dequeued(self, queue, job)
                self.metrics.jobs.labels("canceled").inc()
                continue
            if (left := rqa.retries_left(job)) is not None and left < self.settings.job_retries:
                self.metrics.jobs_retried.inc()  # its earlier run was abandoned (worker died) or failed
            execution = rqa.start_execution(self, job)
            payload = JobPayload.from_dict(job.args[0])
            self.metrics.queue_wait_seconds.observe(max(time.time() - payload.submitted_at, 0))
            if payload.deadline and time.time() > payload.deadline:
                waited = time.time() - payload.submitted_at
                self._fail(job, queue, execution, JobExpired(f"waited {waited:.0f}s in the queue"))
                continue
            running.append((job, queue, execution, payload))
        if not running:
            rqa.mark_idle(self)
            return len(pulled)

        self.metrics.batch_jobs.observe(len(running))
        total = sum(self.engine.tiles_for(p.width, p.height) for *_, p in running)
        done_tiles = 0

        last_report = time.monotonic()

        def on_batch(tiles: int) -> None:
            nonlocal done_tiles, last_report
            done_tiles += tiles
            self.metrics.batch_tiles.observe(tiles)
            self.metrics.tiles.inc(tiles)
            # Progress and heartbeats cost Redis round trips per job: at most twice a second,
            # not after every forward pass (a small model on a GPU runs hundreds per second).
            if time.monotonic() - last_report < PROGRESS_INTERVAL_S:
                return
            last_report = time.monotonic()
            with self.connection.pipeline() as pipe:
                for job, *_ in running:
                    pipe.set(progress_key(job.id), f"{min(done_tiles / total, 1):.3f}", ex=self.settings.result_ttl_s)
                    pipe.exists(canceled_key(job.id))
                canceled = pipe.execute()[1::2]
            if all(canceled):  # nobody wants the rest of this batch (nor should a SIGTERM wait for it)
                raise BatchAbandoned(f"all {len(running)} job(s) of the batch were canceled")
            for job, _, execution, _ in running:
                rqa.heartbeat_execution(self, job, execution)

        timeout = min(rqa.job_timeout(self, job) for job, *_ in running)
        oom_before = self.engine.runner.oom_retries
        start = time.perf_counter()
        ran: RanBatch | None = None
        outcomes: list[Outcome] | None = None
        background = self.finishes_in_background
        try:
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=running[0][0].id):
                ran = run_batch(self.engine, self.store, [j.args[0] for j, *_ in running], on_batch)
                if not background:
                    outcomes = store_batch(self.store, ran, self.settings.result_ttl_s)
        except BatchAbandoned as exc:
            self.log.info("worker %s: %s; stopped it", self.name, exc)
            outcomes = [exc] * len(running)
        except Exception as exc:  # timeout, or a failure of the batch as a whole
            self.log.exception("worker %s: batch of %d job(s) failed", self.name, len(running))
            outcomes = [exc] * len(running)
        self.metrics.inference_seconds.observe(time.perf_counter() - start)
        self.metrics.oom_retries.inc(self.engine.runner.oom_retries - oom_before)
        if self.engine.device.type == "cuda":
            self.metrics.device_memory.set(torch.cuda.memory_allocated(self.engine.device))

        self.wait_finishing()  # the previous batch's (it overlapped this batch's forward passes)
        if outcomes is None:
            assert ran is not None
            self.finishing_batch = self.finisher.submit(self._store_and_finish, running, ran)
        else:
            self._finish(running, outcomes)
        rqa.mark_idle(self)
        return len(pulled)

    def _store_and_finish(self, running: list[tuple[Job, Queue, Execution, JobPayload]], ran: RanBatch) -> None:
        self._finish(running, store_batch(self.store, ran, self.settings.result_ttl_s))

    def _finish(self, running: list[tuple[Job, Queue, Execution, JobPayload]], outcomes: list[Outcome]) -> None:
        """Each job's outcome into RQ (results, registries, retries) and to whoever waits on it."""
        for (job, queue, execution, _), outcome in zip(running, outcomes, strict=True):
            if not self._still_owns(queue, execution):
                # Cut off from Redis past the heartbeat grace: the job was declared abandoned and
                # handed on. Its other run owns the outcome; this one must not finish it twice.
                self.log.warning("worker %s: job %s was handed on meanwhile; dropping this run", self.name, job.id)
                self.metrics.jobs.labels("superseded").inc()
                continue
            if self.connection.exists(canceled_key(job.id)):
                self._cancel(job, execution, outcome)
            elif isinstance(outcome, BaseException):
                self._fail(job, queue, execution, outcome)
            else:
                rqa.finish_success(self, job, queue, execution, outcome)
                self.store.delete(input_key(job.id))  # finished: nothing will read it again
                self.metrics.jobs.labels("finished").inc()
                self._announce(job)

    def _claim(self, job: Job) -> bool:
        """Claim a queued job before starting it, exclusively of a DELETE (``claim_key``): False
        if the DELETE came first. A retried job keeps its first run's claim."""
        key = claim_key(job.id)
        if self.connection.set(key, "start", nx=True, ex=self.settings.result_ttl_s):
            return True
        return self.connection.get(key) != b"cancel"

    def _still_owns(self, queue: Queue, execution: Execution) -> bool:
        """This run is still the job's live execution: RQ's abandoned-job clean-up removes an
        execution whose heartbeat lapsed from the started registry (heartbeats only refresh an
        entry that is still there)."""
        return rqa.owns_execution(self, queue, execution)

    def _fail(self, job: Job, queue: Queue, execution: Execution, exc: BaseException) -> None:
        if isinstance(exc, FINAL_ERRORS):
            rqa.forbid_retries(job)
            self.store.delete(input_key(job.id))  # nothing will read it again
        rqa.finish_failure(self, job, queue, execution, exc)
        # one count per job, not per attempt: an attempt that RQ will retry is "retrying"
        final = job.get_status(refresh=False) == JobStatus.FAILED
        self.metrics.jobs.labels("expired" if isinstance(exc, JobExpired) else "failed" if final else "retrying").inc()
        # RQ records an expired job as failed; the API (service/jobs.py) and its webhook say expired
        self._announce(job, "expired" if isinstance(exc, JobExpired) else None)

    def _announce(self, job: Job, status: str | None = None) -> None:
        """Wake gateways waiting on this job (``Prefer: wait``) and queue its webhook, if any."""
        if status is None:
            rq_status = job.get_status(refresh=False) or ""
            status = getattr(rq_status, "value", rq_status)
        with self.connection.pipeline() as pipe:
            announce_end(pipe, JobPayload.from_dict(job.args[0]), status)
            pipe.execute()

    def _cancel(self, job: Job, execution: Execution, outcome: Any) -> None:
        """Canceled while running: drop its outputs and record it as canceled, not finished."""
        if isinstance(outcome, dict):
            self.store.delete(*outcome["outputs"].values())
        rqa.drop_execution(self, job, execution)
        cancel_job(job, self.settings.result_ttl_s)
        self.metrics.jobs.labels("canceled").inc()
        self._announce(job)
