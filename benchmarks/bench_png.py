"""The worker's PNG writer against Pillow's, on what the worker actually encodes.

Each photo (centre-cropped to ``--side`` LR pixels) and one uniform-noise image are upscaled by
the model the worker serves (``--model``, the wavelet colour fix, as the API's defaults), then
each result is encoded by Pillow at compress levels 0, 1 (what the worker used before) and 6
(Pillow's default) and by ``models.png.encode_png``: median time of ``--repeats`` runs and the
size, the decoded pixels checked equal. Then the worker's whole path from its float result
(quantizing included) on a pool of ``--threads`` encoder threads: as one band (``worker-1``, what
the worker did before) and in one band per thread (``worker-N``, what it does now). Prints a table
and writes JSON.

    python benchmarks/bench_png.py runs/photos --json benchmarks/results/png_cpu.json
    python benchmarks/bench_png.py runs/photos --side 512 --pillow-levels "" --repeats 5 \
        --json benchmarks/results/png_cpu_2048.json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models import load_student
from models.imaging import list_images, load_image, to_pil
from models.pipeline import TileRunner, UpscaleJob, Upscaler
from models.png import assemble_png, encode_png
from models.presets import resolve_model
from worker.engine import png_band, png_bands


def median_ms(encode: Callable[[], bytes], repeats: int) -> float:
    encode()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def pillow(pil: Image.Image, level: int) -> Callable[[], bytes]:
    def encode() -> bytes:
        buf = io.BytesIO()
        pil.save(buf, "PNG", compress_level=level)
        return buf.getvalue()

    return encode


def worker_path(pool: ThreadPoolExecutor, rgb: torch.Tensor, bands: int) -> Callable[[], bytes]:
    """The worker's encoding of one ``[3, H, W]`` float result, in ``bands`` bands on ``pool``."""
    rows = png_bands(rgb.shape[-2], rgb.shape[-1], bands)

    def encode() -> bytes:
        return assemble_png([f.result() for f in [pool.submit(png_band, rgb, *r, False) for r in rows]])

    return encode


def inputs(photos: list[Path], side: int) -> dict[str, Image.Image]:
    found = {}
    for path in photos:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        scale = side / min(rgb.size)
        size = (max(side, round(rgb.width * scale)), max(side, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
        left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
        found[path.stem] = rgb.crop((left, top, left + side, top + side))
    noise = np.random.default_rng(0).integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    found["noise"] = Image.fromarray(noise)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, nargs="+", help="image files or folders")
    parser.add_argument("--model", default="compact", help="a bundled name or a checkpoint folder")
    parser.add_argument("--side", type=int, default=128, help="LR edge (the result is 4x)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="torch's threads and the encoder threads")
    parser.add_argument("--pillow-levels", default="0,1,6", help="Pillow compress levels to compare ('' for none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    upscaler = Upscaler(TileRunner(load_student(resolve_model(args.model)), "cpu"), tile=max(args.side, 64))
    encoders = {f"pillow-{level}": int(level) for level in args.pillow_levels.split(",") if level}
    pool = ThreadPoolExecutor(args.threads, thread_name_prefix="ctsr-encode")
    rows: list[dict[str, Any]] = []
    for name, lr in inputs(list_images(args.photos), args.side).items():
        buf = io.BytesIO()
        lr.save(buf, "PNG")
        (sr,) = upscaler.run([UpscaleJob(load_image(buf.getvalue()).rgb)])
        pil = to_pil(sr[0])
        pixels = np.asarray(pil)
        row: dict[str, Any] = {"image": name, "size": f"{pil.width}x{pil.height}"}
        runs = {label: pillow(pil, level) for label, level in encoders.items()}
        runs["ctsr"] = lambda: encode_png(pixels)  # noqa: B023  (used before the loop moves on)
        runs["worker-1"] = worker_path(pool, sr[0], 1)
        runs[f"worker-{args.threads}"] = worker_path(pool, sr[0], args.threads)
        for label, encode in runs.items():
            data = encode()
            with Image.open(io.BytesIO(data)) as img:
                assert np.array_equal(np.asarray(img), pixels), f"{label} changed {name}'s pixels"
            row[f"{label}_ms"] = round(median_ms(encode, args.repeats), 2)
            row[f"{label}_kb"] = round(len(data) / 1024, 1)
        rows.append(row)
        print(name, {k: v for k, v in row.items() if k != "image"}, flush=True)

    labels = [*encoders, "ctsr", "worker-1", f"worker-{args.threads}"]
    print(f"\n{'image':>28} " + " ".join(f"{label + ' ms':>14} {'KB':>7}" for label in labels))
    for r in rows:
        cells = " ".join(f"{r[f'{label}_ms']:>14.1f} {r[f'{label}_kb']:>7.0f}" for label in labels)
        print(f"{str(r['image'])[:28]:>28} {cells}")
    photos = [r for r in rows if r["image"] != "noise"]
    summary = {}
    for label in labels:
        summary[label] = {
            "photo_ms_median": statistics.median(float(r[f"{label}_ms"]) for r in photos) if photos else None,
            "photo_kb_total": round(sum(float(r[f"{label}_kb"]) for r in photos), 1),
        }
    print("\nphotos:", json.dumps(summary))
    if args.json:
        meta = {"model": args.model, "lr_side": args.side, "threads": args.threads, "torch": torch.__version__}
        args.json.write_text(json.dumps({**meta, "summary": summary, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
