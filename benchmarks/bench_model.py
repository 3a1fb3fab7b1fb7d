"""Images/s of the bare student vs the project's pipeline, at batch sizes 1..16.

"bare" calls encode → velocity → decode on a device-resident batch (what the reference figures
measure: VAE enc + 2 UNet passes + VAE dec for sd21). "pipeline" is the real path: CPU image
tensors → tiling/batching (one tile per image here) → colour fix → blended CPU outputs, through
``models.pipeline.Upscaler``. Both use the same resident, adapter-merged student, in one process.

    python benchmarks/bench_model.py --family compact --device cpu
    python benchmarks/bench_model.py --family sd21 --device cuda --dtype fp16 --compile-batch 16
    python benchmarks/bench_model.py --model rrdb --device cpu --batches 1,2,4 --mmap-mb 32 --min-iters 3

Prints a table and writes JSON (``--json``). Random weights unless ``--model``: speed does not
depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from models import build_student, load_student
from models.pipeline import TileRunner, UpscaleJob, Upscaler
from models.presets import DEFAULT_PRESET, load_preset, resolve_model
from worker.memory import fix_mmap_threshold


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rates(fns, batch: int, device: torch.device, warmup: int, min_time: float, min_iters: int) -> list[float]:
    """Images/s of each function: medians over interleaved rounds (A, B, A, B, ...), so clock
    and load drift hit all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_iters or time.perf_counter() - start < min_time * len(fns):
        for fn, bucket in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            bucket.append(time.perf_counter() - t0)
    return [batch / statistics.median(bucket) for bucket in times]


def bench(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.mmap_mb:
        fix_mmap_threshold(args.mmap_mb)
    if args.model:  # a trained checkpoint, as the worker loads it
        student = load_student(resolve_model(args.model))
        config, args.family, args.preset = student.config, student.config.family, None
        if args.compile_batch:
            raise SystemExit("--compile-batch needs a --preset (each compiled run builds a fresh student)")
    else:
        args.preset = args.preset or DEFAULT_PRESET[args.family]
        config = load_preset(args.preset)
        if config.family == "sd21":  # random weights, no base folder: no text encoder to refuse on
            config.arch["prompt_embedding"] = "zeros"
        student = build_student(config)
    lr_side = args.out_size // config.scale
    rows = []
    compiled_batches = set(args.compile_batch)
    for compile_ in (False, True) if compiled_batches else (False,):
        if compile_:
            student = build_student(config)  # fresh copy: compiled stages replace the eager ones
        runner = TileRunner(student, args.device, args.dtype, compile=compile_)
        device = runner.device
        for batch in sorted(compiled_batches) if compile_ else args.batches:
            lr_dev = torch.rand(batch, 3, lr_side, lr_side, device=device, dtype=runner.dtype)
            if runner.channels_last:
                lr_dev = lr_dev.contiguous(memory_format=torch.channels_last)
            alpha = torch.full((batch,), 0.5, device=device)

            @torch.inference_mode()
            def bare(lr=lr_dev, alpha=alpha, s=runner.student):
                if args.model:  # the student's own forward, band-split decoding included (as bench_service)
                    return s(lr, alpha)
                z0 = s.encode(lr)
                return s.decode(s.mix(z0, s.velocity(z0), alpha))

            images = [torch.rand(3, lr_side, lr_side) for _ in range(batch)]
            upscaler = Upscaler(runner, tile=lr_side, overlap=0, max_batch=batch, canvas_device=args.canvas_device)

            def pipeline(images=images, upscaler=upscaler):
                return upscaler.run([UpscaleJob(img, (0.5,), args.color_fix) for img in images])

            t0 = time.perf_counter()
            bare_rate, pipe_rate = _rates([bare, pipeline], batch, device, args.warmup, args.min_time, args.min_iters)
            row = {
                "batch": batch,
                "compile": compile_,
                "bare_img_s": round(bare_rate, 3),
                "pipeline_img_s": round(pipe_rate, 3),
                "pipeline_over_bare": round(pipe_rate / bare_rate, 3),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            if device.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                torch.cuda.reset_peak_memory_stats(device)
            rows.append(row)
            print(
                f"{args.family:8s} {device!s:6s} {str(runner.dtype).split('.')[-1]:9s} "
                f"{'compiled' if compile_ else 'eager':8s} batch {batch:2d}: bare {bare_rate:8.2f} img/s, "
                f"pipeline {pipe_rate:8.2f} img/s ({pipe_rate / bare_rate:6.1%})",
                flush=True,
            )
    return {
        "family": args.family,
        "preset": args.preset,
        "model": str(args.model) if args.model else None,
        "mmap_mb": args.mmap_mb,
        "out_size": args.out_size,
        "lr_size": lr_side,
        "color_fix": args.color_fix,
        "canvas_device": args.canvas_device,
        "device": str(runner.device),
        "device_name": torch.cuda.get_device_name(runner.device)
        if runner.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "dtype": str(runner.dtype).split(".")[-1],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["compact", "sd21"], default="compact")
    p.add_argument("--model", help="a bundled name (rrdb, compact) or checkpoint folder instead of a random --preset")
    p.add_argument(
        "--mmap-mb", type=int, default=0, help="glibc's mmap threshold as the worker fixes it (32); 0: default"
    )
    p.add_argument("--preset", help="default: compact-x4 or sd21-base (full SD-2.1-base shapes)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out-size", type=int, default=512)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--compile-batch", type=lambda s: [int(x) for x in s.split(",") if x], default=[])
    p.add_argument("--color-fix", default="wavelet")
    p.add_argument("--canvas-device", default="auto", help="where tiles are blended: auto, cpu, cuda")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timed calls per cell")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    result = bench(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
