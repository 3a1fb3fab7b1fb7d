"""``rrdb``: the CTSR student built on a pretrained prior, the realness teacher's own network.

CTSR adapts a large pretrained generator (SD-2.1) with LoRA instead of training a student from
scratch. The pretrained generator reachable here is Real-ESRGAN x4plus (an RRDBNet), so this
family maps CTSR's parts onto it:

* encode   = the prior's trunk (conv_first → RRDBs → conv_body, + the global skip), frozen, with
  peft LoRA adapters (stage 1) on its last ``lora_blocks`` RRDBs and conv_body. ``z0`` is the
  trunk's 64-channel feature map at LR resolution: the "latent".
* velocity = ``velocity: "rdb"``: a small stack of residual dense blocks on ``z0`` (stage 2) whose
  last conv starts at zero, so an untrained velocity leaves every alpha at the alpha = 0 output.
  ``velocity: "branch"``: a second copy of the adapted part of the trunk (the last ``lora_blocks``
  RRDBs and conv_body) run on the same un-adapted trunk features, warm-started in stage 2 from the
  fidelity teacher's own blocks (it shares the prior's architecture) and trained. Its output is the
  fidelity end's features, so ``v = gain · (z_branch − z)``, with ``gain`` 0 until stage 2 starts.
  The branch needs the trunk's intermediate features, so its latent carries them: ``z0`` is
  ``[z, trunk, shallow]`` (3 × num_feat channels at LR size) and the velocity moves only ``z``.
* decode   = the prior's upsampling tail (two nearest ×2 + conv stages, conv_hr, conv_last), with
  stage-1 adapters.

The trunk is ~90 % of the prior's cost and does not depend on alpha, so one alpha costs the
prior plus the velocity, and a sweep adds one tail per extra alpha.

The prior is not copied into checkpoints: ``config.json`` names it (``realesrgan-x4plus``) with
the SHA-256 of its weights, and loading refuses a prior whose weights differ. ``prior: random``
(tests) builds a randomly initialised RRDBNet of ``prior_options`` whose weights then travel in
the checkpoint.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import inject_adapter_in_model
from torch import nn

from ..checkpoint import tensors_sha256
from ..config import StudentConfig, parse_arch
from ..errors import CheckpointError, ConfigError
from ..registry import ARCH_REGISTRY
from ..student import CTSRStudent
from ..teachers.rrdbnet import ResidualDenseBlock, RRDBNet
from .lora import base_keys, copy_named_tensors, lora_config, merge_and_strip

ADAPTERS_NAME = "adapters.safetensors"  # stage-1 LoRA + the velocity net
PRIOR_NAME = "prior.safetensors"  # only for prior: random
RANDOM_PRIOR = "random"
TAIL = ("conv_up1", "conv_up2", "conv_hr", "conv_last")


@dataclass
class RRDBArch:
    #: ``realesrgan-x4plus`` (the realness teacher) or ``random`` (weights stored in the checkpoint).
    prior: str = "realesrgan-x4plus"
    #: RRDBNet options of a ``random`` prior (a named prior brings its own shape).
    prior_options: dict[str, int] = field(default_factory=dict)
    #: SHA-256 of the prior's weights the adapters were trained on (set when first built).
    prior_sha256: str | None = None
    lora_rank: int = 8
    #: Stage-1 adapters on the last this-many RRDBs (+ conv_body and the tail); earlier blocks stay
    #: exactly the prior's, which is what lets training cache their output once per pair.
    lora_blocks: int = 2
    velocity_blocks: int = 4
    velocity_growth: int = 32
    #: ``rdb`` (dense blocks on z0; velocity_blocks/velocity_growth) or ``branch`` (the fidelity
    #: teacher's last lora_blocks RRDBs + conv_body, trained; see the module docstring).
    velocity: str = "rdb"

    def __post_init__(self) -> None:
        for name in ("lora_rank", "velocity_blocks", "velocity_growth"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer")
        if not isinstance(self.lora_blocks, int) or self.lora_blocks < 0:
            raise ValueError("lora_blocks must be a non-negative integer")
        if self.velocity not in ("rdb", "branch"):
            raise ValueError(f"velocity must be 'rdb' or 'branch', not {self.velocity!r}")
        if self.velocity == "branch" and self.lora_blocks < 1:
            raise ValueError("velocity 'branch' re-runs the adapted blocks: lora_blocks must be >= 1")


def _named_prior(name: str) -> RRDBNet:
    from ..teachers.loading import realesrgan, teacher_name

    if name != teacher_name("realesrgan"):
        raise ConfigError(f"rrdb: unknown prior {name!r} (realesrgan-x4plus or random)")
    return realesrgan().net


class VelocityNet(nn.Module):
    """Residual dense blocks on ``z0`` and a zero-initialised output conv: v = 0 until trained."""

    def __init__(self, features: int, blocks: int, growth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(features, growth) for _ in range(blocks)))
        self.out = nn.Conv2d(features, features, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        assert self.out.bias is not None  # Conv2d's default bias=True
        nn.init.zeros_(self.out.bias)

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        v: torch.Tensor = self.out(self.blocks(z0))
        return v


class FidelityBranch(nn.Module):
    """The fidelity end's version of the trunk's last blocks: ``v = gain · (z_branch − z)``.

    Built as a copy of the prior's blocks; :meth:`RRDBStudent.warm_start_velocity` loads the
    fidelity teacher's and sets ``gain`` to 1 (until then it is 0: alpha has no effect).
    """

    def __init__(self, prior: RRDBNet, first_block: int) -> None:
        super().__init__()
        self.features = prior.num_feat
        self.body = copy.deepcopy(prior.body[first_block:])
        self.conv_body = copy.deepcopy(prior.conv_body)
        self.gain = nn.Parameter(torch.zeros(()))

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        z, trunk, shallow = z0.split(self.features, dim=1)
        v = self.gain * (shallow + self.conv_body(self.body(trunk)) - z)
        return torch.cat([v, torch.zeros_like(trunk), torch.zeros_like(shallow)], dim=1)


@ARCH_REGISTRY.register("rrdb")
class RRDBStudent(CTSRStudent):
    family = "rrdb"
    cacheable_latent = True

    def __init__(self, config: StudentConfig, prior: RRDBNet) -> None:
        super().__init__(config)
        self.arch = a = parse_arch(RRDBArch, config.arch, self.family)
        if prior.scale != config.scale or prior.unshuffle != 1:
            raise ConfigError(f"rrdb: the prior is x{prior.scale}; the student is x{config.scale} (x4 only)")
        if a.lora_blocks > prior.num_block:
            raise ConfigError(f"rrdb: lora_blocks {a.lora_blocks} > the prior's {prior.num_block} blocks")
        self.net = prior.requires_grad_(False)
        #: The first RRDB the stage-1 adapters touch; blocks before it are the prior's own.
        self.adapted_from = prior.num_block - a.lora_blocks
        self.features = prior.num_feat
        self.velocity_net: nn.Module
        if a.velocity == "branch":  # copied before the adapters go in: the branch has none
            self.velocity_net = FidelityBranch(prior, self.adapted_from)
        else:
            self.velocity_net = VelocityNet(prior.num_feat, a.velocity_blocks, a.velocity_growth)
        patterns = ["conv_body", *TAIL]
        if a.lora_blocks:
            blocks = "|".join(str(b) for b in range(self.adapted_from, prior.num_block))
            patterns.append(rf"body\.({blocks})\.rdb\d\.conv\d")
        targets = "|".join(patterns)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft: "already has an adapter" style notices
            inject_adapter_in_model(lora_config(a.lora_rank, f"^(?:{targets})$"), self.net, adapter_name="student")
        self.merged = False

    # -- the three stages -----------------------------------------------------------------------
    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        return self.encode_cached(self.encoder_cache(lr))

    def velocity(self, z0: torch.Tensor) -> torch.Tensor:
        v: torch.Tensor = self.velocity_net(z0)
        return v

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # A branch latent also carries the trunk's inputs (see the docstring): the tail reads z only.
        out: torch.Tensor = self.net.tail(z[:, : self.features])
        return out

    # -- training hooks ---------------------------------------------------------------------------
    def encoder_cache(self, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen first part of :meth:`encode`: the shallow features and the last un-adapted block's output."""
        feat = self.net.conv_first(lr)
        return {"feat": feat, "trunk": self.net.body[: self.adapted_from](feat)}

    def encode_cached(self, cached: dict[str, torch.Tensor]) -> torch.Tensor:
        net = self.net
        z: torch.Tensor = cached["feat"] + net.conv_body(net.body[self.adapted_from :](cached["trunk"]))
        if self.arch.velocity == "branch":
            return torch.cat([z, cached["trunk"], cached["feat"]], dim=1)
        return z

    def warm_start_velocity(self, teacher: nn.Module) -> None:
        """Branch velocity: start from the fidelity teacher's own last blocks (same architecture as
        the prior), so alpha = 1 begins at (nearly) the teacher and training closes the rest."""
        branch = self.velocity_net
        if not isinstance(branch, FidelityBranch):
            raise ConfigError("rrdb: velocity_init needs arch.velocity 'branch'")
        if (
            not isinstance(teacher, RRDBNet)
            or teacher.num_feat != self.features
            or len(teacher.body) != len(self.net.body)
        ):
            raise ConfigError("rrdb: the fidelity teacher does not share the prior's architecture")
        with torch.no_grad():
            branch.body.load_state_dict(teacher.body[self.adapted_from :].state_dict())
            branch.conv_body.load_state_dict(teacher.conv_body.state_dict())
            branch.gain.fill_(1.0)

    def trainable_parameters(self, stage: str, decoder: bool = False, encoder: bool = False) -> list[nn.Parameter]:
        if encoder:
            raise ConfigError("rrdb: the prior's trunk (the encoder) stays frozen; unset train_encoder")
        if self.merged:
            raise ConfigError("rrdb: adapters were merged for inference; load the checkpoint again to train")
        if stage == "stage1":
            return [p for n, p in self.net.named_parameters() if "lora_" in n]
        if stage == "stage2":
            tail = [p for n, p in self.net.named_parameters() if "lora_" in n and n.startswith(TAIL)]
            return [*self.velocity_net.parameters(), *(tail if decoder else [])]
        raise ConfigError(f"rrdb: unknown training stage {stage!r}")

    # -- construction and checkpoint ------------------------------------------------------------
    @classmethod
    def build(cls, config: StudentConfig, folder: Path | None = None, **options: Any) -> RRDBStudent:
        if options:
            raise ConfigError(f"rrdb checkpoints take no load options (got {', '.join(sorted(options))})")
        a = parse_arch(RRDBArch, config.arch, cls.family)
        if a.prior == RANDOM_PRIOR:
            prior = RRDBNet(scale=config.scale, **a.prior_options)  # its weights come from the checkpoint
            return cls(config, prior)
        prior = _named_prior(a.prior)
        digest = tensors_sha256(prior.state_dict())
        if a.prior_sha256 is None:
            config = StudentConfig.from_dict(config.to_dict())
            config.arch["prior_sha256"] = digest
        elif a.prior_sha256 != digest:
            where = folder or "this config"
            raise CheckpointError(
                f"{where}: the installed {a.prior} weights (sha256 {digest[:12]}…) are not the ones this "
                f"student was trained on ({a.prior_sha256[:12]}…)"
            )
        return cls(config, prior)

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items() if "lora_" in k}
        tensors.update({f"velocity_net.{k}": v for k, v in self.velocity_net.state_dict().items()})
        return tensors

    def state_files(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.merged:
            raise ConfigError("rrdb: adapters were merged for inference; save before merging")
        files = {ADAPTERS_NAME: self._adapter_tensors()}
        if self.arch.prior == RANDOM_PRIOR:
            state = self.net.state_dict()
            files[PRIOR_NAME] = {clean: state[key] for clean, key in base_keys(self.net).items()}
        return files

    def load_state_files(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        copy_named_tensors(self._adapter_tensors(), files[ADAPTERS_NAME])
        if PRIOR_NAME in files:
            mapping = base_keys(self.net)
            prior = files[PRIOR_NAME]
            if set(prior) != set(mapping):
                raise KeyError(f"prior tensors do not match the configured RRDBNet ({len(prior)} vs {len(mapping)})")
            self.net.load_state_dict({mapping[k]: v for k, v in prior.items()}, strict=False)

    def prepare_for_inference(self) -> None:
        """Fold the stage-1 adapters into the prior's convolutions: serving runs a plain RRDBNet."""
        if not self.merged:
            merge_and_strip(self.net, "student")
            self.merged = True
