"""A training run as data: one JSON file per stage (see ``models/configs/training/``).

Relative paths in a config resolve against the current directory; ``ctsr train`` can override
``pairs``, ``output``, ``steps`` and ``device`` on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bandsplit import BandSplit
from ..config import read_json_object
from ..errors import ConfigError

STAGES = ("fidelity_teacher", "stage1", "stage2")


@dataclass
class LossWeights:
    """Stage 1: ``reconstruction·L1(SR, HR) + fidelity·L1(SR, T_f) + realness·L1(SR, T_r) + latent·MSE(z0, E(T_r))``
    (+ ``realness_spectrum``, below).

    Stage 2 (velocity) supervises the whole alpha path: every sample draws its own alpha (see
    ``TrainConfig.alpha_ends``) and is decoded once, ``SR_a = D(z0 + a·v)``. The fidelity terms
    ``fidelity·L1(SR_a, T_f) + reconstruction·L1(SR_a, HR)`` weigh ``a``; the realness terms that
    are not pixel-aligned (spectrum, adversarial, feature matching) weigh ``1 − a``; the pixel term
    ``realness·L1(SR_a, T_r)`` applies only at ``a = 0`` (it holds that end when the decoder trains
    too). No term asks for the teachers' pixel blend: a student trained towards it can at best tie
    it. ``latent·MSE(v, E(T_f)−z0)`` is the flow-matching term where the family has an image→latent
    encoder ``E`` (sd21).
    """

    reconstruction: float = 0.0
    fidelity: float = 0.0
    realness: float = 0.0
    latent: float = 0.0
    #: L1 between the FFT amplitude spectra of the SR and the realness teacher's output. Pixel L1 to a
    #: textured target rewards a blurred average; matching the spectrum asks for texture energy
    #: wherever it sits (stage 1, and stage 2's alpha=0 anchor).
    realness_spectrum: float = 0.0
    #: Non-saturating GAN loss against a U-Net critic trained alongside (``discriminator.py``).
    adversarial: float = 0.0
    #: L1 between the critic's features of the SR and of the realness teacher's output: a learned
    #: perceptual loss (VGG weights cannot be downloaded here).
    feature_matching: float = 0.0

    def uses_critic(self) -> bool:
        return bool(self.adversarial or self.feature_matching)


@dataclass
class TrainConfig:
    stage: str
    #: A pairs folder, or several (e.g. two degradation models) whose pairs train together.
    pairs: str | list[str]
    output: str
    #: stage1: a preset name or a checkpoint folder; stage2: the stage-1 checkpoint;
    #: fidelity_teacher: "realesrgan" (start from its weights) or null (random init).
    init: str | None = None
    #: stage1/stage2 with a preset as ``init``: a checkpoint whose tensors are copied into the new
    #: student wherever name and shape match (an architecture change keeps what its unchanged
    #: parts learned; the rest starts from the preset's initialisation).
    init_weights: str | None = None
    #: A checkpoint folder of an earlier run (``<output>/checkpoint-NNNNNN``) whose critic this
    #: run's starts from: a continuation then keeps the realness signal its source was trained
    #: with instead of a critic from scratch (shapes must match: same discriminator_features).
    init_critic: str | None = None
    realness_teacher: str = "realesrgan"
    fidelity_teacher: str | None = None  # a fidelity-teacher checkpoint folder
    teacher_options: dict[str, Any] = field(default_factory=dict)  # fidelity_teacher: RRDBNet options
    loss: LossWeights = field(default_factory=LossWeights)
    train_decoder: bool = False  # stage2: adapt the decoder too (compact)
    #: stage2: adapt the encoder as well (compact), so the alpha = 1 path gets the whole network's
    #: depth; z0 then changes during training and is not cached.
    train_encoder: bool = False
    #: Student parts (attribute names, e.g. "velocity_net", "delta") kept frozen that the stage would
    #: otherwise train: with compact's ``path_bend``, freezing the velocity and ``delta`` trains only
    #: the middle of the path between two ends that stay as they are.
    freeze: list[str] = field(default_factory=list)
    #: stage2: "fidelity_teacher" starts the velocity from the fidelity teacher's own blocks
    #: (rrdb with arch.velocity "branch"); null: from the model's own initialisation.
    velocity_init: str | None = None
    #: stage2: probabilities that a sample's alpha is exactly 0 and exactly 1; the rest is uniform
    #: in (0, 1). [0.5, 0.5] trains only the two ends. A list of such pairs, one per pairs folder,
    #: sets them per folder (e.g. more weight on alpha = 1 for a milder degradation's pairs).
    alpha_ends: tuple[float, float] | list[tuple[float, float]] = (0.0, 0.25)
    #: stage2: band-split decoding for the saved student (``models.bandsplit``: sigma, lead). The
    #: losses still see plain decoding of ``z_alpha``; this only sets how the result is served.
    band_split: dict[str, float] | None = None
    discriminator_features: int = 64  # width of the U-Net critic (adversarial / feature_matching)
    lr_discriminator: float | None = None  # default: lr
    steps: int = 1000
    #: Optional wall-clock budget: the schedule then follows max(step/steps, elapsed/max_seconds)
    #: and training ends when either runs out (how a lent GPU's fixed time is used fully).
    max_seconds: float | None = None
    batch_size: int = 16
    crop: int | None = 48  # LR crop edge taken from each pair (None: the whole pair)
    lr: float = 2e-4
    lr_min: float = 1e-6
    warmup: int = 100
    grad_clip: float = 1.0
    #: Checkpoints and ``final/`` hold an exponential moving average of the trained weights with
    #: this decay (``ema.py``; e.g. 0.999); null saves the live weights.
    ema_decay: float | None = None
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU), bf16, off
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    teacher_batch: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.loss, dict):
            try:
                self.loss = LossWeights(**self.loss)
            except TypeError as exc:
                raise ConfigError(f"invalid loss weights: {exc}") from None
        if not self.pair_folders():
            raise ConfigError("pairs: name at least one pairs folder")
        if self.stage not in STAGES:
            raise ConfigError(f"unknown stage {self.stage!r} (one of {', '.join(STAGES)})")
        if self.stage != "fidelity_teacher" and not self.init:
            raise ConfigError(f"{self.stage} needs 'init' (a preset or checkpoint to start from)")
        if self.stage == "stage2" and not self.fidelity_teacher:
            raise ConfigError("stage2 needs 'fidelity_teacher' (the velocity points at its outputs)")
        if self.init_weights and self.stage == "fidelity_teacher":
            raise ConfigError("init_weights is for student stages (stage1, stage2)")
        if self.train_encoder and self.stage != "stage2":
            raise ConfigError("train_encoder is a stage2 option (stage 1 trains the encoder anyway)")
        if self.velocity_init not in (None, "fidelity_teacher"):
            raise ConfigError(f"velocity_init must be 'fidelity_teacher' or null, not {self.velocity_init!r}")
        if self.stage == "stage1" and self.loss.fidelity and not self.fidelity_teacher:
            raise ConfigError("loss.fidelity > 0 needs 'fidelity_teacher'")
        BandSplit.from_config(self.band_split)  # a bad setting fails here, not after training
        self.alpha_ends = self._checked_alpha_ends()
        if not isinstance(self.freeze, list) or not all(isinstance(n, str) for n in self.freeze):
            raise ConfigError(f"freeze must be a list of part names, not {self.freeze!r}")
        if self.freeze and self.stage not in ("stage1", "stage2"):
            raise ConfigError("freeze is for student stages (stage1, stage2)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be between 0 and 1 (exclusive) or null, not {self.ema_decay!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise ConfigError(f"amp must be auto, bf16 or off, not {self.amp!r}")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "teacher_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")

    @classmethod
    def load(cls, path: Path, **overrides: Any) -> TrainConfig:
        data = read_json_object(path, "training config")
        data.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"comment"})
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)}")
        data.pop("comment", None)
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def _checked_alpha_ends(self) -> tuple[float, float] | list[tuple[float, float]]:
        raw: Any = self.alpha_ends  # lists when read from JSON
        if not isinstance(raw, (list, tuple)):
            raise ConfigError(f"alpha_ends must be [p0, p1] or one such pair per pairs folder, got {raw!r}")
        per_folder = len(raw) > 0 and all(isinstance(e, (list, tuple)) for e in raw)
        if per_folder and len(raw) != len(self.pair_folders()):
            raise ConfigError(
                f"alpha_ends: {len(raw)} pairs of probabilities for {len(self.pair_folders())} pairs folders"
            )
        checked: list[tuple[float, float]] = []
        for ends in raw if per_folder else [raw]:
            if not all(isinstance(e, (int, float)) for e in ends) or len(ends) != 2 or min(ends) < 0 or sum(ends) > 1:
                raise ConfigError(
                    "alpha_ends must be two probabilities summing to at most 1 "
                    f"(or one such pair per pairs folder), got {list(raw)}"
                )
            checked.append((float(ends[0]), float(ends[1])))
        return checked if per_folder else checked[0]

    def alpha_ends_per_folder(self) -> list[tuple[float, float]]:
        """``alpha_ends`` for each pairs folder, in ``pairs`` order."""
        ends = self.alpha_ends
        return list(ends) if isinstance(ends, list) else [ends] * len(self.pair_folders())

    def pair_folders(self) -> list[Path]:
        return [Path(p) for p in ([self.pairs] if isinstance(self.pairs, str) else self.pairs)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
