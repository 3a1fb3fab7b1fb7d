"""Fixed LR/HR training pairs: random photo crops through the Real-ESRGAN degradation model.

Pairs are made once, seeded, and stored as uint8 safetensors beside a JSON spec. Fixing them is
what lets teacher outputs be cached (:mod:`.cache`): every stage of training sees the same LR
inputs the teachers were run on. Layout of a pairs folder::

    pairs.json                  spec + the photos' names and sha256
    pairs.safetensors           hr [N,3,H,W] uint8, lr [N,3,H/s,W/s] uint8
    teacher-<name>.safetensors  cached teacher outputs (see cache.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..degradations import DegradationConfig, degrade
from ..errors import ConfigError

SPEC_NAME, TENSORS_NAME = "pairs.json", "pairs.safetensors"


@dataclass
class PairSpec:
    count: int = 2000
    hr_size: int = 256
    scale: int = 4
    seed: int = 0
    #: Crops come from these downscaled copies of each photo: wallpapers at native size are mostly
    #: smooth (bokeh, sky), and SR inputs in use are dense; these scales match the evaluation.
    photo_scales: tuple[float, ...] = (0.5, 0.35, 0.25)
    degradation: dict[str, Any] = field(default_factory=dict)  # DegradationConfig overrides

    def __post_init__(self) -> None:
        if self.count < 1 or self.hr_size < 8 or self.hr_size % self.scale:
            raise ConfigError(f"invalid pair spec: count {self.count}, hr_size {self.hr_size}, scale {self.scale}")
        self.photo_scales = tuple(self.photo_scales)

    def degradation_config(self) -> DegradationConfig:
        try:
            return DegradationConfig.from_dict(self.degradation)
        except TypeError as exc:
            raise ConfigError(f"invalid degradation options: {exc}") from None


def _load_photo(path: Path, scales: tuple[float, ...], min_side: int) -> list[torch.Tensor]:
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    copies = []
    for s in scales:
        size = (round(rgb.width * s), round(rgb.height * s))
        if min(size) < min_side:
            continue
        scaled = rgb if s == 1.0 else rgb.resize(size, Image.Resampling.LANCZOS)
        copies.append(torch.from_numpy(np.array(scaled)).permute(2, 0, 1).contiguous())
    if not copies:
        raise ConfigError(f"{path}: smaller than one {min_side}px crop")
    return copies


def _crops(photos: list[list[torch.Tensor]], spec: PairSpec, gen: torch.Generator) -> torch.Tensor:
    """``spec.count`` random crops, photos used in turn, with random flips and 90° turns."""
    size = spec.hr_size
    out = torch.empty((spec.count, 3, size, size), dtype=torch.uint8)
    order = torch.randperm(spec.count, generator=gen) % len(photos)
    for i, p in enumerate(order.tolist()):
        copies = photos[p]
        img = copies[int(torch.randint(len(copies), (1,), generator=gen))]
        top = int(torch.randint(img.shape[1] - size + 1, (1,), generator=gen))
        left = int(torch.randint(img.shape[2] - size + 1, (1,), generator=gen))
        crop = img[:, top : top + size, left : left + size]
        if torch.rand((), generator=gen) < 0.5:
            crop = crop.flip(-1)
        out[i] = crop.rot90(int(torch.randint(4, (1,), generator=gen)), dims=(1, 2))
    return out


#: Pairs are degraded in chunks of this many, chunk ``i`` with its own generator seeded from
#: ``(seed, i)``: the result does not depend on how many processes share the work.
CHUNK = 64


def _degrade_chunk(hr: torch.Tensor, scale: int, seed: int, index: int, config: DegradationConfig) -> torch.Tensor:
    torch.set_num_threads(1)  # one process per core does the parallelism
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    lr = degrade(hr.float() / 255, scale, gen, config)
    return (lr * 255).round().clamp(0, 255).to(torch.uint8)


def make_pairs(
    photos: list[Path], spec: PairSpec, folder: Path, workers: int | None = None, progress: Any = None
) -> Path:
    """Crop, degrade and store ``spec.count`` pairs in ``folder``; returns the folder.

    Degradation runs on the CPU (per-sample kernels and JPEG round trips), in ``workers``
    processes (default: one per core).
    """
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    from safetensors.torch import save_file

    if not photos:
        raise ConfigError("no training photos given")
    gen = torch.Generator().manual_seed(spec.seed)
    loaded = [_load_photo(p, spec.photo_scales, spec.hr_size) for p in photos]
    hr = _crops(loaded, spec, gen)
    del loaded
    config = spec.degradation_config()
    chunks = [hr[i : i + CHUNK] for i in range(0, spec.count, CHUNK)]
    args = [(c, spec.scale, spec.seed, i, config) for i, c in enumerate(chunks)]
    workers = min(len(chunks), workers or os.cpu_count() or 1)
    results: list[torch.Tensor] = []
    if workers == 1:
        for a in args:
            results.append(_degrade_chunk(*a))
            if progress is not None:
                progress(a[0].shape[0])
    else:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for a, lr in zip(args, pool.map(_degrade_chunk, *zip(*args, strict=True)), strict=True):
                results.append(lr)
                if progress is not None:
                    progress(a[0].shape[0])
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"hr": hr, "lr": torch.cat(results)}, str(folder / TENSORS_NAME))
    meta = {"spec": dataclasses.asdict(spec), "photos": [{"file": p.name, "sha256": _sha(p)} for p in photos]}
    (folder / SPEC_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class PairSet:
    """A pairs folder in memory (uint8 tensors; batches are converted on the training device)."""

    folder: Path
    hr: torch.Tensor
    lr: torch.Tensor
    spec: PairSpec
    fingerprint: str
    photos: frozenset[str]  # the sha256 of each photo the crops came from

    @classmethod
    def load(cls, folder: Path) -> PairSet:
        from safetensors.torch import load_file

        spec_path, tensors_path = folder / SPEC_NAME, folder / TENSORS_NAME
        if not spec_path.is_file() or not tensors_path.is_file():
            raise ConfigError(f"{folder}: not a pairs folder (run `ctsr data pairs`)")
        meta_text = spec_path.read_text()
        meta = json.loads(meta_text)
        tensors = load_file(str(tensors_path))
        fingerprint = hashlib.sha256(meta_text.encode()).hexdigest()[:16]
        photos = frozenset(p["sha256"] for p in meta["photos"])
        return cls(folder, tensors["hr"], tensors["lr"], PairSpec(**meta["spec"]), fingerprint, photos)

    def __len__(self) -> int:
        return self.hr.shape[0]
