"""Converted Real-ESRGAN x4plus (torch) vs the ncnn original, on a crop of a real photo.

Runs the teacher (``RealESRGANTeacher.from_package``: the cached conversion) and the ``ncnn``
package on the same .param/.bin and the same LR crop, and reports how far apart the clamped
outputs are (in 1/255 units) and how long each took (median of ``--repeat`` timed runs after one
warm-up, same thread count for both).

    python benchmarks/check_teacher_conversion.py [photo.jpg] [--crop 96x72] [--threads 1]

Needs ``pip install 'ctsr[teachers]' ncnn``. Prints a table and writes JSON
(default benchmarks/results/teacher_conversion.json).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.imaging import load_image
from models.teachers import realesrgan as rg

REPO = Path(__file__).resolve().parent.parent


def _median_seconds(fn: Callable[[], np.ndarray], repeat: int) -> tuple[float, np.ndarray]:
    out = fn()  # warm-up (and the result)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _ncnn_runner(lr: np.ndarray, threads: int) -> Callable[[], np.ndarray]:
    import ncnn

    folder = Path(str(importlib.resources.files(rg.PACKAGE) / "models"))
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    if net.load_param(str(folder / f"{rg.MODEL}.param")) or net.load_model(str(folder / f"{rg.MODEL}.bin")):
        raise SystemExit("ncnn could not load the model")

    def run() -> np.ndarray:
        extractor = net.create_extractor()
        extractor.input("data", ncnn.Mat(lr))
        status, result = extractor.extract("output")
        if status:
            raise SystemExit(f"ncnn extract failed ({status})")
        return np.clip(np.array(result), 0.0, 1.0)

    return run


def check(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    rgb = load_image(args.photo).rgb
    width, height = args.crop or (rgb.shape[2], rgb.shape[1])
    if width > rgb.shape[2] or height > rgb.shape[1]:
        raise SystemExit(f"--crop {width}x{height} is larger than the photo ({rgb.shape[2]}x{rgb.shape[1]})")
    top, left = (rgb.shape[1] - height) // 2, (rgb.shape[2] - width) // 2
    lr = rgb[:, top : top + height, left : left + width].unsqueeze(0).contiguous()

    t0 = time.perf_counter()
    teacher = rg.RealESRGANTeacher.from_package(cache_dir=args.cache_dir)
    load_s = time.perf_counter() - t0
    torch_s, ours = _median_seconds(lambda: teacher(lr)[0].numpy(), args.repeat)
    ncnn_s, theirs = _median_seconds(_ncnn_runner(np.ascontiguousarray(lr[0].numpy()), args.threads), args.repeat)
    diff = np.abs(ours - theirs) * 255
    return {
        "photo": str(args.photo.resolve().relative_to(REPO))
        if args.photo.resolve().is_relative_to(REPO)
        else str(args.photo),
        "crop": f"{width}x{height}",
        "output": f"{ours.shape[2]}x{ours.shape[1]}",
        "mean_abs_diff_255": float(diff.mean()),
        "max_abs_diff_255": float(diff.max()),
        "pixels_off_by_half_level": int((diff > 0.5).sum()),
        "torch_s": round(torch_s, 4),
        "ncnn_s": round(ncnn_s, 4),
        "teacher_load_s": round(load_s, 3),
        "threads": args.threads,
        "repeat": args.repeat,
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "ncnn": importlib.metadata.version("ncnn"),
        "source": teacher.source,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("photo", nargs="?", type=Path, default=REPO / "tests" / "data" / "seeding_96x72.jpg")
    p.add_argument(
        "--crop", type=lambda s: tuple(int(v) for v in s.lower().split("x")), help="WxH, centred (default: whole)"
    )
    p.add_argument("--cache-dir", type=Path, help="converted-weights cache (default: $CTSR_CACHE_DIR/teachers)")
    p.add_argument("--threads", type=int, default=1, help="for both (1 keeps timings stable on shared runners)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "teacher_conversion.json")
    args = p.parse_args()
    result = check(args)
    print(f"{'crop':>9}  {'mean|d|/255':>11}  {'max|d|/255':>10}  {'torch s':>8}  {'ncnn s':>8}")
    print(
        f"{result['crop']:>9}  {result['mean_abs_diff_255']:>11.2e}  {result['max_abs_diff_255']:>10.2e}  "
        f"{result['torch_s']:>8.3f}  {result['ncnn_s']:>8.3f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
