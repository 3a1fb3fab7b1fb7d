"""``ctsr data``, ``ctsr train`` and ``ctsr eval``: making, training and judging models.

Kept apart from :mod:`ctsr.cli` (serving and inference) so that file stays about using models.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parsers(sub: Any, positive: Any, alpha: Any) -> None:
    data = sub.add_parser("data", help="fetch training photos and make LR/HR training pairs")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = dsub.add_parser("fetch", help="download training photos (Debian packages) + their manifest")
    fetch.add_argument("dest", type=Path, metavar="DIR")
    fetch.add_argument(  # the sets are models.training.photos.PHOTO_SETS, which checks the name
        "--set",
        dest="photo_set",
        default="bundled",
        help="bundled: the bundled models' 27 photos (23 train, 4 held out); more: 13 further training photos",
    )
    fetch.set_defaults(handler=cmd_data_fetch)
    pairs = dsub.add_parser("pairs", help="crop + degrade photos into fixed, seeded training pairs")
    pairs.add_argument("photos", type=Path, metavar="PHOTOS", help="a folder of photos (or a fetched one)")
    pairs.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    pairs.add_argument("--split", default="train", help="with a manifest: which split (train, holdout, all)")
    pairs.add_argument("--count", type=positive, default=2000)
    pairs.add_argument("--hr-size", type=positive, default=256, help="HR crop edge (LR = HR / 4)")
    pairs.add_argument("--seed", type=int, default=0)
    pairs.add_argument("--workers", type=positive, help="processes degrading pairs (default: one per core)")
    pairs.add_argument(
        "--degradation",
        type=Path,
        metavar="JSON",
        help="degradation-model overrides (default: Real-ESRGAN x4plus), e.g. models/configs/degradations/light.json",
    )
    pairs.set_defaults(handler=cmd_data_pairs)

    train = sub.add_parser("train", help="run one training stage from a JSON config")
    train.add_argument("config", type=Path, metavar="CONFIG")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output")
    train.add_argument("--pairs", help="override the config's pairs folder")
    train.add_argument("--output", help="override the config's output folder")
    train.add_argument("--init", help="override the config's starting point")
    train.add_argument("--fidelity-teacher", help="override the config's fidelity teacher folder")
    train.add_argument("--steps", type=positive, help="override the number of steps")
    train.add_argument("--max-seconds", type=positive, help="override the wall-clock budget (seconds)")
    train.add_argument("--device", help="override the device (auto, cpu, cuda)")
    train.set_defaults(handler=cmd_train)

    ev = sub.add_parser("eval", help="PSNR/SSIM/NIQE of students' alphas vs teachers, their mixes and bicubic")
    ev.add_argument("photos", type=Path, metavar="PHOTOS", help="HR photos: files or folders (manifest: holdout)")
    ev.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="CSV, plot and images go here")
    ev.add_argument(
        "--model",
        type=Path,
        action="append",
        help="student checkpoint (default: the bundled model); repeat to compare several in one run",
    )
    ev.add_argument("--fidelity-teacher", type=Path, help="fidelity teacher folder (default: the bundled one)")
    ev.add_argument("--realness-teacher", default="realesrgan")
    ev.add_argument("--alpha", type=alpha, action="append", metavar="A", help="default 0, .25, .5, .75, 1")
    ev.add_argument("--short-side", type=int, default=512, help="resize each photo to this short side (0: keep)")
    ev.add_argument("--crop", type=int, default=0, help="then take this centre crop (0: the whole photo)")
    ev.add_argument("--seed", type=int, default=0, help="first degradation seed")
    ev.add_argument("--seeds", type=positive, default=2, help="degradation seeds per photo and level")
    ev.add_argument(
        "--level",
        action="append",
        metavar="LEVEL",
        help="degradation level: realesrgan, mild, bicubic (repeat; default: all three)",
    )
    ev.add_argument("--device", default="auto")
    ev.add_argument("--lpips-backbone", type=Path, help="VGG16 weights (torchvision format) to add LPIPS")
    ev.add_argument("--lpips-heads", type=Path, help="LPIPS linear-head weights (lpips package format)")
    ev.set_defaults(handler=cmd_eval)


def add_calibrate_parser(msub: Any, positive: Any) -> None:
    cal = msub.add_parser(
        "calibrate",
        help="set where alpha = 1 sits on a trained path: its PSNR peak on training pairs",
        description="Decode training pairs along the student's path z0 + t * v, find where PSNR to the photos "
        "peaks in each pairs folder and write a copy whose alpha = 1 decodes the earliest peak "
        "(models/training/calibrate.py). Use training pairs, never evaluation photos.",
    )
    cal.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    cal.add_argument("--pairs", type=Path, action="append", required=True, help="a pairs folder (repeat)")
    cal.add_argument("-o", "--output", type=Path, required=True, metavar="OUT")
    cal.add_argument("--step", type=float, default=0.05, help="path positions step, .., 1 (default 0.05)")
    cal.add_argument("--count", type=positive, default=400, help="pairs per folder (spread over it)")
    cal.add_argument("--overwrite", action="store_true")
    cal.set_defaults(handler=cmd_model_calibrate)


def cmd_model_calibrate(args: argparse.Namespace) -> int:
    from models import load_student, save_student
    from models.errors import ConfigError
    from models.training.calibrate import calibrate, path_positions
    from models.training.pairs import PairSet

    out = args.output
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite")
    path_positions(args.step)  # a bad step fails before any loading
    pair_sets = [PairSet.load(folder) for folder in args.pairs]
    student = load_student(args.checkpoint)
    before = student.config.path_end
    result = calibrate(student, pair_sets, args.step, args.count)
    names = list(result.psnr)
    print("position  " + "  ".join(f"{n:>14}" for n in names))
    for k, t in enumerate(result.positions):
        cells = [f"{result.psnr[n][k]:13.3f}{'*' if result.peaks[n] == t else ' '}" for n in names]
        print(f"{t:8.3f}  " + "  ".join(cells))
    cut = result.path_end < 1
    student.config.path_end = result.path_end if cut else None
    save_student(student, out, {"path_end_calibration": result.provenance(pair_sets)})
    if cut:
        where = f"alpha = 1 now decodes path position {result.path_end:g}"
    else:
        where = "alpha = 1 decodes the path's end" + (f" (was {before:g})" if before is not None else " (unchanged)")
    print(f"* peak per folder; {where}; wrote {out}")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from models.training.photos import fetch_photos

    photos = fetch_photos(args.dest, args.photo_set)
    held = sum(p.split == "holdout" for p in photos)
    print(f"fetched {len(photos)} photos ({held} held out for evaluation) to {args.dest}; see manifest.json")
    return 0


def cmd_data_pairs(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.config import read_json_object
    from models.training.pairs import PairSpec, make_pairs
    from models.training.photos import photo_files

    files = photo_files([args.photos], args.split)
    overrides = read_json_object(args.degradation, "degradation options") if args.degradation else {}
    overrides.pop("comment", None)
    spec = PairSpec(count=args.count, hr_size=args.hr_size, seed=args.seed, degradation=overrides)
    spec.degradation_config()  # refuse bad overrides before any work
    with tqdm(total=spec.count, desc="pairs", unit="pair", disable=None) as bar:
        make_pairs(files, spec, args.output, args.workers, progress=bar.update)
    print(f"wrote {spec.count} pairs from {len(files)} photos to {args.output}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from models.training.config import TrainConfig
    from models.training.trainer import Trainer

    config = TrainConfig.load(
        args.config, pairs=args.pairs, output=args.output, init=args.init,
        fidelity_teacher=args.fidelity_teacher, steps=args.steps, device=args.device,
        max_seconds=args.max_seconds,
    )  # fmt: skip
    trainer = Trainer(config)
    final = trainer.train(resume=args.resume)
    ended = "" if trainer.step >= config.steps else f" of {config.steps} (max_seconds reached)"
    print(f"trained {config.stage} for {trainer.step} steps{ended} in {trainer.elapsed / 60:.1f} min; model in {final}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from models.evaluation.protocol import run_eval
    from models.training.photos import photo_files

    return run_eval(args, photo_files([args.photos], "holdout"))
