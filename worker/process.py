"""One pulled group of jobs: blobs in → one batched model run → blobs out.

Shared by the batching worker and the plain RQ task, so a job gives the same pixels whichever
ran it. Per-job failures come back as exception objects; the batch carries on without them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ctsr.blobs import BlobStore
from ctsr.contract import OUTPUT_FORMATS, JobPayload, JobResult, input_key, output_key
from models.errors import CTSRError

from .engine import BatchEngine


class InputMissing(CTSRError):
    """The job's input blob is gone (its TTL ran out before a worker reached it)."""


def process_jobs(
    engine: BatchEngine,
    store: BlobStore,
    payloads: Sequence[dict[str, Any]],
    ttl_s: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any] | BaseException]:
    outcomes: list[dict[str, Any] | BaseException] = []
    runnable = []
    for raw in payloads:
        payload = JobPayload.from_dict(raw)
        try:
            data = store.get(input_key(payload.job_id))
            if data is None:
                raise InputMissing(f"input of job {payload.job_id} expired before it ran")
            runnable.append((len(outcomes), payload, engine.decode(data)))
            outcomes.append(None)  # type: ignore[arg-type]
        except CTSRError as exc:
            outcomes.append(exc)

    results = engine.run([(p, img) for _, p, img in runnable], on_batch=on_batch) if runnable else []
    for (index, payload, image), sr in zip(runnable, results, strict=True):
        encoded = engine.encode(payload, image, sr)
        outputs = {}
        for label, data in encoded.images.items():
            key = output_key(payload.job_id, float(label))
            store.put(key, data, ttl_s)
            outputs[label] = key
        store.delete(input_key(payload.job_id))
        outcomes[index] = JobResult(outputs, OUTPUT_FORMATS[payload.format], encoded.width, encoded.height).to_dict()
    return outcomes
