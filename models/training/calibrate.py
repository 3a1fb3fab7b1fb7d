"""Where alpha = 1 should sit on a trained path: the position where PSNR to the photos peaks.

Stage 2 trains ``z0 + alpha * v`` towards the fidelity teacher at alpha = 1, but nothing makes
PSNR rise all the way there: on the compact release, with a critic pulling the path towards
realness, PSNR peaks near 0.8 of the way and falls after it while NIQE keeps rising, so the last
stretch of the knob is worse on both axes. Calibration decodes training pairs along the path,
finds each pairs folder's PSNR peak and sets the checkpoint's ``path_end`` to the earliest one, so
that PSNR rises up to alpha = 1 on every degradation range the student was trained on; alpha then
maps linearly onto ``[0, path_end]``. It uses training pairs only: the held-out photos stay
unseen for ``ctsr eval``. A path that peaks at its end is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..evaluation.metrics import psnr
from ..student import CTSRStudent
from .pairs import PairSet


@dataclass
class Calibration:
    positions: list[float]
    #: mean PSNR (Y, dB) to the HR crops at each position, per pairs folder (by folder name)
    psnr: dict[str, list[float]]
    #: each folder's peak position
    peaks: dict[str, float]
    pairs_used: int

    @property
    def path_end(self) -> float:
        """The earliest peak (1 where every folder peaks at the end: the checkpoint stays as it is)."""
        return min(self.peaks.values())

    def provenance(self, pair_sets: Sequence[PairSet]) -> dict[str, Any]:
        return {
            "path_end": self.path_end,
            "pairs": "+".join(p.fingerprint for p in pair_sets),
            "pairs_used": self.pairs_used,
            "peaks": self.peaks,
            "psnr": {name: [round(v, 4) for v in values] for name, values in self.psnr.items()},
            "positions": self.positions,
            "rule": "earliest PSNR peak along z0 + t * v over the pairs folders (Y, 4-px border)",
        }


def path_positions(step: float) -> list[float]:
    """``step, 2 * step, ..., 1``: the positions scanned (1 always included)."""
    if not (0 < step <= 0.5):
        raise ConfigError(f"calibration step must be in (0, 0.5], got {step}")
    count = round(1 / step)
    if abs(count * step - 1) > 1e-9:
        raise ConfigError(f"calibration step must divide 1 evenly, got {step}")
    return [round(i * step, 6) for i in range(1, count + 1)]


@torch.no_grad()
def scan_path(
    student: CTSRStudent, pairs: PairSet, positions: Sequence[float], count: int, batch: int = 32
) -> list[float]:
    """Mean PSNR to the HR crops of ``count`` pairs (spread over the folder) at each path position."""
    n = min(count, len(pairs))
    index = torch.linspace(0, len(pairs) - 1, n).round().long().unique()
    totals = [0.0] * len(positions)
    device = next(student.parameters()).device
    for start in range(0, len(index), batch):
        idx = index[start : start + batch]
        lr = pairs.lr[idx].to(device).float().div_(255)
        out = student.sweep(lr, positions).clamp_(0, 1).cpu()  # [positions, B, 3, H, W]
        for j, i in enumerate(idx.tolist()):
            hr = pairs.hr[i].float().div_(255)
            for k in range(len(positions)):
                totals[k] += psnr(out[k, j], hr, crop_border=student.scale)
    return [t / len(index) for t in totals]


def calibrate(student: CTSRStudent, pair_sets: Sequence[PairSet], step: float = 0.05, count: int = 400) -> Calibration:
    """Scan the student's raw path on each pairs folder (an earlier ``path_end`` is ignored, and
    left as it was: the caller decides what to write)."""
    if not pair_sets:
        raise ConfigError("calibration needs at least one pairs folder")
    names = [p.folder.name for p in pair_sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"pairs folders need distinct names, got {', '.join(names)}")
    for p in pair_sets:
        if p.spec.scale != student.scale:
            raise ConfigError(f"{p.folder}: pairs are x{p.spec.scale}, the student is x{student.scale}")
    positions = path_positions(step)
    earlier, student.config.path_end = student.config.path_end, None
    try:
        table = {p.folder.name: scan_path(student, p, positions, count) for p in pair_sets}
    finally:
        student.config.path_end = earlier
    peaks = {name: positions[max(range(len(values)), key=values.__getitem__)] for name, values in table.items()}
    used = sum(min(count, len(p)) for p in pair_sets)
    return Calibration(positions, table, peaks, used)
