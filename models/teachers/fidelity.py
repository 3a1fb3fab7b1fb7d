"""The fidelity teacher: an RRDBNet trained here with L1 on the same degradations (PSNR-oriented).

Stored like a student checkpoint: ``config.json`` (``kind: teacher``, the network's options and
provenance) + ``model.safetensors``, or shards ``model-0000i-of-0000N.safetensors``. Training
starts from Real-ESRGAN's weights by default: the GAN model already knows how to undo these
degradations, and an L1 fine-tune turns it into a PSNR-oriented model much faster than training
from scratch (Real-ESRGAN went the other way: RealESRNet with L1 first, then the GAN).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .rrdbnet import RRDBNet

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
#: Weights are split into files of at most this many bytes (the fp16 RRDBNet is 33 MB; git hosts
#: and the repository's own rule dislike single files over 25 MB).
MAX_SHARD_BYTES = 20 * 2**20


def weight_files(folder: Path) -> list[Path]:
    """``model.safetensors``, or its shards ``model-00001-of-0000N.safetensors`` in order."""
    single = folder / WEIGHTS_NAME
    return [single] if single.is_file() else sorted(folder.glob("model-*-of-*.safetensors"))


class FidelityTeacher(nn.Module):
    scale: int

    def __init__(self, options: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.options = {"num_feat": 64, "num_block": 23, "num_grow_ch": 32, "scale": 4, **(options or {})}
        self.provenance = dict(provenance or {})
        self.net = RRDBNet(**self.options)
        self.scale = self.options["scale"]
        self.name = "fidelity"

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """Unclamped output, for training."""
        out: torch.Tensor = self.net(lr)
        return out

    def sr(self, lr: torch.Tensor) -> torch.Tensor:
        """Teacher use: no gradients, clamped to [0, 1]."""
        with torch.no_grad():
            param = next(self.parameters())
            out: torch.Tensor = self.net(lr.to(param.dtype))
            return out.float().clamp(0, 1)

    def save_pretrained(self, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
        """Written like a student checkpoint (:func:`models.checkpoint.write_folder_atomically`)."""
        from ..checkpoint import save_tensors, write_folder_atomically
        from ..config import FORMAT_VERSION

        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.net.state_dict().items()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += nbytes
        config = {"format_version": FORMAT_VERSION, "kind": "teacher", "name": "fidelity-rrdbnet",
                  "options": self.options, "provenance": self.provenance}  # fmt: skip

        def fill(staging: Path) -> None:
            names = [WEIGHTS_NAME] if len(shards) == 1 else [
                f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
            ]  # fmt: skip
            for name, shard in zip(names, shards, strict=True):
                save_tensors(shard, staging / name)
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

        return write_folder_atomically(folder, fill)

    @classmethod
    def from_pretrained(cls, folder: Path) -> FidelityTeacher:
        from safetensors.torch import load_file

        try:
            config = json.loads((folder / CONFIG_NAME).read_text())
            files = weight_files(folder)
            if not files:
                raise FileNotFoundError(f"no {WEIGHTS_NAME} or model-*-of-*.safetensors")
            state = {k: v for f in files for k, v in load_file(str(f)).items()}
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: not a fidelity teacher checkpoint ({exc})") from None
        if config.get("kind") != "teacher":
            raise CheckpointError(f"{folder}: config.json is not a teacher's")
        from ..config import FORMAT_VERSION

        if int(config.get("format_version", 1)) > FORMAT_VERSION:
            raise CheckpointError(f"{folder}: format {config['format_version']} is newer than this ctsr reads")
        teacher = cls(config.get("options"), config.get("provenance"))
        try:
            teacher.net.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError as exc:
            raise CheckpointError(f"{folder}: weights do not fit the configured network ({exc})") from None
        teacher.name = f"fidelity-{weights_digest(folder)}"
        return teacher.eval()


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: not a fidelity teacher checkpoint (no weights)")
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


class FidelityTeacherAdapter:
    """The :class:`~models.teachers.Teacher` face of a :class:`FidelityTeacher`."""

    def __init__(self, model: FidelityTeacher) -> None:
        self.model, self.name, self.scale = model, model.name, model.scale

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        return self.model.sr(lr)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FidelityTeacherAdapter:
        self.model.to(device=device, dtype=dtype)
        return self
