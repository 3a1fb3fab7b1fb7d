"""The checkpoint's ``config.json``: what a student is, as data.

A checkpoint folder is self-describing: ``family`` picks the architecture from the registry,
``arch`` holds that family's hyper-parameters, ``format_version`` guards against reading a
layout this code does not understand, and ``provenance`` records where the weights came from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import CheckpointError, ConfigError

#: 2 added ``band_split``, 3 ``path_end`` (a checkpoint that sets one decodes differently, so older
#: readers refuse it).
FORMAT_VERSION = 3
CONFIG_NAME = "config.json"

C = TypeVar("C")


@dataclass
class StudentConfig:
    family: str
    scale: int
    arch: dict[str, Any]
    format_version: int = FORMAT_VERSION
    provenance: dict[str, Any] = field(default_factory=dict)
    #: Band-split decoding (``models.bandsplit``); None decodes ``z_alpha`` alone.
    band_split: dict[str, Any] | None = None
    #: Where alpha = 1 decodes on the trained path, ``z0 + path_end * v`` (None: 1). Set after
    #: training by ``ctsr model calibrate`` where the path's PSNR peaks before its end.
    path_end: float | None = None

    def __post_init__(self) -> None:
        end = self.path_end
        if end is not None and not (isinstance(end, int | float) and not isinstance(end, bool) and 0 < end <= 1):
            raise CheckpointError(f"path_end must be a number in (0, 1], got {end!r}")

    @property
    def layout_version(self) -> int:
        """The oldest format that describes this config, so older readers still load what they can."""
        return 3 if self.path_end is not None else 2 if self.band_split is not None else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.layout_version,
            "family": self.family,
            "scale": self.scale,
            "arch": self.arch,
            **({"band_split": self.band_split} if self.band_split is not None else {}),
            **({"path_end": self.path_end} if self.path_end is not None else {}),
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> StudentConfig:
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object")
        missing = [k for k in ("format_version", "family", "scale", "arch") if k not in data]
        if missing:
            raise CheckpointError(f"{source}: missing key(s) {', '.join(missing)}")
        version = data["format_version"]
        if not isinstance(version, int) or version < 1:
            raise CheckpointError(f"{source}: invalid format_version {version!r}")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: checkpoint format {version} is newer than this ctsr understands "
                f"({FORMAT_VERSION}); upgrade ctsr"
            )
        scale = data["scale"]
        if not isinstance(scale, int) or scale not in (2, 3, 4, 8):
            raise CheckpointError(f"{source}: unsupported scale {scale!r} (2, 3, 4 or 8)")
        if not isinstance(data["family"], str) or not isinstance(data["arch"], dict):
            raise CheckpointError(f"{source}: 'family' must be a string and 'arch' an object")
        try:
            return cls(
                family=data["family"],
                scale=scale,
                arch=dict(data["arch"]),
                format_version=version,
                provenance=dict(data.get("provenance") or {}),
                band_split=data.get("band_split"),
                path_end=data.get("path_end"),
            )
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None

    def save(self, folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, folder: Path) -> StudentConfig:
        path = folder / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"{folder}: not a CTSR checkpoint (no {CONFIG_NAME})")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable ({exc})") from None
        return cls.from_dict(data, source=str(path))


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file that must hold one object; anything else is a one-line ConfigError."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def parse_arch(config_cls: type[C], arch: dict[str, Any], family: str) -> C:
    """Build a family's typed hyper-parameter dataclass, rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    unknown = sorted(set(arch) - names)
    if unknown:
        raise ConfigError(f"{family}: unknown arch option(s) {', '.join(unknown)}")
    try:
        return config_cls(**arch)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{family}: invalid arch options ({exc})") from None
