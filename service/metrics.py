"""Gateway metrics: HTTP traffic plus the queue gauges an autoscaler watches.

Queue depth and the oldest queued job's age are read from Redis at scrape time, so they are
true for the whole deployment however many gateways run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from rq import Queue

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class QueueCollector(Collector):
    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("ctsr_queue_depth", "Jobs waiting in the queue")
        age = GaugeMetricFamily("ctsr_queue_oldest_job_age_seconds", "Age of the oldest queued job")
        try:
            depth.add_metric([], self.queue.count)
            oldest = self.queue.connection.lindex(self.queue.key, 0)
            job_id = oldest.decode() if isinstance(oldest, bytes) else oldest
            job = self.queue.fetch_job(job_id) if job_id else None
            enqueued = job.enqueued_at.timestamp() if job and job.enqueued_at else None
            age.add_metric([], max(time.time() - enqueued, 0.0) if enqueued else 0.0)
        except Exception:  # Redis down: report nothing rather than fail the scrape
            return
        yield depth
        yield age


class GatewayMetrics:
    def __init__(self, queue: Queue) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ctsr_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "ctsr_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=SECONDS,
            registry=r,
        )
        self.submitted = Counter("ctsr_jobs_submitted", "Jobs accepted into the queue", registry=r)
        self.rejected = Counter("ctsr_jobs_rejected", "Uploads refused, by error code", ["reason"], registry=r)
        r.register(QueueCollector(queue))
