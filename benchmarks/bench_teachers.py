"""Students vs teachers on the CPU at 128→512: the speed side of the distillation.

Times each student (one alpha, a batch of mixed alphas, and a 5-alpha sweep), prepared for
serving as the worker prepares it (adapters merged, channels-last), and Real-ESRGAN x4plus on the
same 128×128 LR input in the same process and the same memory layout, interleaving the models
each round so machine noise hits all of them alike. Prints a table and writes
benchmarks/results/teachers_cpu.json (``--layout contiguous``: teachers_cpu_contiguous.json).

    python benchmarks/bench_teachers.py [--threads 2] [--rounds 5] [--layout channels_last] [--model DIR ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models import load_student
from models.presets import BUNDLED_COMPACT, BUNDLED_FIDELITY_TEACHER, default_model
from models.teachers.loading import load_teacher

RESULTS = Path(__file__).parent / "results" / "teachers_cpu.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="LR edge")
    parser.add_argument("--model", type=Path, action="append", help="default: the bundled model and compact")
    parser.add_argument(
        "--layout", choices=["channels_last", "contiguous"], default="channels_last",
        help="memory layout of every model and input (the worker serves channels_last)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layout = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    realness = load_teacher("realesrgan")
    realness.net.to(memory_format=layout)
    fidelity = load_teacher(str(BUNDLED_FIDELITY_TEACHER))
    fidelity.model.to(memory_format=layout)
    lr = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    lr = lr.contiguous(memory_format=layout)
    pair = lr.expand(2, -1, -1, -1).contiguous(memory_format=layout)
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "realness teacher (Real-ESRGAN x4plus)": lambda: realness(lr),
        "fidelity teacher (RRDBNet, L1)": lambda: fidelity(lr),
    }
    for folder in args.model or [default_model(), BUNDLED_COMPACT]:
        student = load_student(folder).eval()
        student.prepare_for_inference()
        student.to(memory_format=layout)
        name = Path(folder).name
        runs[f"{name} (alpha=0.5)"] = lambda s=student: s(lr, 0.5)
        runs[f"{name} (2 images, alphas 0 and 1) / 2"] = lambda s=student: s(pair, torch.tensor([0.0, 1.0]))
        runs[f"{name} (5-alpha sweep)"] = lambda s=student: s.sweep(lr, [0, 0.25, 0.5, 0.75, 1])
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) / (2 if "/ 2" in name else 1) for name, t in times.items()}
    base = median["realness teacher (Real-ESRGAN x4plus)"]
    print(f"{args.size}→{args.size * 4} on CPU, {args.threads} threads, {args.layout}, median of {args.rounds} rounds")
    print(f"{'run':52} {'s / image':>10} {'× Real-ESRGAN time':>19} {'speed-up':>9}")
    for name, t in median.items():
        print(f"{name:52} {t:10.3f} {t / base:18.2f}x {base / t:8.1f}x")
    out = RESULTS if args.layout == "channels_last" else RESULTS.with_name("teachers_cpu_contiguous.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "lr_size": args.size, "layout": args.layout, "threads": args.threads, "rounds": args.rounds,
        "cpu": platform.processor(),
        "torch": torch.__version__, "seconds": times, "median_s": median,
        "time_vs_realesrgan": {k: v / base for k, v in median.items()},
        "speedup_vs_realesrgan": {k: base / v for k, v in median.items()},
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
