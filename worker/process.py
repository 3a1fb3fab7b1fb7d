"""One pulled group of jobs: blobs in → one batched model run → blobs out.

Shared by the batching worker and the plain RQ task, so a job gives the same pixels whichever
ran it. A job's fate depends on that job alone: every step after the shared forward passes
(colour fix, encoding, storing) has a per-job outcome, and a failed shared forward pass is
retried one job at a time before anyone is failed, so one poisoned input cannot take its
batch-mates down or show them its error.

Two steps, so that a worker on an accelerator can store one batch while the next one runs:
``run_batch`` (inputs, forward passes, encodings started) and ``store_batch`` (encodings
awaited, outputs stored); ``process_jobs`` is both in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from rq.timeouts import BaseTimeoutException

from ctsr.blobs import BlobStore
from ctsr.contract import OUTPUT_FORMATS, JobPayload, JobResult, input_key, output_key
from models.errors import CTSRError
from models.imaging import LoadedImage

from .engine import BatchEngine, EncodedOutputs, Encoding

log = logging.getLogger(__name__)

Outcome = dict[str, Any] | BaseException


class BatchAbandoned(Exception):
    """Raised by ``on_batch`` when nobody wants the batch any more (every job in it was canceled):
    the remaining forward passes are skipped, not retried job by job."""


class InputMissing(CTSRError):
    """The job's input blob is gone (its TTL ran out before a worker reached it)."""


def process_jobs(
    engine: BatchEngine,
    store: BlobStore,
    payloads: Sequence[dict[str, Any]],
    ttl_s: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """One outcome per payload, in order: the job's result dict or the exception that ended it."""
    return store_batch(store, run_batch(engine, store, payloads, on_batch), ttl_s)


@dataclass
class RanBatch:
    """A batch after its shared forward passes: per job, what ended it or its encoding under way.
    Storing it (``store_batch``) touches no model state, so a worker on an accelerator can do it
    while the next batch runs."""

    ends: list[BaseException | Encoding]

    def cancel(self) -> None:
        for end in self.ends:
            if isinstance(end, Encoding):
                end.cancel()


def run_batch(
    engine: BatchEngine,
    store: BlobStore,
    payloads: Sequence[dict[str, Any]],
    on_batch: Callable[[int], None] | None = None,
) -> RanBatch:
    """Read and decode every input, run the shared forward passes, start every encoding."""
    ends: list[BaseException | Encoding | None] = [None] * len(payloads)
    runnable: list[tuple[int, JobPayload, LoadedImage]] = []
    for index, raw in enumerate(payloads):
        payload = JobPayload.from_dict(raw)
        try:
            data = store.get(input_key(payload.job_id))
            if data is None:
                raise InputMissing(f"input of job {payload.job_id} expired before it ran")
            runnable.append((index, payload, engine.decode(data)))
        except BaseTimeoutException:
            raise
        except Exception as exc:
            ends[index] = exc

    # On an accelerator each job's encoding starts as soon as its last tile is done, while later
    # batches still run; on a CPU (the same cores) once the forward passes are over.
    jobs = [(payload, image) for _, payload, image in runnable]
    encodings: dict[int, Encoding] = {}

    def hand_over(position: int, sr: torch.Tensor) -> None:
        encodings[position] = engine.start_encoding(*jobs[position], sr)

    try:
        results = _run_isolated(engine, jobs, on_batch, hand_over if engine.encodes_during_forward else None)
    except BaseException:
        _cancel(encodings)
        raise
    if len(encodings) < len(results):  # the batch was retried job by job: those runs are not handed over
        _cancel(encodings)
        encodings = {i: engine.start_encoding(*jobs[i], sr) for i, sr in enumerate(results) if torch.is_tensor(sr)}
    for position, (index, _, _) in enumerate(runnable):
        result = results[position]
        ends[index] = result if isinstance(result, BaseException) else encodings[position]
    assert all(end is not None for end in ends)
    return RanBatch(ends)  # type: ignore[arg-type]


def store_batch(store: BlobStore, ran: RanBatch, ttl_s: int) -> list[Outcome]:
    """Wait for each job's encoding and store its outputs: one outcome per job, in order."""
    outcomes: list[Outcome] = []
    for end in ran.ends:
        if isinstance(end, BaseException):
            outcomes.append(end)
            continue
        try:
            encoded = end.result()
            if isinstance(encoded, BaseException):
                raise encoded
            outcomes.append(_store_outputs(store, end.payload, encoded, ttl_s))
        except BaseTimeoutException:
            ran.cancel()
            raise
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def _cancel(encodings: dict[int, Encoding]) -> None:
    for encoding in encodings.values():
        encoding.cancel()


def _run_isolated(
    engine: BatchEngine,
    jobs: Sequence[tuple[JobPayload, LoadedImage]],
    on_batch: Callable[[int], None] | None,
    on_result: Callable[[int, torch.Tensor], object] | None,
) -> list[Any]:
    """The shared forward passes (each result handed to ``on_result`` as it is done); if they
    fail, each job again on its own (its own error or result; not handed over)."""
    if not jobs:
        return []
    try:
        return list(engine.run(jobs, on_batch=on_batch, on_result=on_result))
    except (BaseTimeoutException, BatchAbandoned):
        raise
    except Exception as exc:
        if len(jobs) == 1:
            return [exc]
        log.warning("a batch of %d jobs failed (%s); running them one at a time", len(jobs), exc)
    results: list[Any] = []
    for job in jobs:
        try:
            results.extend(engine.run([job], on_batch=on_batch))
        except BaseTimeoutException:
            raise
        except Exception as exc:
            results.append(exc)
    return results


def _store_outputs(store: BlobStore, payload: JobPayload, encoded: EncodedOutputs, ttl_s: int) -> dict[str, Any]:
    outputs = {}
    try:
        for label, data in encoded.images.items():
            key = output_key(payload.job_id, float(label))
            store.put(key, data, ttl_s)
            outputs[label] = key
    except Exception:
        store.delete(*outputs.values())  # no half-stored sweep is left behind
        raise
    # The input stays: only the run that still owns the job, once it has finished it, deletes it
    # (a run cut off from Redis and superseded must not take the input from the run that replaced it).
    return JobResult(outputs, OUTPUT_FORMATS[payload.format], encoded.width, encoded.height).to_dict()
