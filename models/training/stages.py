"""What each training stage optimises: the model, its trainable parameters and its losses.

Every stage sees batches of ``lr``, ``hr`` and the cached teacher outputs ``t_fid`` / ``t_real``
(floats in [0, 1]) and returns named, already-weighted loss terms; the trainer sums them.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import tensors_sha256
from ..errors import ConfigError
from ..student import CTSRStudent
from .config import TrainConfig
from .discriminator import UNetDiscriminatorSN, discriminator_loss, feature_matching, generator_adversarial

if TYPE_CHECKING:
    from ..teachers.fidelity import FidelityTeacher

Batch = dict[str, torch.Tensor]
CacheLevel = tuple[str, Callable[[torch.Tensor, Batch], Batch]]


def spectrum_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between FFT amplitude spectra (orthonormal, so the scale matches pixel L1)."""
    fa, fb = (torch.fft.rfft2(x.float(), norm="ortho").abs() for x in (a, b))
    return F.l1_loss(fa, fb)


class Stage(ABC):
    model: nn.Module

    def __init__(self) -> None:
        #: cached teacher outputs this stage needs: batch key → config attribute naming the teacher
        self.teachers: dict[str, str] = {}

    #: The adversarial critic trained beside the model, where the stage's losses use one.
    critic: nn.Module | None = None
    #: The critic's Adam state carried over by ``init_critic``, for the trainer's critic optimiser.
    critic_optimizer_state: dict[str, Any] | None = None

    @abstractmethod
    def parameters(self) -> list[nn.Parameter]: ...

    def input_cache(self) -> list[CacheLevel]:
        """What is frozen during this stage, computed once per pair: ``[(key, fn), ...]``, each
        ``fn(lr, previous)`` getting the previous level's outputs. The trainer caches every level
        under its key and passes the last level's crops as ``batch["in_<name>"]``."""
        return []

    def critic_loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    @abstractmethod
    def losses(self, batch: Batch) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def save(self, folder: Path, provenance: dict[str, Any]) -> Path: ...

    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """What the starting point records about how it was made."""

    @abstractmethod
    def load_weights(self, folder: Path) -> None:
        """Restore the model from a checkpoint folder this stage saved (for resuming)."""


class FidelityTeacherStage(Stage):
    """L1 to the HR photo: the PSNR-oriented teacher."""

    model: FidelityTeacher

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

    def provenance(self) -> dict[str, Any]:
        return self.model.provenance

    def load_weights(self, folder: Path) -> None:
        from ..teachers.fidelity import FidelityTeacher

        self.model.net.load_state_dict(FidelityTeacher.from_pretrained(folder).net.state_dict())


