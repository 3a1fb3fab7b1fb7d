"""Student vs teachers on the CPU at 128→512: the speed side of the distillation.

Times the bundled student (one alpha, and a 5-alpha sweep) and Real-ESRGAN x4plus on the same
128×128 LR input in the same process, interleaving the models each round so machine noise hits
all of them alike. Prints a table and writes benchmarks/results/teachers_cpu.json.

    python benchmarks/bench_teachers.py [--threads 2] [--rounds 5]
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
from models.presets import BUNDLED_FIDELITY_TEACHER, default_model
from models.teachers.loading import load_teacher

RESULTS = Path(__file__).parent / "results" / "teachers_cpu.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="LR edge")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    student = load_student(args.model or default_model()).eval()
    realness = load_teacher("realesrgan")
    fidelity = load_teacher(str(BUNDLED_FIDELITY_TEACHER))
    lr = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "student (alpha=0.5)": lambda: student(lr, 0.5),
        "student (5-alpha sweep)": lambda: student.sweep(lr, [0, 0.25, 0.5, 0.75, 1]),
        "realness teacher (Real-ESRGAN x4plus)": lambda: realness(lr),
        "fidelity teacher (RRDBNet, L1)": lambda: fidelity(lr),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["realness teacher (Real-ESRGAN x4plus)"]
    print(f"{args.size}→{args.size * 4} on CPU, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'model':42} {'s / image':>10} {'vs Real-ESRGAN':>15}")
    for name, t in median.items():
        print(f"{name:42} {t:10.3f} {base / t:14.1f}x")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({
        "lr_size": args.size, "threads": args.threads, "rounds": args.rounds, "cpu": platform.processor(),
        "torch": torch.__version__, "seconds": times, "median_s": median,
        "speedup_vs_realesrgan": {k: base / v for k, v in median.items()},
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
