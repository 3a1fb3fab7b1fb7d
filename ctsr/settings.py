"""Service configuration as data: every knob is a ``CTSR_*`` environment variable.

Shared by the gateway and the workers (each reads the fields it needs); imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTSR_", extra="ignore")

    # -- shared ---------------------------------------------------------------------------------
    redis_url: str | None = None  # unset: `ctsr serve` starts an embedded redis-server
    redis_password: SecretStr | None = None  # the data nodes' password (kept out of the URL: a secret)
    #: "host:port" of each Redis Sentinel: clients then follow the primary of ``redis_sentinel_master``
    #: through failovers (``redis_url`` is then unused).
    redis_sentinels: list[str] = []
    redis_sentinel_master: str = "ctsr"
    redis_sentinel_password: SecretStr | None = None
    #: What a 202 promises: the job is on the primary and on this many replicas (Redis WAIT). With
    #: asynchronous replication a primary lost just after answering could otherwise take an
    #: accepted job with it. 0: answer once the primary has it.
    redis_min_replica_acks: int = Field(0, ge=0)
    redis_replica_wait_ms: int = Field(1000, ge=1)  # how long an upload waits for those acks
    queue: str = "ctsr"
    #: ``ctsr serve``: where its embedded Redis keeps its data between runs (default ~/.local/state/ctsr)
    state_dir: Path | None = None
    blob_store: Literal["redis", "file"] = "redis"
    blob_dir: Path | None = None  # for blob_store=file: a folder shared by gateway and workers
    result_ttl_s: int = Field(3600, ge=10)  # inputs, outputs and job records live this long

    # -- gateway --------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    #: Slow or idle clients (ctsr/http_server.py): request headers must be complete this long after
    #: a connection's first byte; a request body may pause at most body_idle_timeout_s; an idle
    #: keep-alive connection is closed after keep_alive_s.
    header_timeout_s: float = Field(10.0, gt=0)
    body_idle_timeout_s: float = Field(30.0, gt=0)
    keep_alive_s: float = Field(5.0, gt=0)
    max_upload_bytes: int = Field(20 * 2**20, ge=1024)
    max_pixels: int = Field(16_000_000, ge=64)  # LR pixels accepted per upload
    max_side: int = Field(8192, ge=16)
    max_alphas: int = Field(8, ge=1)
    #: Output pixels a job may produce, all alphas together (413 beyond). It bounds a worker's memory
    #: (a 2000x1500 upload with 3 alphas, 144 MP, took 4.2 GB on the CPU path) and keeps each result
    #: far below Redis's 512 MB value limit.
    max_output_pixels: int = Field(128_000_000, ge=1024)
    scale: int = Field(4, ge=1)  # the served model's factor (every bundled model is x4); workers check it
    #: /readyz also waits for a warm worker. Set false where workers scale to zero (KEDA): gateways
    #: must take uploads for the queue to grow and the autoscaler to start a worker.
    ready_needs_worker: bool = True
    max_queue_depth: int = Field(256, ge=1)  # admission control: 429 beyond this
    max_queue_wait_s: int = Field(300, ge=1)  # a job not started by then becomes "expired"
    max_wait_s: int = Field(60, ge=0)  # cap on `Prefer: wait=N`
    max_waiters: int = Field(64, ge=1)  # requests blocked in `Prefer: wait` at once
    job_timeout_s: int = Field(600, ge=10)
    job_retries: int = Field(2, ge=0)  # retries after a worker dies mid-batch

    # -- access ---------------------------------------------------------------------------------
    api_keys: dict[str, str] = {}  # key name → SHA-256 hex of the key (`ctsr key new NAME`); empty: open API
    rate_limit_per_min: int = Field(0, ge=0)  # uploads per key (or client address) a minute; 0: off
    metrics_need_key: bool = False  # put /metrics behind the API keys too
    #: Addresses or CIDRs of the reverse proxies / load balancers in front of the gateways. Only
    #: connections from these may set the client address by X-Forwarded-For (rate limits key on
    #: it); empty: the header is ignored and the peer address counts.
    trusted_proxies: list[str] = []
    cors_origins: list[str] = []  # browser origins allowed to call the API ("*": any)
    webhook_secret: str | None = None  # HMAC-SHA256 key signing webhook bodies; unset: webhooks refused
    webhook_allow_hosts: list[str] = []  # "host:port" pairs allowed even if they resolve to private addresses
    webhook_allow_private: bool = False  # allow loopback/private/link-local targets (trusted networks only)
    webhook_attempts: int = Field(5, ge=1)  # deliveries tried per job, with exponential back-off
    webhook_timeout_s: float = Field(5.0, gt=0)
    webhook_concurrency: int = Field(32, ge=1)  # deliveries in flight per gateway
    webhook_per_host: int = Field(4, ge=1)  # of which at most this many to one receiver (host:port)

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinel_addresses(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{entry!r}: name a sentinel as host:port, e.g. redis-sentinel-0:26379")
        return entries

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _host_and_port(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit() or host.endswith(":"):
                raise ValueError(f"{entry!r}: name a host and its port, e.g. hooks.internal:8443 or [fd00::1]:443")
        return entries

    @field_validator("api_keys")
    @classmethod
    def _hashed_keys(cls, keys: dict[str, str]) -> dict[str, str]:
        for name, digest in keys.items():
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError(f"{name!r} is not a SHA-256 hex digest (make one with: ctsr key new NAME)")
        return {name: digest.lower() for name, digest in keys.items()}

    # -- worker ---------------------------------------------------------------------------------
    model: Path | None = None  # checkpoint folder or bundled name (rrdb, compact); default: the bundled rrdb
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    tile: int = Field(128, ge=16)
    #: Tiles per forward pass. Unset: 8 on an accelerator, 1 on a CPU (``BatchEngine.max_batch``).
    max_batch: int | None = Field(None, ge=1)
    #: How long a batch may wait to fill, only while other jobs are running (a lone request on an
    #: idle service goes at once).
    max_batch_wait_ms: int = Field(20, ge=0)
    max_jobs_per_pull: int = Field(16, ge=1)
    #: Threads that turn a batch's results into PNG/WebP/JPEG, every alpha of every job at once,
    #: and a PNG result in one band of rows per thread (the encoders release the GIL). 0: one per
    #: CPU core, at most 8.
    encode_threads: int = Field(0, ge=0, le=64)
    #: Store a batch's outputs and finish its jobs on a thread while the next batch runs. Unset: only
    #: on an accelerator (on a CPU both would share the model's cores).
    finish_in_background: bool | None = None
    #: glibc: allocations from this size up are mmapped, and the heap's free pages go back to the
    #: system after a forward pass that leaves over 64 MB free, so the heap does not grow job by
    #: job (``worker/memory.py``; 32 is glibc's maximum). 0: glibc's adaptive default, no trimming.
    malloc_mmap_threshold_mb: int = Field(32, ge=0, le=32)
    #: Each worker's own /metrics. Loopback by default like the gateway (the images set 0.0.0.0);
    #: not 9100, which node_exporter holds on most hosts. 0: no metrics server.
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = Field(9464, ge=0, le=65535)
    heartbeat_grace_s: int = Field(60, ge=1)  # a silent worker's jobs count as abandoned after this
    maintenance_interval_s: int = Field(10, ge=1)
    warmup: bool = True