class _StudentStage(Stage):
    """What both student stages share: checkpoints, the cached frozen inputs and the critic."""

    stage_name: str

    def __init__(self, config: TrainConfig, student: CTSRStudent) -> None:
        super().__init__()
        self.config, self.model, self.w = config, student, config.loss
        self.student = student
        self.critic: UNetDiscriminatorSN | None = None
        if self.w.uses_critic():
            self.critic = UNetDiscriminatorSN(features=config.discriminator_features)
            self.teachers["t_real"] = "realness_teacher"  # feature matching's target
            if config.init_critic:
                self._load_critic(Path(config.init_critic))
        elif config.init_critic:
            raise ConfigError("init_critic: this run's losses use no critic (adversarial, feature_matching)")
        self.fake: torch.Tensor | None = None  # the last generated batch, for the critic's step

    def _load_critic(self, folder: Path) -> None:
        from .trainer import STATE_NAME

        assert self.critic is not None
        path = folder / STATE_NAME
        if not path.is_file():
            raise ConfigError(f"init_critic {folder}: no {STATE_NAME} (name a run's checkpoint-NNNNNN folder)")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("critic") is None:
            raise ConfigError(f"init_critic {folder}: that run trained no critic")
        # Its optimiser state too, so the critic goes on as it was training instead of taking a fresh
        # Adam's first steps (about the learning rate on every weight, whatever its gradient).
        self.critic_optimizer_state = saved.get("critic_optimizer")
        try:
            self.critic.load_state_dict(saved["critic"])
        except RuntimeError:
            raise ConfigError(
                f"init_critic {folder}: its critic has another shape (discriminator_features differs)"
            ) from None

    def parameters(self) -> list[nn.Parameter]:
        c = self.config
        frozen = set()
        for name in c.freeze:
            try:
                frozen |= {id(p) for p in self.student.get_submodule(name).parameters()}
            except AttributeError:
                raise ConfigError(f"freeze: {self.student.family} has no part {name!r}") from None
        trained = self.student.trainable_parameters(self.stage_name, decoder=c.train_decoder, encoder=c.train_encoder)
        return [p for p in trained if id(p) not in frozen]

    def save(self, folder: Path, provenance: dict[str, Any]) -> Path:
        return self.student.save_pretrained(folder, provenance)

    def provenance(self) -> dict[str, Any]:
        return self.student.config.provenance

    def load_weights(self, folder: Path) -> None:
        from ..checkpoint import load_student

        self.student.load_state_files(load_student(folder).state_files())

    def _latent_target(self, image: torch.Tensor) -> torch.Tensor | None:
        with torch.no_grad():
            return self.student.encode_target(image)

    def _digest(self, stages: tuple[str, ...]) -> str:
        """Digest of every student weight that the given stages do not train, and of the
        architecture (the same weights may make a latent of another layout)."""
        trained = {id(p) for st in stages for p in self.student.trainable_parameters(st, decoder=True)}
        frozen = {n: t for n, t in self.student.state_dict(keep_vars=True).items() if id(t) not in trained}
        arch = json.dumps(self.student.config.arch, sort_keys=True).encode()
        return hashlib.sha256(tensors_sha256(frozen).encode() + arch).hexdigest()[:16]

    def _has_encoder_cache(self) -> bool:
        return type(self.student).encoder_cache is not CTSRStudent.encoder_cache

    def _encoder_prefix(self) -> list[CacheLevel]:
        """The frozen first part of the encoder (families with an encoder cache): shared by both stages."""
        if not self._has_encoder_cache():
            return []
        key = f"{self.student.family}-prefix-{self._digest(('stage1', 'stage2'))}"

        def prefix(lr: torch.Tensor, _: Batch) -> Batch:
            cached = self.student.encoder_cache(lr)
            assert cached is not None  # _has_encoder_cache: the family overrides encoder_cache
            return cached

        return [(key, prefix)]

    # -- realness terms shared by both stages -------------------------------------------------
    def _critic_terms(self, sr: torch.Tensor, batch: Batch, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Adversarial and feature-matching terms, each sample weighted by ``weight`` ([B])."""
        if self.critic is None:
            return {}
        self.fake = sr.detach()
        self.critic.requires_grad_(False)
        logits, features = self.critic(sr)
        out = {}
        if self.w.adversarial:
            out["adversarial"] = self.w.adversarial * (weight * generator_adversarial(logits)).mean()
        if self.w.feature_matching:
            with torch.no_grad():
                _, target = self.critic(batch["t_real"])
            out["feature_matching"] = self.w.feature_matching * (weight * feature_matching(features, target)).mean()
        return out

    def critic_loss(self, batch: Batch) -> torch.Tensor:
        """The critic's step: the HR photos are real, the batch the student just made is fake."""
        assert self.critic is not None and self.fake is not None
        self.critic.requires_grad_(True)
        return discriminator_loss(self.critic(batch["hr"])[0], self.critic(self.fake)[0])


class DistillStage(_StudentStage):
    """Stage 1: the one-step student from both teachers and the photo."""

    stage_name = "stage1"

    def __init__(self, config: TrainConfig, student: CTSRStudent) -> None:
        super().__init__(config, student)
        if self.w.fidelity:
            self.teachers["t_fid"] = "fidelity_teacher"
        if self.w.realness or self.w.latent or self.w.realness_spectrum:
            self.teachers["t_real"] = "realness_teacher"
        self.cached = self._has_encoder_cache()

    def input_cache(self) -> list[CacheLevel]:
        return self._encoder_prefix()

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.cached:
            z0 = self.student.encode_cached({k[3:]: v for k, v in batch.items() if k.startswith("in_")})
        else:
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
        out.update(self._critic_terms(sr, batch, torch.ones(sr.shape[0], device=sr.device)))
        return out


class VelocityStage(_StudentStage):
    """Stage 2: the velocity from the realness latent ``z0`` towards the fidelity teacher, along
    the whole alpha path (see :class:`~.config.LossWeights`)."""

    stage_name = "stage2"

    def __init__(self, config: TrainConfig, student: CTSRStudent) -> None:
        super().__init__(config, student)
        self.teachers["t_fid"] = "fidelity_teacher"
        if self.w.realness or self.w.realness_spectrum:
            self.teachers["t_real"] = "realness_teacher"
        self.gen = torch.Generator().manual_seed(config.seed)  # the alpha sampler; saved with checkpoints
        self.alpha_ends = torch.tensor(config.alpha_ends_per_folder())  # [folder, (p0, p1)]
        if config.band_split is not None:
            student.set_band_split(config.band_split)
        if config.velocity_init == "fidelity_teacher":  # a resumed run then loads its own weights over it
            from ..teachers.loading import load_teacher, teacher_network

            assert config.fidelity_teacher is not None
            student.warm_start_velocity(teacher_network(load_teacher(config.fidelity_teacher)))

    def input_cache(self) -> list[CacheLevel]:
        if not self.student.cacheable_latent or self.config.train_encoder:
            return []
        key = f"{self.student.family}-z0-{self._digest(('stage2',))}"
        prefix = self._encoder_prefix()
        if prefix:  # z0 from the cached prefix: only the adapted blocks run
            return [*prefix, (key, lambda _, cached: {"z0": self.student.encode_cached(cached)})]
        return [(key, lambda lr, _: {"z0": self.student.encode(lr)})]

    def sample_alphas(self, n: int, pair_set: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample alphas: exactly 0 or 1 with the configured probabilities (those of each
        sample's pairs folder, ``pair_set``), else uniform in (0, 1)."""
        ends = self.alpha_ends
        p0, p1 = ends[pair_set.cpu()].unbind(1) if pair_set is not None else ends[0]
        u, pick = torch.rand(n, generator=self.gen), torch.rand(n, generator=self.gen)
        return torch.where(pick < p0, 0.0, torch.where(pick < p0 + p1, 1.0, u))

    def losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if "in_z0" in batch:
            z0 = batch["in_z0"]
        else:
            with torch.set_grad_enabled(self.config.train_encoder):
                z0 = self.student.encode(batch["lr"])
        alpha = self.sample_alphas(z0.shape[0], batch.get("pair_set")).to(z0.device)
        v = self.student.velocity(z0)
        sr = self.student.decode(self.student.mix(z0, v, alpha)).float()
        out = {}

        def weighted(per_sample: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return (weight * per_sample).mean()

        def l1(target: torch.Tensor) -> torch.Tensor:
            return (sr - target).abs().flatten(1).mean(1)

        if self.w.fidelity:
            out["fidelity"] = self.w.fidelity * weighted(l1(batch["t_fid"]), alpha)
        if self.w.reconstruction:
            out["reconstruction"] = self.w.reconstruction * weighted(l1(batch["hr"]), alpha)
        if self.w.latent:
            z1 = self._latent_target(batch["t_fid"])
            if z1 is None:
                raise ConfigError(f"{self.student.family} has no image→latent encoder; set loss.latent to 0")
            out["latent"] = self.w.latent * F.mse_loss(v.float(), (z1 - z0).float())
        if self.w.realness:
            out["realness_anchor"] = self.w.realness * weighted(l1(batch["t_real"]), (alpha == 0).float())
        if self.w.realness_spectrum:
            spectra = [spectrum_l1(sr[i : i + 1], batch["t_real"][i : i + 1]) for i in range(sr.shape[0])]
            out["realness_spectrum"] = self.w.realness_spectrum * weighted(torch.stack(spectra), 1 - alpha)
        out.update(self._critic_terms(sr, batch, 1 - alpha))
        if not out:
            raise ConfigError("stage2: every loss weight is 0")
        return out


def copy_matching_weights(student: CTSRStudent, source: CTSRStudent, name: str) -> None:
    """Copy ``source``'s tensors into ``student`` wherever name and shape match (``init_weights``)."""
    theirs = source.state_dict()
    ours = student.state_dict()
    matched = {k: v for k, v in theirs.items() if k in ours and ours[k].shape == v.shape}
    if not matched:
        raise ConfigError(f"init_weights {name}: no tensor matches the new student by name and shape")
    student.load_state_dict(matched, strict=False)
    # the copied parts keep their history: this run's record then follows the source's stages
    student.config.provenance = {**source.config.provenance, **student.config.provenance}
    student.config.provenance["init_weights"] = {
        "from": name,
        "tensors": f"{len(matched)} of {len(ours)} copied",
        "sha256": tensors_sha256(matched)[:16],
    }


def build_stage(config: TrainConfig) -> Stage:
    if config.stage == "fidelity_teacher":
        return FidelityTeacherStage(config)
    from ..checkpoint import build_student, load_student
    from ..presets import load_preset

    assert config.init is not None
    if config.init_weights or (config.stage == "stage1" and not Path(config.init).is_dir()):
        student = build_student(load_preset(config.init))
    else:
        student = load_student(Path(config.init))
        if student.config.path_end is not None:  # training moves the path; calibrate again afterwards
            student.config.provenance["path_end_before_training"] = student.config.path_end
            student.config.path_end = None
    if config.init_weights:
        copy_matching_weights(student, load_student(Path(config.init_weights)), config.init_weights)
    return DistillStage(config, student) if config.stage == "stage1" else VelocityStage(config, student)
