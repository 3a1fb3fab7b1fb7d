"""``sd21``: the paper's student on Stable Diffusion 2.1-base (OSEDiff-style, one step).

* encode   = bicubic ×scale → VAE encoder (+ LoRA "student") → UNet (+ LoRA "student") at a fixed
  timestep with a stored prompt embedding → ``z0`` by the epsilon-prediction identity;
* velocity = the same UNet with the separate LoRA "velocity" on ``z0`` → ``v``;
* decode   = the frozen VAE decoder.

The frozen base comes from a local diffusers folder (``unet/``, ``vae/``; never downloaded), or,
for tests and benchmarks at reduced or full width with random weights, is stored inside the
checkpoint as ``base.safetensors``. The adapters and the prompt embedding always live in
``adapters.safetensors``.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ..config import StudentConfig, parse_arch
from ..errors import CheckpointError, ConfigError
from ..registry import ARCH_REGISTRY
from ..student import CTSRStudent
from .lora import base_keys, copy_named_tensors, lora_config, merge_and_strip

ADAPTERS_NAME = "adapters.safetensors"
BASE_NAME = "base.safetensors"
UNET_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "conv_in", "conv_out", "time_emb_proj",
]  # fmt: skip
VAE_ENCODER_LORA_PATTERN = r"^encoder\..*(conv1|conv2|conv_in|conv_out|conv_shortcut|to_q|to_k|to_v|to_out\.0)$"

# SD-2.1-base shapes (stabilityai/stable-diffusion-2-1-base unet/ and vae/ config.json).
SD21_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
SD21_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}


@dataclass
class SD21Arch:
    unet: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(SD21_UNET))
    vae: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(SD21_VAE))
    #: Local diffusers folder with the frozen base; None = weights stored in the checkpoint.
    base_model: str | None = None
    lora_rank: int = 4
    vae_lora_rank: int = 4
    velocity_rank: int = 4
    timestep: int = 999
    velocity_timestep: int = 999
    prompt: str = ""
    prompt_length: int = 77
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012


def _resolve_base(base: str | Path, folder: Path | None) -> Path:
    path = Path(base).expanduser()
    if not path.is_absolute() and folder is not None:
        path = folder / path
    missing = [f"{sub}/config.json" for sub in ("unet", "vae") if not (path / sub / "config.json").is_file()]
    if missing:
        raise CheckpointError(
            f"sd21 base model not found: {path} lacks {', '.join(missing)}. Point base_model (or --base) "
            "at a local diffusers copy of stabilityai/stable-diffusion-2-1-base; nothing is downloaded."
        )
    return path


def _public(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON data, without its private ``_name_or_path``-style keys."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


@ARCH_REGISTRY.register("sd21")
class SD21Student(CTSRStudent):
    family = "sd21"

    def __init__(self, config: StudentConfig, unet: UNet2DConditionModel, vae: AutoencoderKL) -> None:
        super().__init__(config)
        self.arch = a = parse_arch(SD21Arch, config.arch, self.family)
        self.unet, self.vae = unet, vae
        self.unet_velocity: UNet2DConditionModel | None = None  # set once adapters are fused
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(unet.config.block_out_channels) - 1)
        self.size_multiple = vae_factor * unet_factor // math.gcd(config.scale, vae_factor * unet_factor)
        betas = torch.linspace(a.beta_start**0.5, a.beta_end**0.5, a.num_train_timesteps) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.sqrt_abar = float(alphas_cumprod[a.timestep].sqrt())
        self.sqrt_one_minus_abar = float((1 - alphas_cumprod[a.timestep]).sqrt())
        self.register_buffer("prompt_embeds", torch.randn(1, a.prompt_length, unet.config.cross_attention_dim) * 0.1)
        unet.requires_grad_(False)
        vae.requires_grad_(False)
        with warnings.catch_warnings():  # peft warns that a second adapter is intended here
            warnings.simplefilter("ignore", UserWarning)
            unet.add_adapter(lora_config(a.velocity_rank, UNET_LORA_TARGETS), adapter_name="velocity")
            unet.add_adapter(lora_config(a.lora_rank, UNET_LORA_TARGETS), adapter_name="student")
            vae.add_adapter(lora_config(a.vae_lora_rank, VAE_ENCODER_LORA_PATTERN), adapter_name="student")

    # -- stages ---------------------------------------------------------------------------------
    def _unet(self, adapter: str) -> UNet2DConditionModel:
        if adapter == "velocity" and self.unet_velocity is not None:
            return self.unet_velocity
        if self.unet_velocity is None:
            self.unet.set_adapter(adapter)
        return self.unet

    def _cond(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.prompt_embeds.to(dtype).expand(batch, -1, -1)

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        x = (x * 2 - 1).clamp(-1, 1)
        z = self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor
        t = torch.full((z.shape[0],), self.arch.timestep, device=z.device, dtype=torch.long)
        eps = self._unet("student")(z, t, self._cond(z.shape[0], z.dtype)).sample
        return (z - self.sqrt_one_minus_abar * eps) / self.sqrt_abar

    def velocity(self, z0: torch.Tensor) -> torch.Tensor:
        t = torch.full((z0.shape[0],), self.arch.velocity_timestep, device=z0.device, dtype=torch.long)
        return self._unet("velocity")(z0, t, self._cond(z0.shape[0], z0.dtype)).sample

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(z / self.vae.config.scaling_factor).sample
        return (x + 1) / 2

    # -- training hooks -------------------------------------------------------------------------
    def encode_target(self, image: torch.Tensor) -> torch.Tensor:
        """The base VAE's latent of an SR-sized image (student LoRA off: the decoder's own encoder)."""
        self.vae.disable_adapters()
        try:
            x = (image * 2 - 1).clamp(-1, 1)
            return self.vae.encode(x).latent_dist.mode() * self.vae.config.scaling_factor
        finally:
            self.vae.enable_adapters()

    def trainable_parameters(self, stage: str, decoder: bool = False) -> list[torch.nn.Parameter]:
        if self.unet_velocity is not None:
            raise ConfigError("sd21: adapters were fused for inference; train an unfused student")
        if decoder:
            raise ConfigError("sd21: the VAE decoder stays frozen (stage 2 regresses latents)")
        adapter = {"stage1": "student", "stage2": "velocity"}.get(stage)
        if adapter is None:
            raise ConfigError(f"sd21: unknown training stage {stage!r}")
        params = []
        for module in (self.unet, self.vae):
            for name, param in module.named_parameters():
                if "lora_" in name and f".{adapter}." in name:
                    params.append(param)
        return params

    # -- construction and checkpoint ------------------------------------------------------------
    @classmethod
    def build(
        cls, config: StudentConfig, folder: Path | None = None, *, base_model: str | Path | None = None
    ) -> SD21Student:
        a = parse_arch(SD21Arch, config.arch, cls.family)
        base = base_model if base_model is not None else a.base_model
        if base is None:  # the base's weights travel inside the checkpoint (random-init bases)
            unet = UNet2DConditionModel.from_config(a.unet)
            vae = AutoencoderKL.from_config(a.vae)
        else:
            path = _resolve_base(base, folder)
            try:
                unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
                vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"sd21 base model at {path} cannot be loaded ({exc})") from None
            config = StudentConfig.from_dict(config.to_dict())
            config.arch.update(unet=_public(unet.config), vae=_public(vae.config), base_model=str(path))
        student = cls(config, unet, vae)
        if folder is None and base is not None:
            student._init_prompt(Path(config.arch["base_model"]))
        return student

    def _init_prompt(self, base: Path) -> None:
        """Encode the configured prompt with the base's own text encoder when it has one."""
        if not (base / "text_encoder" / "config.json").is_file():
            return
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=True)
        encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", local_files_only=True)
        ids = tokenizer(
            self.arch.prompt, padding="max_length", max_length=self.arch.prompt_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        with torch.no_grad():
            self.prompt_embeds.copy_(encoder(ids)[0])
        self.config.provenance["prompt_embeds"] = f"text encoder of {base}"

    def _adapter_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"prompt_embeds": self.prompt_embeds}
        for prefix, module in (("unet.", self.unet), ("vae.", self.vae)):
            tensors.update({prefix + k: v for k, v in module.state_dict().items() if "lora_" in k})
        return tensors

    def state_files(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.unet_velocity is not None:
            raise ConfigError("sd21: adapters were fused for inference; save before fusing")
        files = {ADAPTERS_NAME: self._adapter_tensors()}
        if self.arch.base_model is None:
            files[BASE_NAME] = {}
            for prefix, module in (("unet.", self.unet), ("vae.", self.vae)):
                state = module.state_dict()
                files[BASE_NAME].update({prefix + clean: state[key] for clean, key in base_keys(module).items()})
        return files

    def load_state_files(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        copy_named_tensors(self._adapter_tensors(), files[ADAPTERS_NAME])
        if BASE_NAME in files:
            for prefix, module in (("unet.", self.unet), ("vae.", self.vae)):
                mapping = base_keys(module)
                state = {mapping.get(k[len(prefix) :], k): v for k, v in files[BASE_NAME].items()
                         if k.startswith(prefix)}  # fmt: skip
                module.load_state_dict(state, strict=False)
                missing = sorted(set(mapping.values()) - set(state))
                if missing:
                    raise KeyError(f"base tensors missing: {missing[:3]}")

    def prepare_for_inference(self) -> None:
        """Merge the LoRAs: one UNet per adapter, no per-layer LoRA matmuls at serve time."""
        if self.unet_velocity is not None:
            return
        velocity = copy.deepcopy(self.unet)
        merge_and_strip(velocity, "velocity")
        merge_and_strip(self.unet, "student")
        merge_and_strip(self.vae, "student")
        self.unet_velocity = velocity
