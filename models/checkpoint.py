"""Checkpoint folders: ``config.json`` + ``*.safetensors``, like a diffusers model folder.

Every way a checkpoint can be wrong (missing, not JSON, unknown family, newer format, missing or
corrupt weight file, tensors that do not fit the architecture) surfaces as one
:class:`~models.errors.CheckpointError` that names the folder and the problem.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import FORMAT_VERSION, StudentConfig
from .errors import CheckpointError, ConfigError
from .registry import ARCH_REGISTRY
from .student import CTSRStudent


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Digest of named tensors (names, shapes, fp32 values), whatever file or dtype holds them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the platform or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_folder_atomically(folder: str | Path, fill: Callable[[Path], None]) -> Path:
    """The one checkpoint writer (students and teachers): ``fill(staging)`` writes every file into
    a fresh folder beside ``folder``, which then replaces it in one atomic exchange, so at every
    instant ``folder`` holds the whole old checkpoint or the whole new one, never a mix or nothing.
    (Without ``renameat2``: the old folder is renamed aside first and removed last.)"""
    folder = Path(folder).resolve()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        fill(staging)
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        if not folder.exists():
            staging.rename(folder)
        elif _exchange(staging, folder):
            shutil.rmtree(staging)  # now the old checkpoint
        else:
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            staging.rename(folder)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, on the CPU, stamped with the checkpoint format version."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path), metadata={"ctsr_format_version": str(FORMAT_VERSION)})


def build_student(config: StudentConfig, **options: Any) -> CTSRStudent:
    """A freshly initialised student for ``config`` (the starting point for training and tests)."""
    cls = ARCH_REGISTRY.get(config.family)
    return cls.build(config, None, **options)


def save_student(student: CTSRStudent, folder: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``student`` to ``folder`` atomically (a crash leaves the old checkpoint intact)."""
    folder = Path(folder)
    config = StudentConfig.from_dict(student.config.to_dict())
    config.provenance = {
        **config.provenance,
        **(provenance or {}),
        "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__.split("+")[0],
    }

    def fill(staging: Path) -> None:
        for name, tensors in student.state_files().items():
            save_tensors(tensors, staging / name)
        config.save(staging)

    folder = write_folder_atomically(folder, fill)
    student.config = config
    return folder


def load_student(folder: str | Path, **options: Any) -> CTSRStudent:
    """Load a checkpoint folder. ``options`` go to the family's ``build`` (e.g. ``base_model``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    config = StudentConfig.load(folder)
    try:
        cls = ARCH_REGISTRY.get(config.family)
        student = cls.build(config, folder, **options)
    except ConfigError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    files: dict[str, dict[str, torch.Tensor]] = {}
    for name in student.state_files():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: weight file {name} is missing")
        try:
            files[name] = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
    try:
        student.load_state_files(files)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{folder}: weights do not match config.json ({first})") from None
    return student.eval()
