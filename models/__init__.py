"""CTSR models: student architectures, checkpoints and the tiled inference pipeline.

Pure torch + Pillow: nothing here imports a web framework or a queue. The names below load on
first use, so ``models.errors`` (used by the torch-free gateway and CLI) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_student": "checkpoint",
    "load_student": "checkpoint",
    "save_student": "checkpoint",
    "FORMAT_VERSION": "config",
    "StudentConfig": "config",
    "CTSRError": "errors",
    "CheckpointError": "errors",
    "ConfigError": "errors",
    "ImageError": "errors",
    "ARCH_REGISTRY": "registry",
    "CTSRStudent": "student",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
