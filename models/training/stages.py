"""What each training stage optimises: the model, its trainable parameters and its losses.

Every stage sees batches of ``lr``, ``hr`` and the cached teacher outputs ``t_fid`` / ``t_real``
(floats in [0, 1]) and returns named, already-weighted loss terms; the trainer sums them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..student import CTSRStudent
from .config import TrainConfig

Batch = dict[str, torch.Tensor]


def spectrum_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between FFT amplitude spectra (orthonormal, so the scale matches pixel L1)."""
    fa, fb = (torch.fft.rfft2(x.float(), norm="ortho").abs() for x in (a, b))
    return F.l1_loss(fa, fb)


class Stage(ABC):
    model: nn.Module

    def __init__(self) -> None:
        #: cached teacher outputs this stage needs: batch key → config attribute naming the teacher
        self.teachers: dict[str, str] = {}

    @abstractmethod
    def parameters(self) -> list[nn.Parameter]: ...

    @abstractmethod
    def losses(self, batch: Batch) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def save(self, folder: Path, provenance: dict[str, Any]) -> Path: ...

    @abstractmethod
    def load_weights(self, folder: Path) -> None:
        """Restore the model from a checkpoint folder this stage saved (for resuming)."""


class FidelityTeacherStage(Stage):
    """L1 to the HR photo: the PSNR-oriented teacher."""

    def __init__(self, config: TrainConfig) -> None:
        from ..teachers.fidelity import FidelityTeacher

        super().__init__()
        self.model = FidelityTeacher(config.teacher_options, {"trained_with": "L1", "init": config.init})
        if config.init == "realesrgan":
            from ..teachers.loading import realesrgan

            try:
                self.model.net.load_state_dict(realesrgan().net.state_dict())
            except RuntimeError:
                raise ConfigError("init 'realesrgan' needs teacher_options 64/23/32 (Real-ESRGAN's shape)") from None
        elif config.init is not None:
            raise ConfigError("fidelity_teacher: init must be 'realesrgan' or null")

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"l1": F.l1_loss(self.model(batch["lr"]).float(), batch["hr"])}

    def save(self, folder: Path, provenance: dict[str, Any]) -> Path:
        self.model.provenance.update(provenance)
        return self.model.save_pretrained(folder)

    def load_weights(self, folder: Path) -> None:
        from ..teachers.fidelity import FidelityTeacher

        self.model.net.load_state_dict(FidelityTeacher.from_pretrained(folder).net.state_dict())


class _StudentStage(Stage):
    def __init__(self, config: TrainConfig, student: CTSRStudent) -> None:
        super().__init__()
        self.config, self.model, self.w = config, student, config.loss
        self.student = student

    def save(self, folder: Path, provenance: dict[str, Any]) -> Path:
        return self.student.save_pretrained(folder, provenance)

    def load_weights(self, folder: Path) -> None:
        from ..checkpoint import load_student

        self.student.load_state_files(load_student(folder).state_files())

    def _latent_target(self, image: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad():
            return self.student.encode_target(image)


class DistillStage(_StudentStage):
    """Stage 1: the one-step student from both teachers and the photo."""

    def __init__(self, config: TrainConfig, student: CTSRStudent) -> None:
        super().__init__(config, student)
        if self.w.fidelity:
            self.teachers["t_fid"] = "fidelity_teacher"
        if self.w.realness or self.w.latent or self.w.realness_spectrum:
            self.teachers["t_real"] = "realness_teacher"

    def parameters(self) -> list[nn.Parameter]:
        return self.student.trainable_parameters("stage1")

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        z0 = self.student.encode(batch["lr"])
        sr = self.student.decode(z0).float()
        out = {}
        if self.w.reconstruction:
            out["reconstruction"] = self.w.reconstruction * F.l1_loss(sr, batch["hr"])
        if self.w.fidelity:
            out["fidelity"] = self.w.fidelity * F.l1_loss(sr, batch["t_fid"])
        if self.w.realness:
            out["realness"] = self.w.realness * F.l1_loss(sr, batch["t_real"])
        if self.w.realness_spectrum:
            out["realness_spectrum"] = self.w.realness_spectrum * spectrum_l1(sr, batch["t_real"])
        if self.w.latent:
            target = self._latent_target(batch["t_real"])
            if target is None:
                raise ConfigError(f"{self.student.family} has no image→latent encoder; set loss.latent to 0")
            out["latent"] = self.w.latent * F.mse_loss(z0.float(), target.float())
        return out


class VelocityStage(_StudentStage):
    """Stage 2: the velocity from the realness latent ``z0`` towards the fidelity teacher."""

    def __init__(self, config: TrainConfig, student: CTSRStudent) -> None:
        super().__init__(config, student)
        self.teachers = {"t_fid": "fidelity_teacher"}
        if config.train_decoder and (self.w.realness or self.w.realness_spectrum):
            self.teachers["t_real"] = "realness_teacher"

    def parameters(self) -> list[nn.Parameter]:
        return self.student.trainable_parameters("stage2", decoder=self.config.train_decoder)

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            z0 = self.student.encode(batch["lr"])
        v = self.student.velocity(z0)
        out = {}
        if self.w.fidelity or self.w.reconstruction:
            sr1 = self.student.decode(z0 + v).float()
            if self.w.fidelity:
                out["fidelity"] = self.w.fidelity * F.l1_loss(sr1, batch["t_fid"])
            if self.w.reconstruction:
                out["reconstruction"] = self.w.reconstruction * F.l1_loss(sr1, batch["hr"])
        if self.w.latent:
            z1 = self._latent_target(batch["t_fid"])
            if z1 is None:
                raise ConfigError(f"{self.student.family} has no image→latent encoder; set loss.latent to 0")
            out["latent"] = self.w.latent * F.mse_loss(v.float(), (z1 - z0).float())
        if self.config.train_decoder and (self.w.realness or self.w.realness_spectrum):
            sr0 = self.student.decode(z0).float()
            if self.w.realness:
                out["realness_anchor"] = self.w.realness * F.l1_loss(sr0, batch["t_real"])
            if self.w.realness_spectrum:
                out["realness_spectrum"] = self.w.realness_spectrum * spectrum_l1(sr0, batch["t_real"])
        if not out:
            raise ConfigError("stage2: every loss weight is 0")
        return out


def build_stage(config: TrainConfig) -> Stage:
    if config.stage == "fidelity_teacher":
        return FidelityTeacherStage(config)
    from ..checkpoint import build_student, load_student
    from ..presets import load_preset

    assert config.init is not None
    if config.stage == "stage1" and not Path(config.init).is_dir():
        student = build_student(load_preset(config.init))
    else:
        student = load_student(Path(config.init))
    return DistillStage(config, student) if config.stage == "stage1" else VelocityStage(config, student)
