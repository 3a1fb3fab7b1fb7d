"""Per-worker Prometheus metrics (served on the worker's own port). Labels are bounded: no job ids."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds-valued histograms reach minutes: big images on a busy GPU take that long.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.batch_tiles = Histogram(
            "ctsr_worker_batch_tiles", "Tiles per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.batch_jobs = Histogram(
            "ctsr_worker_batch_jobs", "Jobs pulled together into one batch", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
        self.tiles = Counter("ctsr_worker_tiles", "Tiles processed (rate = tiles/s)", registry=r)
        self.inference_seconds = Histogram(
            "ctsr_worker_inference_seconds",
            "Time per pulled batch of jobs on the worker's loop: inputs, forward passes, and encoding and "
            "storing unless the batch is finished in the background (CTSR_FINISH_IN_BACKGROUND)",
            buckets=SECONDS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "ctsr_worker_queue_wait_seconds", "Submission to start of work", buckets=SECONDS, registry=r
        )
        self.oom_retries = Counter("ctsr_worker_oom_retries", "Tile batches split after out-of-memory", registry=r)
        self.jobs = Counter("ctsr_worker_jobs", "Jobs by outcome", ["outcome"], registry=r)
        self.jobs_retried = Counter(
            "ctsr_worker_jobs_retried", "Jobs started again after an abandoned (dead worker) or failed run", registry=r
        )
        self.redis_outages = Counter(
            "ctsr_worker_redis_outages", "Times Redis became unreachable (failover, cut link) and came back", registry=r
        )
        self.model_ready = Gauge("ctsr_worker_model_ready", "1 once the model is loaded and warm", registry=r)
        self.ready = False  # what /readyz answers (worker/health.py)
        self.device_memory = Gauge(
            "ctsr_worker_device_memory_bytes", "Device memory allocated by the model process", registry=r
        )

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.model_ready.set(int(ready))
