"""Named starting configurations (JSON files in ``models/configs/``) for ``ctsr model init``.

``sd21-base`` has the real SD-2.1-base shapes (the arch defaults); ``sd21-tiny`` is the same
classes at reduced width for tests; ``compact-x4`` is the CPU-sized family.
"""

from __future__ import annotations

from pathlib import Path

from .config import StudentConfig, read_json_object
from .errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = {"compact": "compact-x4", "sd21": "sd21-base"}
WEIGHTS_DIR = Path(__file__).parent / "weights"
#: The bundled default model: the rrdb student on Real-ESRGAN's prior (model card beside it).
BUNDLED_MODEL = WEIGHTS_DIR / "ctsr-rrdb-x4"
#: The bundled fast model: the compact family, ~10× faster on a CPU, weaker.
BUNDLED_COMPACT = WEIGHTS_DIR / "ctsr-compact-x4"
#: Short names for the bundled students (``--model compact``, ``CTSR_MODEL=compact``).
BUNDLED_NAMES = {"rrdb": BUNDLED_MODEL, "compact": BUNDLED_COMPACT}
#: The fidelity teacher the bundled model was distilled from (used by ``ctsr eval``).
BUNDLED_FIDELITY_TEACHER = Path(__file__).parent / "weights" / "fidelity-rrdbnet-x4"


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> StudentConfig:
    """A preset by name, or any JSON file with ``family``, ``scale`` and ``arch``."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r} (known: {', '.join(preset_names())})")
    data = read_json_object(path, "config")
    data.setdefault("format_version", 1)
    return StudentConfig.from_dict(data, source=str(path))


def resolve_model(spec: str | Path | None) -> Path:
    """A checkpoint folder from ``--model`` / ``CTSR_MODEL``: a bundled name (``rrdb``, ``compact``,
    or a folder name under ``models/weights``), a path, or None for the bundled default."""
    if spec is None or str(spec) == "":
        return default_model()
    text = str(spec)
    if text in BUNDLED_NAMES:
        return BUNDLED_NAMES[text]
    path = Path(spec)
    if not path.exists() and "/" not in text and (WEIGHTS_DIR / text / "config.json").is_file():
        return WEIGHTS_DIR / text
    return path


def default_model() -> Path:
    """The bundled checkpoint, or a clear error where an installation lacks it."""
    if not (BUNDLED_MODEL / "config.json").is_file():
        raise ConfigError(f"the bundled model is missing from this installation ({BUNDLED_MODEL}); pass --model PATH")
    return BUNDLED_MODEL
