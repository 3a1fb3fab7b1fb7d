"""``ctsr eval``: the fidelity/realness trade-off of students against their teachers, on HR photos.

Each photo is resized (and optionally centre-cropped), degraded at each level of
:mod:`.levels` under fixed seeds (so every run scores the same LR inputs), and super-resolved by:
each student at each alpha, both teachers, the two strongest ways to mix them at the same alphas
(their pixel blend, and network interpolation of their weights) and bicubic. Scores (PSNR/SSIM
on Y with a ``scale``-pixel border crop, NIQE, optional LPIPS) are averaged over photos and
seeds per level; the CSV, the trade-off plot and the target checks go to one folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..pipeline import TileRunner, UpscaleJob, Upscaler
from ..student import CTSRStudent
from ..teachers.base import Teacher
from ..teachers.loading import teacher_network
from . import report
from .levels import LEVELS
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
    """The training degradation (level ``realesrgan``) under a fixed seed."""
    return LEVELS["realesrgan"](hr, scale, seed)


def to_array(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _timed(
    fn: Callable[[torch.Tensor], torch.Tensor], lr: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(lr)
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


def interpolated_network(realness: Teacher, fidelity: Teacher, alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """ESRGAN's network interpolation: one RRDBNet with weights ``(1 − α)·W_real + α·W_fid``.

    Both teachers are RRDBNets of one shape (the fidelity teacher is fine-tuned from Real-ESRGAN),
    which is what makes their weights interpolable; this is the ``-dn`` control of Real-ESRGAN.
    """
    nets = [teacher_network(t) for t in (realness, fidelity)]
    state_f = nets[1].state_dict()
    mixed = {k: torch.lerp(v.float(), state_f[k].float(), alpha) for k, v in nets[0].state_dict().items()}
    net = copy.deepcopy(nets[0])
    net.load_state_dict(mixed)

    def run(lr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = net(lr.to(next(net.parameters()).dtype))
            return out.float().clamp(0, 1)

    return run


def student_method(name: str, several: bool) -> str:
    return f"{report.STUDENT}:{name}" if several else report.STUDENT


def evaluate(
    photos: Sequence[Path],
    students: dict[str, CTSRStudent],
    realness: Teacher,
    fidelity: Teacher,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    level: str = "realesrgan",
    seeds: Sequence[int] = (0,),
    short_side: int = 512,
    crop: int = 0,
    device: torch.device | str = "cpu",
    extra: dict[str, Scorer] | None = None,
    save_dir: Path | None = None,
    interpolation: bool = True,
) -> list[report.Row]:
    """Mean scores per (method, alpha) over ``photos`` × ``seeds`` at one degradation ``level``.

    Student methods are ``student`` (one model) or ``student:<name>`` (several, compared in one run
    on the same inputs). Photo ``i`` with seed ``k`` is degraded with seed ``k * 1000 + i``.
    """
    device = torch.device(device)
    degrade = LEVELS[level]
    s = next(iter(students.values())).scale
    interior = [a for a in alphas if 0 < a < 1]
    interpolated = {a: interpolated_network(realness, fidelity, a) for a in interior} if interpolation else {}
    sums: dict[tuple[str, float | None], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    count = 0
    for seed in seeds:
        for i, path in enumerate(photos):
            count += 1
            hr = hr_image(path, short_side, crop, s)
            lr = degrade(hr, s, seed * 1000 + i).to(device)
            ref = to_array(hr)
            t_real, t_r = _timed(lambda x: realness(x)[0], lr, device)
            t_fid, t_f = _timed(lambda x: fidelity(x)[0], lr, device)
            lr_img = Image.fromarray(to_array(lr[0]))
            bicubic = np.asarray(lr_img.resize((ref.shape[1], ref.shape[0]), Image.Resampling.BICUBIC))
            outputs: list[tuple[str, float | None, np.ndarray, float | None]] = [
                (report.BICUBIC, None, bicubic, None),
                (report.REALNESS_TEACHER, None, to_array(t_real), t_r),
                (report.FIDELITY_TEACHER, None, to_array(t_fid), t_f),
            ]
            for name, student in students.items():
                method = student_method(name, len(students) > 1)
                sweep, t_s = _timed(partial(student_sweep, student, alphas=alphas, device=device), lr, device)
                outputs += [(method, a, to_array(out), t_s / len(alphas)) for a, out in zip(alphas, sweep, strict=True)]
            for a in alphas:
                outputs.append((report.BLEND, a, to_array((1 - a) * t_real + a * t_fid), None))
                if interpolation:
                    net_out = t_real if a == 0 else t_fid if a == 1 else interpolated[a](lr)[0]
                    outputs.append((report.INTERPOLATION, a, to_array(net_out), None))
            for method, alpha, img, seconds in outputs:
                scores = sums[(method, alpha)]
                scores["psnr"] += psnr(img, ref, crop_border=s)
                scores["ssim"] += ssim(img, ref, crop_border=s)
                scores["niqe"] += niqe(img, crop_border=s)
                for metric, fn in (extra or {}).items():
                    scores[metric] += fn(img, ref)
                if seconds is not None:
                    scores["seconds"] += seconds
                if save_dir is not None and seed == seeds[0]:
                    label = method.replace(":", "-") if alpha is None else f"{method.replace(':', '-')}_a{alpha:.2f}"
                    Image.fromarray(img).save(save_dir / f"{path.stem}_{level}_{label}.png")
            if save_dir is not None and seed == seeds[0]:
                lr_img.save(save_dir / f"{path.stem}_{level}_lr.png")
    return [
        report.Row(method, alpha, v["psnr"] / count, v["ssim"] / count, v["niqe"] / count,
                   v["lpips"] / count if "lpips" in v else None, v["seconds"] / count if "seconds" in v else None,
                   level)
        for (method, alpha), v in sums.items()
    ]  # fmt: skip


def run_eval(args: argparse.Namespace, photos: list[Path]) -> int:
    """The ``ctsr eval`` command (arguments parsed by :mod:`ctsr.cli_training`)."""
    from ..checkpoint import load_student
    from ..device import resolve_device
    from ..presets import BUNDLED_FIDELITY_TEACHER, resolve_model
    from ..teachers.loading import load_teacher

    if not photos:
        raise ConfigError(f"{args.photos}: no photos to evaluate")
    unknown = sorted(set(args.level or []) - set(LEVELS))
    if unknown:
        raise ConfigError(f"unknown degradation level(s) {', '.join(unknown)} (known: {', '.join(LEVELS)})")
    device = resolve_device(args.device)
    folders = [resolve_model(m) for m in args.model or [None]]
    names = [Path(f).resolve().name for f in folders]
    if len(set(names)) != len(names):
        raise ConfigError(f"--model folders need distinct names to label them (got {', '.join(names)})")
    students = {n: load_student(f).to(device).eval() for n, f in zip(names, folders, strict=True)}
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
    levels = list(dict.fromkeys(args.level or LEVELS))
    seeds = tuple(range(args.seed, args.seed + args.seeds))
    args.output.mkdir(parents=True, exist_ok=True)
    images = args.output / "images"
    images.mkdir(exist_ok=True)
    rows: list[report.Row] = []
    for level in levels:
        rows += evaluate(photos, students, realness, fidelity, alphas, level, seeds, args.short_side, args.crop,
                         device, extra, images)  # fmt: skip
    report.write_csv(rows, args.output / "results.csv")
    report.plot_tradeoff(rows, args.output / "tradeoff.png")
    checks = {level: report.check_targets([r for r in rows if r.level == level]) for level in levels}
    summary = {
        "photos": [p.name for p in photos], "models": dict(zip(names, map(str, folders), strict=True)),
        "levels": levels, "seeds": list(seeds), "short_side": args.short_side, "crop": args.crop,
        "device": str(device), "threads": torch.get_num_threads(), "alphas": alphas,
        "rows": [r.__dict__ for r in rows],
        "targets": {level: [c._asdict() for c in found] for level, found in checks.items()},
    }  # fmt: skip
    (args.output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    for level in levels:
        print(f"## {level}\n")
        print(report.markdown_table([r for r in rows if r.level == level]))
        print(report.targets_markdown(checks[level]))
    print(f"wrote results.csv, results.json, tradeoff.png and images/ to {args.output}")
    return 0
