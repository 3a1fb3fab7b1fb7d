"""CTSR models: student architectures, checkpoints and the tiled inference pipeline.

Pure torch + Pillow: nothing here imports a web framework or a queue.
"""

from .checkpoint import build_student, load_student, save_student
from .config import FORMAT_VERSION, StudentConfig
from .errors import CheckpointError, ConfigError, CTSRError, ImageError
from .registry import ARCH_REGISTRY
from .student import CTSRStudent

__all__ = [
    "ARCH_REGISTRY",
    "FORMAT_VERSION",
    "CTSRError",
    "CTSRStudent",
    "CheckpointError",
    "ConfigError",
    "ImageError",
    "StudentConfig",
    "build_student",
    "load_student",
    "save_student",
]
