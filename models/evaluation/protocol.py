"""``ctsr eval``: the fidelity/realness trade-off of a student against its teachers, on HR photos.

Each photo is resized (and optionally centre-cropped), degraded with the training degradation model under a fixed seed
(so every run scores the same LR inputs), and super-resolved by: the student at each alpha, both
teachers, their pixel-space linear blends at the same weights (the paper's motivating baseline)
and bicubic. Scores (PSNR/SSIM on Y with a ``scale``-pixel border crop, NIQE, optional LPIPS) are
averaged over photos; the CSV, the trade-off plot and the target check are written to one folder.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..pipeline import TileRunner, UpscaleJob, Upscaler
from ..student import CTSRStudent
from ..teachers.base import Teacher
from . import report
from .metrics import psnr, ssim
from .niqe import niqe

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
Scorer = Callable[[np.ndarray, np.ndarray], float]


def hr_image(path: Path, short_side: int, crop: int, scale: int) -> torch.Tensor:
    """The HR reference: the photo resized to ``short_side`` (0: as is), its centre ``crop`` (0: all),
    trimmed to a multiple of ``scale``.

    Wallpaper-sized photos are mostly smooth at native resolution (bokeh, sky); resizing the whole
    photo keeps its whole scene and packs its detail into the scored pixels, without choosing a crop.
    """
    with Image.open(path) as im:
        img = im.convert("RGB")
    if short_side and min(img.size) != short_side:
        factor = short_side / min(img.size)
        img = img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.LANCZOS)
    rgb = np.asarray(img)
    h, w = rgb.shape[:2]
    ch, cw = (min(crop, h), min(crop, w)) if crop else (h, w)
    ch, cw = ch - ch % scale, cw - cw % scale
    top, left = (h - ch) // 2, (w - cw) // 2
    return torch.from_numpy(rgb[top : top + ch, left : left + cw].copy()).permute(2, 0, 1).float() / 255


def degrade_fixed(hr: torch.Tensor, scale: int, seed: int) -> torch.Tensor:
    from ..degradations import DegradationConfig, degrade

    return degrade(hr[None], scale, torch.Generator().manual_seed(seed), DegradationConfig())  # 8-bit levels


def to_array(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def student_sweep(
    student: CTSRStudent, lr: torch.Tensor, alphas: Sequence[float], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``[len(alphas), 3, H*s, W*s]`` through the serving pipeline (the whole image as one tile, no
    colour fix): the scores are those of what ``ctsr upscale --tile 0 --color-fix none`` writes."""
    upscaler = Upscaler(TileRunner(student, device, "fp32"), tile=0, max_batch=1)
    return upscaler.run([UpscaleJob(lr[0].cpu(), tuple(alphas), "none")])[0].clamp(0, 1)


def evaluate(
    photos: Sequence[Path],
    student: CTSRStudent,
    realness: Teacher,
    fidelity: Teacher,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    short_side: int = 512,
    crop: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    extra: dict[str, Scorer] | None = None,
    save_dir: Path | None = None,
) -> list[report.Row]:
    """Mean scores per (method, alpha) over ``photos``; see the module docstring."""
    device = torch.device(device)
    s = student.scale
    sums: dict[tuple[str, float | None], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for i, path in enumerate(photos):
        hr = hr_image(path, short_side, crop, s)
        lr = degrade_fixed(hr, s, seed + i).to(device)
        ref = to_array(hr)
        sweep, t_student = _timed(lambda lr=lr: student_sweep(student, lr, alphas, device), device)
        t_real, t_r = _timed(lambda lr=lr: realness(lr)[0], device)
        t_fid, t_f = _timed(lambda lr=lr: fidelity(lr)[0], device)
        lr_img = Image.fromarray(to_array(lr[0]))
        outputs: list[tuple[str, float | None, np.ndarray, float | None]] = [
            (report.BICUBIC, None, np.asarray(lr_img.resize((ref.shape[1], ref.shape[0]), Image.Resampling.BICUBIC)),
             None),
            (report.REALNESS_TEACHER, None, to_array(t_real), t_r),
            (report.FIDELITY_TEACHER, None, to_array(t_fid), t_f),
        ]  # fmt: skip
        for a, out in zip(alphas, sweep, strict=True):
            outputs.append((report.STUDENT, a, to_array(out), t_student / len(alphas)))
            outputs.append((report.BLEND, a, to_array((1 - a) * t_real + a * t_fid), None))
        for method, alpha, img, seconds in outputs:
            scores = sums[(method, alpha)]
            scores["psnr"] += psnr(img, ref, crop_border=s)
            scores["ssim"] += ssim(img, ref, crop_border=s)
            scores["niqe"] += niqe(img, crop_border=s)
            for name, fn in (extra or {}).items():
                scores[name] += fn(img, ref)
            if seconds is not None:
                scores["seconds"] += seconds
            if save_dir is not None:
                label = method if alpha is None else f"{method}_a{alpha:.2f}"
                Image.fromarray(img).save(save_dir / f"{path.stem}_{label}.png")
        if save_dir is not None:
            lr_img.save(save_dir / f"{path.stem}_lr.png")
    n = len(photos)
    return [
        report.Row(method, alpha, v["psnr"] / n, v["ssim"] / n, v["niqe"] / n,
                   v["lpips"] / n if "lpips" in v else None, v["seconds"] / n if "seconds" in v else None)
        for (method, alpha), v in sums.items()
    ]  # fmt: skip


def run_eval(args: argparse.Namespace, photos: list[Path]) -> int:
    """The ``ctsr eval`` command (arguments parsed by :mod:`ctsr.cli_training`)."""
    from ..checkpoint import load_student
    from ..device import resolve_device
    from ..presets import BUNDLED_FIDELITY_TEACHER, default_model
    from ..teachers.loading import load_teacher

    if not photos:
        raise ConfigError(f"{args.photos}: no photos to evaluate")
    device = resolve_device(args.device)
    student = load_student(args.model or default_model()).to(device).eval()
    realness = load_teacher(args.realness_teacher, device)
    fidelity = load_teacher(str(args.fidelity_teacher or BUNDLED_FIDELITY_TEACHER), device)
    extra: dict[str, Scorer] = {}
    if args.lpips_backbone or args.lpips_heads:
        from .lpips import load_lpips, lpips_distance

        if not (args.lpips_backbone and args.lpips_heads):
            raise ConfigError("LPIPS needs both --lpips-backbone and --lpips-heads")
        model = load_lpips(args.lpips_backbone, args.lpips_heads, device)
        extra["lpips"] = lambda img, ref: lpips_distance(model, img, ref)
    alphas = tuple(args.alpha or DEFAULT_ALPHAS)
    args.output.mkdir(parents=True, exist_ok=True)
    images = args.output / "images"
    images.mkdir(exist_ok=True)
    rows = evaluate(
        photos, student, realness, fidelity, alphas, args.short_side, args.crop, args.seed, device, extra, images
    )
    report.write_csv(rows, args.output / "results.csv")
    report.plot_tradeoff(rows, args.output / "tradeoff.png")
    checks = report.check_targets(rows)
    summary = {
        "photos": [p.name for p in photos], "short_side": args.short_side, "crop": args.crop, "seed": args.seed,
        "device": str(device), "threads": torch.get_num_threads(),
        "alphas": alphas, "rows": [r.__dict__ for r in rows],
        "targets": [c._asdict() for c in checks],
    }  # fmt: skip
    (args.output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report.markdown_table(rows))
    print()
    print(report.targets_markdown(checks))
    print(f"\nwrote results.csv, results.json, tradeoff.png and images/ to {args.output}")
    return 0
