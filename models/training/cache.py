"""Teacher outputs, computed once per pairs folder and teacher, stored next to the pairs.

A cache file records the pairs' fingerprint and the teacher's name (which includes a weights
hash for trained teachers), so new pairs or a retrained teacher never reuse stale outputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from ..teachers.base import Teacher
from .pairs import PairSet


def cache_path(pairs: PairSet, teacher_name: str) -> Path:
    return pairs.folder / f"teacher-{re.sub(r'[^A-Za-z0-9._-]', '_', teacher_name)}.safetensors"


def teacher_outputs(
    pairs: PairSet,
    teacher_name: str,
    load: Callable[[], Teacher],
    device: torch.device,
    batch: int = 16,
    progress: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` outputs of the teacher on every LR of ``pairs`` (cached on disk)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = cache_path(pairs, teacher_name)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("pairs") == pairs.fingerprint and meta.get("teacher") == teacher_name:
                cached: torch.Tensor = f.get_tensor("sr")
                return cached
    teacher = load()
    out = torch.empty_like(pairs.hr)
    for start in range(0, len(pairs), batch):
        lr = pairs.lr[start : start + batch].to(device).float() / 255
        out[start : start + batch] = (teacher(lr) * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        if progress is not None:
            progress(lr.shape[0])
    tmp = path.with_suffix(".tmp")
    save_file({"sr": out}, str(tmp), metadata={"pairs": pairs.fingerprint, "teacher": teacher_name})
    tmp.replace(path)
    return out


def cached_inputs(
    pairs: PairSet,
    key: str,
    compute: Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    previous: dict[str, torch.Tensor],
    device: torch.device,
    batch: int = 16,
    progress: Callable[[int], object] | None = None,
) -> dict[str, torch.Tensor]:
    """fp16 outputs of a frozen model part on every LR of ``pairs`` (cached on disk under ``key``).

    What a training stage does not train (a frozen trunk, a stage-1 encoder during stage 2) gives
    the same answer every step: computing it once per pair turns the slow part of a step into a
    lookup. ``key`` must change whenever those frozen weights do (callers pass a weights digest).
    ``compute(lr, prev)`` also gets the same pairs' slice of ``previous`` (an earlier cache level).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = pairs.folder / f"inputs-{re.sub(r'[^A-Za-z0-9._-]', '_', key)}.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("pairs") == pairs.fingerprint:
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    chunks: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            lr = pairs.lr[start : start + batch].to(device).float() / 255
            prev = {k: v[start : start + batch].to(device).float() for k, v in previous.items()}
            for name, value in compute(lr, prev).items():
                chunks.setdefault(name, []).append(value.to("cpu", torch.float16))
            if progress is not None:
                progress(lr.shape[0])
    out = {name: torch.cat(parts) for name, parts in chunks.items()}
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp), metadata={"pairs": pairs.fingerprint, "key": key})
    tmp.replace(path)
    return out
