"""Peak worker memory for one job by output size: does a 4096² result cost what a 1024² one does?

Each size (and glibc mmap threshold: `CTSR_MALLOC_MMAP_THRESHOLD_MB`, 0 = glibc's adaptive default)
runs in a fresh process (peak RSS is per process): the real worker path
(``BatchEngine`` + ``process_jobs``: decode, tiled forward passes, colour fix, PNG encode, store
to a file blob store), one alpha, after a warm-up pass at the serving tile. Reported: resident
memory after the warm-up, the process's peak, and the encoded result's size. Prints a table and
writes JSON.

    python benchmarks/worker_memory.py --model compact --json benchmarks/results/worker_memory_compact.json
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHOTO = Path(__file__).parents[1] / "tests" / "data" / "seeding_96x72.jpg"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(model: str, side: int, photo: Path, mmap_mb: int) -> dict[str, float]:
    import torch
    from PIL import Image

    from ctsr.blobs import FileBlobStore
    from ctsr.contract import input_key
    from ctsr.settings import Settings
    from worker.engine import BatchEngine
    from worker.process import process_jobs

    torch.set_num_threads(2)
    engine = BatchEngine(Settings(model=model, malloc_mmap_threshold_mb=mmap_mb))
    engine.warmup()
    warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    buf = io.BytesIO()
    with Image.open(photo) as im:
        im.convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(buf, "PNG")
    with tempfile.TemporaryDirectory() as tmp:
        store = FileBlobStore(Path(tmp))
        store.put(input_key("job"), buf.getvalue(), 600)
        start = time.perf_counter()
        (outcome,) = process_jobs(engine, store, [{"job_id": "job", "alphas": [0.5], "format": "png"}], 600)
        seconds = time.perf_counter() - start
        if isinstance(outcome, BaseException):
            raise outcome
        size = sum(len(store.get(key) or b"") for key in outcome["outputs"].values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"input": side, "output": side * engine.runner.scale, "warm_mb": round(warm, 1),
            "peak_mb": round(peak, 1), "after_mb": round(_rss_mb(), 1), "encoded_mb": round(size / 2**20, 2),
            "seconds": round(seconds, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="compact")
    parser.add_argument("--sides", type=int, nargs="+", default=[256, 1024], help="input sides (output = 4x)")
    parser.add_argument("--photo", type=Path, default=PHOTO)
    parser.add_argument(
        "--mmap-mb",
        type=int,
        nargs="+",
        default=[0, 4, 32],
        help="CTSR_MALLOC_MMAP_THRESHOLD_MB values to compare (0: glibc's adaptive default)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.child, args.photo, args.mmap_mb[0])))
        return
    rows = []
    for mmap_mb in args.mmap_mb:
        for side in args.sides:
            cmd = [sys.executable, __file__, "--model", args.model, "--photo", str(args.photo),
                   "--mmap-mb", str(mmap_mb), "--child", str(side)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append({"mmap_threshold_mb": mmap_mb, **json.loads(out.strip().splitlines()[-1])})
    print(f"model {args.model}, one alpha, PNG; peak ratio against the smallest output at the same threshold")
    print(f"{'mmap MB':>7} {'output':>8} {'warm MB':>8} {'peak MB':>8} {'encoded MB':>10} {'s':>6} {'peak ratio':>10}")
    for r in rows:
        base = next(b for b in rows if b["mmap_threshold_mb"] == r["mmap_threshold_mb"])
        r["peak_ratio"] = round(r["peak_mb"] / base["peak_mb"], 3)
        r["peak_ratio_less_encoded"] = round((r["peak_mb"] - r["encoded_mb"]) / base["peak_mb"], 3)
        side = f"{r['output']}²"
        print(f"{r['mmap_threshold_mb']:7} {side:>8} {r['warm_mb']:8.0f} {r['peak_mb']:8.0f} {r['encoded_mb']:10.1f} "
              f"{r['seconds']:6.1f} {r['peak_ratio']:10.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
