"""The bundled model's recipe, end to end: pairs → fidelity teacher → stage 1 → stage 2.

``python -m models.training.recipe --photos DIR --work DIR`` runs the configs in
``models/configs/training/compact-*.json`` with the paths wired together. ``--seconds`` gives
the stages a wall-clock budget, shared out by :data:`SHARES`, instead of their step counts (how
the bundled model was trained on a lent GPU). ``--stages`` runs a subset, ``--fidelity-teacher``
reuses a trained one and ``--stage1-init`` starts stage 1 from a checkpoint. The same steps one
at a time are ``ctsr data pairs`` and ``ctsr train``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..errors import CTSRError
from .config import TrainConfig
from .pairs import PairSpec, make_pairs
from .photos import photo_files
from .trainer import FINAL_NAME, train

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "training"
STAGES = ("fidelity-teacher", "stage1", "stage2")
#: Each stage's share of ``--seconds`` (the fidelity teacher is the largest network).
SHARES = {"fidelity-teacher": 0.4, "stage1": 0.4, "stage2": 0.2}


def run(
    photos: list[Path],
    work: Path,
    count: int = 2000,
    seconds: float | None = None,
    steps_scale: float = 1.0,
    device: str = "auto",
    stages: tuple[str, ...] = STAGES,
    fidelity_teacher: Path | None = None,
    stage1_init: Path | None = None,
) -> dict[str, Any]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if not (work / "pairs" / "pairs.safetensors").is_file():
        make_pairs(photos, PairSpec(count=count), work / "pairs")
    timings["pairs"] = time.perf_counter() - start
    teacher = fidelity_teacher or work / "fidelity-teacher" / FINAL_NAME
    share = sum(SHARES[s] for s in stages)
    results = {}
    for name in stages:
        base = TrainConfig.load(CONFIGS / f"compact-{name}.json")
        overrides: dict[str, Any] = {
            "device": device,
            "steps": max(1, round(base.steps * steps_scale)),
            "pairs": str(work / "pairs"),
            "output": str(work / name),
            "max_seconds": seconds * SHARES[name] / share if seconds else None,
        }
        if name != "fidelity-teacher":
            overrides["fidelity_teacher"] = str(teacher)
        if name == "stage1" and stage1_init:
            overrides["init"] = str(stage1_init)
        if name == "stage2":
            overrides["init"] = str(work / "stage1" / FINAL_NAME)
        t0 = time.perf_counter()
        results[name] = str(train(TrainConfig.load(CONFIGS / f"compact-{name}.json", **overrides)))
        timings[name] = time.perf_counter() - t0
    summary = {"outputs": results, "seconds": {k: round(v, 1) for k, v in timings.items()}}
    with (work / "recipe.json").open("a") as log:
        log.write(json.dumps(summary) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True, help="training photos (fetched folder: train split)")
    parser.add_argument("--work", type=Path, required=True, help="pairs, runs and logs go here")
    parser.add_argument("--count", type=int, default=2000, help="training pairs")
    parser.add_argument("--seconds", type=float, help="wall-clock budget for the stages together")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    parser.add_argument("--fidelity-teacher", type=Path, help="use this trained fidelity teacher")
    parser.add_argument("--stage1-init", type=Path, help="start stage 1 from this checkpoint")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if not set(stages) <= set(STAGES):
        parser.error(f"--stages: choose from {', '.join(STAGES)}")
    try:
        summary = run(
            photo_files([args.photos], "train"), args.work, args.count, args.seconds, args.steps_scale,
            args.device, stages, args.fidelity_teacher, args.stage1_init,
        )  # fmt: skip
    except CTSRError as exc:
        print(f"recipe: error: {exc}")
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
