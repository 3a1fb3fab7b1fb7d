"""The one student interface every consumer uses (CLI, worker, training, evaluation).

A CTSR student maps a low-resolution image to a latent ``z0`` in one step (the stage-1 student),
predicts a velocity ``v(z0)`` towards the fidelity teacher's latent (stage 2), and decodes
``z_alpha = z0 + alpha * v`` to the super-resolved image. alpha=0 is the realness end, alpha=1
the fidelity end (where the config sets ``path_end``, alpha = 1 decodes ``z0 + path_end * v``:
the trained path cut where its PSNR peaks, see ``models.training.calibrate``). The expensive
parts (encode, velocity) do not depend on alpha, so a sweep over several alphas pays for them
once and only decodes per alpha.

Images are float tensors ``[B, 3, H, W]`` in [0, 1]; outputs are ``[B, 3, H*scale, W*scale]``,
not clamped (callers clamp once, after blending tiles).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .bandsplit import BandSplit
from .config import StudentConfig
from .errors import ConfigError


class CTSRStudent(nn.Module, ABC):
    family: ClassVar[str]
    #: LR inputs must have sides that are a multiple of this; the pipeline pads to it (sd21 sets it
    #: per instance, from its base's configuration).
    size_multiple: int = 1

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        self.band_split = BandSplit.from_config(config.band_split)

    # -- the three stages ---------------------------------------------------------------------
    @abstractmethod
    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        """LR image → stage-1 student latent ``z0`` (the one-step part)."""

    @abstractmethod
    def velocity(self, z0: torch.Tensor) -> torch.Tensor:
        """``z0`` → velocity ``v`` pointing from the realness end towards the fidelity end."""

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent → SR image."""

    # -- composition --------------------------------------------------------------------------
    @staticmethod
    def mix(z0: torch.Tensor, v: torch.Tensor | None, alpha: torch.Tensor) -> torch.Tensor:
        """``z0 + alpha * v`` with one alpha per sample."""
        if v is None:
            return z0
        return z0 + alpha.to(z0.dtype).view(-1, *([1] * (z0.dim() - 1))) * v

    def forward(self, lr: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
        """Batched SR with a per-sample alpha (one batch may mix alphas)."""
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=lr.device).expand(lr.shape[0])
        return torch.cat(self.generate(lr, [[float(a)] for a in alpha.tolist()]))

    def sweep(self, lr: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
        """SR at several alphas for every sample: ``[len(alphas), B, 3, H*s, W*s]``.

        ``z0`` and ``v`` are computed once; only the decoder runs per alpha (and, with band-split
        decoding, once more per alpha whose low band sits at a path position not in the sweep).
        """
        outputs = self.generate(lr, [alphas] * lr.shape[0])
        return torch.stack(outputs, dim=1)

    def generate(
        self,
        lr: torch.Tensor,
        alphas: Sequence[Sequence[float]],
        decode_batch: int | None = None,
    ) -> list[torch.Tensor]:
        """The general form: sample ``i`` is decoded at each of ``alphas[i]``.

        Returns one ``[len(alphas[i]), 3, H*s, W*s]`` tensor per sample. Decoding runs in chunks
        of ``decode_batch`` latents (default: the input batch size) so a sweep does not multiply
        peak memory by the number of alphas.
        """
        if len(alphas) != lr.shape[0]:
            raise ValueError(f"{lr.shape[0]} inputs but {len(alphas)} alpha lists")
        z0 = self.encode(lr)
        need_v = any(a != 0 for sample in alphas for a in sample)
        v = self.velocity(z0) if need_v else None
        # Every (sample, path position) to decode once: each alpha, and its low band's position.
        wanted = [(i, float(a), self._low_position(float(a), v)) for i, sample in enumerate(alphas) for a in sample]
        latents = list(dict.fromkeys(key for i, a, low in wanted for key in ((i, a), (i, low))))
        chunk = decode_batch or lr.shape[0]
        images: dict[tuple[int, float], torch.Tensor] = {}
        for start in range(0, len(latents), chunk):
            keys = latents[start : start + chunk]
            idx = torch.tensor([i for i, _ in keys], device=lr.device)
            a = torch.tensor([p * self.path_end for _, p in keys], device=lr.device)
            images.update(zip(keys, self.decode(self.mix(z0[idx], None if v is None else v[idx], a)), strict=True))
        outputs = [
            images[(i, a)] if low == a else self._compose(images[(i, low)], images[(i, a)]) for i, a, low in wanted
        ]
        out = torch.stack(outputs) if outputs else lr.new_zeros((0, 3, 1, 1))
        return list(out.split([len(sample) for sample in alphas]))

    def set_band_split(self, settings: dict[str, Any] | None) -> None:
        """Switch band-split decoding (``models.bandsplit``) on, or off with None; saved with the config."""
        self.band_split = BandSplit.from_config(settings)
        self.config.band_split = None if self.band_split is None else self.band_split.to_config()

    @property
    def path_end(self) -> float:
        """Where alpha = 1 decodes on the trained path (1 unless calibrated); :meth:`generate` maps
        alpha to ``alpha * path_end``. Training decodes path positions directly."""
        return self.config.path_end or 1.0

    def _low_position(self, alpha: float, v: torch.Tensor | None) -> float:
        return alpha if self.band_split is None or v is None else self.band_split.low_position(alpha)

    def _compose(self, low: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
        assert self.band_split is not None
        return self.band_split.compose(low[None], detail[None])[0]

    # -- training hooks (used by models.training) ------------------------------------------------
    #: ``z0`` has the LR image's height and width, so stage 2 (whose encoder is frozen) can compute it
    #: once per training pair and crop it like the LR image.
    cacheable_latent: ClassVar[bool] = False

    def encoder_cache(self, lr: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The frozen first part of :meth:`encode`, at LR resolution, which stage 1 may compute once
        per training pair; None where stage 1 trains the whole encoder."""
        return None

    def encode_cached(self, cached: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`encode` resumed from (crops of) :meth:`encoder_cache`'s outputs."""
        raise NotImplementedError(f"{self.family} has no encoder cache")

    def encode_target(self, image: torch.Tensor) -> torch.Tensor | None:
        """SR-sized image → the latent the decoder would need to draw it, where the family can say.

        sd21's VAE encoder gives it, which lets stage 1 match latents and stage 2 regress the
        velocity onto ``z1 - z0`` directly. Families without an image→latent map return None and
        are trained through their decoder instead.
        """
        return None

    def warm_start_velocity(self, teacher: nn.Module) -> None:
        """Start stage 2's velocity from the fidelity teacher's network (``velocity_init``), where
        the family's velocity has the teacher's architecture; others refuse."""
        raise ConfigError(f"{self.family} cannot start its velocity from a teacher; unset velocity_init")

    @abstractmethod
    def trainable_parameters(self, stage: str, decoder: bool = False, encoder: bool = False) -> list[nn.Parameter]:
        """What a training stage updates: ``stage1`` the one-step student, ``stage2`` the velocity.

        ``decoder=True`` / ``encoder=True`` let stage 2 also adapt the decoder / the encoder
        (families that allow it; the others raise :class:`ConfigError`).
        """

    # -- checkpoint contract (implemented per family, used by models.checkpoint) ----------------
    @classmethod
    @abstractmethod
    def build(cls, config: StudentConfig, folder: Path | None = None, **options: Any) -> CTSRStudent:
        """Construct the modules; ``folder`` is the checkpoint being loaded (for external parts)."""

    @abstractmethod
    def state_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """The tensors a checkpoint stores, by safetensors file name."""

    @abstractmethod
    def load_state_files(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`state_files`; raises ``RuntimeError``/``KeyError`` on a mismatch."""

    def prepare_for_inference(self) -> None:
        """Optional one-way speed-up for serving (e.g. merging adapters); training skips it."""

    # -- convenience --------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        from .checkpoint import save_student

        return save_student(self, Path(folder), provenance)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **options: Any) -> CTSRStudent:
        from .checkpoint import load_student

        return load_student(Path(folder), **options)
