"""``sd21``: the paper's student on Stable Diffusion 2.1-base (OSEDiff-style, one step).

* encode   = bicubic ×scale → VAE encoder (+ LoRA "student") → UNet (+ LoRA "student") at a fixed
  timestep with a stored prompt embedding → ``z0`` by the identity of the base's parameterisation
  (``arch.prediction_type``: ``epsilon`` or ``v_prediction``, read from the base's
  ``scheduler/scheduler_config.json`` where it has one; any other is refused);
* velocity = the same UNet with the separate LoRA "velocity" on ``z0`` → ``v``. With
  ``arch.velocity_zero_init`` (every new student) the velocity's output layer is its ``conv_out``
  LoRA alone, without the base's ``conv_out``: it starts at B = 0, so an untrained velocity is
  exactly zero and alpha has no effect until stage 2 trains it (a LoRA of rank >= the UNet's
  ``out_channels``, 4, is a full-rank output layer). Checkpoints written before the option load
  with ``velocity_zero_init: false``: their velocity keeps the base's ``conv_out``, as trained;
* decode   = the frozen VAE decoder.

The prompt embedding (``arch.prompt_embedding``) is ``text_encoder``: ``arch.prompt`` encoded by
the base's own CLIP text encoder (``text_encoder/`` + ``tokenizer/`` of the base folder) when the
student is first built, or ``zeros``: an all-zero embedding, an explicit choice for bases without
a text encoder (random-init test and benchmark bases). A base without a text encoder is refused
unless ``zeros`` is set; nothing is ever filled with random numbers. ``random`` only describes
checkpoints written before the option existed (their stored embedding was a random draw); it is
set when such a checkpoint loads, so ``ctsr model info`` shows it, and a new student refuses it.

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

# From their own modules: through `diffusers` itself, mypy sees the dummy stand-ins of its
# optional-dependency imports instead of these classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer

from ..config import StudentConfig, parse_arch, read_json_object
from ..errors import CheckpointError, ConfigError
from ..registry import ARCH_REGISTRY
from ..resample import bicubic_upscale
from ..student import CTSRStudent
from .lora import base_keys, copy_named_tensors, lora_config, merge_and_strip

ADAPTERS_NAME = "adapters.safetensors"
BASE_NAME = "base.safetensors"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
#: What the UNet's output is, and how :meth:`SD21Student.encode` turns it into ``z0`` in one step.
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: Where the prompt embedding comes from (``random``: only checkpoints written before the option).
PROMPT_EMBEDDINGS = ("text_encoder", "zeros", "random")
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
    #: ``text_encoder`` (encode ``prompt`` with the base's text encoder; a base without one is
    #: refused) or ``zeros`` (an all-zero embedding, chosen explicitly). See the module docstring.
    prompt_embedding: str = "text_encoder"
    #: The base UNet's parameterisation (``epsilon`` or ``v_prediction``); a base folder's
    #: ``scheduler/scheduler_config.json`` sets it (and the beta schedule below).
    prediction_type: str = "epsilon"
    #: The velocity's output layer is its conv_out LoRA alone, so v = 0 until trained (new students);
    #: false: checkpoints written before the option, whose velocity includes the base's conv_out.
    velocity_zero_init: bool = True
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self) -> None:
        if self.prompt_embedding not in PROMPT_EMBEDDINGS:
            raise ValueError(f"prompt_embedding must be 'text_encoder' or 'zeros', not {self.prompt_embedding!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not implemented (epsilon or v_prediction)")
        if not isinstance(self.velocity_zero_init, bool):
            raise ValueError(f"velocity_zero_init must be true or false, not {self.velocity_zero_init!r}")
        for name in ("timestep", "velocity_timestep"):
            step = getattr(self, name)
            if not isinstance(step, int) or not 0 <= step < self.num_train_timesteps:
                raise ValueError(f"{name} must be an integer in [0, {self.num_train_timesteps}), not {step!r}")


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


def _scheduler_options(base: Path) -> dict[str, Any]:
    """The base's noise schedule and parameterisation from ``scheduler/scheduler_config.json``
    (empty where the folder has none); a schedule this code does not implement is refused."""
    path = base / SCHEDULER_CONFIG
    if not path.is_file():
        return {}
    sched = read_json_object(path, "scheduler config")
    prediction = sched.get("prediction_type", "epsilon")  # diffusers' default when the key is absent
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(
            f"sd21: the base at {base} has prediction_type {prediction!r} ({SCHEDULER_CONFIG}); the one-step "
            "student implements epsilon and v_prediction only"
        )
    schedule = sched.get("beta_schedule", "scaled_linear")
    if schedule != "scaled_linear" or sched.get("trained_betas") is not None:
        what = "trained_betas" if sched.get("trained_betas") is not None else f"beta_schedule {schedule!r}"
        raise ConfigError(
            f"sd21: the base at {base} has {what} ({SCHEDULER_CONFIG}); only scaled_linear is implemented"
        )
    options = {"prediction_type": prediction}
    for key in ("num_train_timesteps", "beta_start", "beta_end"):
        if key in sched:
            options[key] = sched[key]
    return options


def _has_text_encoder(base: Path) -> bool:
    files = (("text_encoder", "config.json"), ("tokenizer", "tokenizer_config.json"))
    return all((base / sub / name).is_file() for sub, name in files)


def _only_velocity_delta(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the LoRA-wrapped ``conv_out``: its output without the base layer's part."""
    assert isinstance(module, BaseTunerLayer)  # peft's LoRA Conv2d wraps conv_out
    base: torch.Tensor = module.get_base_layer()(*args)
    return output - base


def _public(config: Any) -> dict[str, Any]:
    """A diffusers config as plain JSON data, without its private ``_name_or_path``-style keys."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if not k.startswith("_")}


def _check_prompt_source(arch: SD21Arch, base: Path | None) -> None:
    """A new student's prompt embedding must come from somewhere real: refuse a silent stand-in."""
    if arch.prompt_embedding == "random":
        raise ConfigError(
            "sd21: prompt_embedding 'random' only describes checkpoints written before the option existed; "
            "a new student takes 'text_encoder' or 'zeros'"
        )
    if arch.prompt_embedding != "text_encoder" or (base is not None and _has_text_encoder(base)):
        return
    where = (
        "no base folder (arch.base_model / --base): the base is built from its config, without a text encoder"
        if base is None
        else f"the base at {base} has no text encoder (text_encoder/config.json + tokenizer/)"
    )
    raise ConfigError(
        f"sd21: cannot encode the prompt: {where}. Point base_model at a diffusers SD-2.1-base folder with "
        'text_encoder/ and tokenizer/, or set arch "prompt_embedding": "zeros" to use an all-zero prompt '
        "embedding explicitly"
    )


@ARCH_REGISTRY.register("sd21")
class SD21Student(CTSRStudent):
    family = "sd21"
    prompt_embeds: torch.Tensor  # a buffer

    def __init__(self, config: StudentConfig, unet: UNet2DConditionModel, vae: AutoencoderKL) -> None:
        super().__init__(config)
        self.arch = a = parse_arch(SD21Arch, config.arch, self.family)
        self.unet, self.vae = unet, vae
        self.unet_velocity: UNet2DConditionModel | None = None  # set once adapters are fused
        vae_factor = 2 ** (len(vae.config["block_out_channels"]) - 1)
        unet_factor = 2 ** (len(unet.config["block_out_channels"]) - 1)
        self.size_multiple = vae_factor * unet_factor // math.gcd(config.scale, vae_factor * unet_factor)
        betas = torch.linspace(a.beta_start**0.5, a.beta_end**0.5, a.num_train_timesteps) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.sqrt_abar = float(alphas_cumprod[a.timestep].sqrt())
        self.sqrt_one_minus_abar = float((1 - alphas_cumprod[a.timestep]).sqrt())
        self.register_buffer("prompt_embeds", torch.zeros(1, a.prompt_length, unet.config["cross_attention_dim"]))
        unet.requires_grad_(False)
        vae.requires_grad_(False)
        with warnings.catch_warnings():  # peft warns that a second adapter is intended here
            warnings.simplefilter("ignore", UserWarning)
            unet.add_adapter(lora_config(a.velocity_rank, UNET_LORA_TARGETS), adapter_name="velocity")
            unet.add_adapter(lora_config(a.lora_rank, UNET_LORA_TARGETS), adapter_name="student")
            vae.add_adapter(lora_config(a.vae_lora_rank, VAE_ENCODER_LORA_PATTERN), adapter_name="student")
        if a.velocity_zero_init and "velocity" not in getattr(unet.conv_out, "lora_A", {}):
            raise ConfigError("sd21: velocity_zero_init needs a velocity LoRA on the UNet's conv_out")

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
        x = bicubic_upscale(lr, self.scale)
        x = (x * 2 - 1).clamp(-1, 1)
        z: torch.Tensor = self.vae.encode(x).latent_dist.mode() * self.vae.config["scaling_factor"]
        t = torch.full((z.shape[0],), self.arch.timestep, device=z.device, dtype=torch.long)
        out: torch.Tensor = self._unet("student")(z, t, self._cond(z.shape[0], z.dtype)).sample
        if self.arch.prediction_type == "v_prediction":  # out = sqrt(abar)·eps − sqrt(1−abar)·x0
            return self.sqrt_abar * z - self.sqrt_one_minus_abar * out
        return (z - self.sqrt_one_minus_abar * out) / self.sqrt_abar  # epsilon: out = eps

    def velocity(self, z0: torch.Tensor) -> torch.Tensor:
        t = torch.full((z0.shape[0],), self.arch.velocity_timestep, device=z0.device, dtype=torch.long)
        unet = self._unet("velocity")
        v: torch.Tensor
        if self.unet_velocity is not None or not self.arch.velocity_zero_init:
            v = unet(z0, t, self._cond(z0.shape[0], z0.dtype)).sample
            return v
        # unfused: the shared conv_out also carries the base's weights; the velocity uses its LoRA alone
        handle = unet.conv_out.register_forward_hook(_only_velocity_delta)
        try:
            v = unet(z0, t, self._cond(z0.shape[0], z0.dtype)).sample
            return v
        finally:
            handle.remove()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.vae.decode(z / self.vae.config["scaling_factor"]).sample
        return (x + 1) / 2

    # -- training hooks -------------------------------------------------------------------------
    def encode_target(self, image: torch.Tensor) -> torch.Tensor:
        """The base VAE's latent of an SR-sized image (student LoRA off: the decoder's own encoder)."""
        self.vae.disable_adapters()
        try:
            x = (image * 2 - 1).clamp(-1, 1)
            z: torch.Tensor = self.vae.encode(x).latent_dist.mode() * self.vae.config["scaling_factor"]
            return z
        finally:
            self.vae.enable_adapters()

    def trainable_parameters(
        self, stage: str, decoder: bool = False, encoder: bool = False
    ) -> list[torch.nn.Parameter]:
        if encoder:
            raise ConfigError("sd21: the VAE encoder and the one-step UNet stay frozen in stage 2")
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
    def build(  # type: ignore[override]  # each family takes its own build options: sd21 only base_model
        cls, config: StudentConfig, folder: Path | None = None, *, base_model: str | Path | None = None
    ) -> SD21Student:
        fresh = folder is None  # a new student; else a checkpoint, whose stored tensors load over it
        config = StudentConfig.from_dict(config.to_dict())  # the student's own copy, made explicit below
        arch = config.arch
        if fresh:
            arch.setdefault("prompt_embedding", SD21Arch.prompt_embedding)
            arch.setdefault("velocity_zero_init", True)
        else:  # written before these options: say what the checkpoint does (shown by `ctsr model info`)
            encoded = str(config.provenance.get("prompt_embeds", "")).startswith("text encoder of")
            arch.setdefault("prompt_embedding", "text_encoder" if encoded else "random")
            arch.setdefault("velocity_zero_init", False)
        a = parse_arch(SD21Arch, arch, cls.family)
        base = base_model if base_model is not None else a.base_model
        path = None if base is None else _resolve_base(base, folder)
        if fresh:
            _check_prompt_source(a, path)
        if path is None:  # the base's weights travel inside the checkpoint (random-init bases)
            unet = UNet2DConditionModel.from_config(a.unet)
            vae = AutoencoderKL.from_config(a.vae)
        else:
            schedule = _scheduler_options(path)
            # a new config may leave these to the base; a checkpoint was built with what it records
            recorded = arch if fresh else {k: getattr(a, k) for k in schedule}
            for key, value in schedule.items():
                if key in recorded and recorded[key] != value:
                    raise ConfigError(
                        f"sd21: {key} is {recorded[key]!r} in this config but {value!r} in the base at {path} "
                        f"({SCHEDULER_CONFIG})"
                    )
            try:
                unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
                vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"sd21 base model at {path} cannot be loaded ({exc})") from None
            arch.update(unet=_public(unet.config), vae=_public(vae.config), base_model=str(path), **schedule)
        student = cls(config, unet, vae)
        if fresh:
            student._init_prompt(path)
        return student

    def _init_prompt(self, base: Path | None) -> None:
        """Fill the prompt embedding as ``arch.prompt_embedding`` says and record where it came from."""
        if self.arch.prompt_embedding == "zeros":
            self.prompt_embeds.zero_()
            self.config.provenance["prompt_embeds"] = "zeros (arch.prompt_embedding)"
            return
        assert base is not None and self.arch.prompt_embedding == "text_encoder"  # _check_prompt_source
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=True)
            encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"sd21: the text encoder of {base} cannot be loaded ({exc})") from None
        ids = tokenizer(
            self.arch.prompt, padding="max_length", max_length=self.arch.prompt_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        with torch.no_grad():
            embeds = encoder(ids)[0]
        if embeds.shape != self.prompt_embeds.shape:
            raise ConfigError(
                f"sd21: the text encoder of {base} gives embeddings of shape {tuple(embeds.shape)}; the UNet "
                f"expects {tuple(self.prompt_embeds.shape)} (prompt_length, cross_attention_dim)"
            )
        self.prompt_embeds.copy_(embeds)
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
        if self.arch.velocity_zero_init:  # the velocity's output layer is its conv_out LoRA alone
            conv_out: torch.nn.Module = velocity.conv_out  # a peft LoRA Conv2d, no longer a plain Conv2d
            assert isinstance(conv_out, BaseTunerLayer)  # LoRA-wrapped: velocity_zero_init needs the velocity LoRA
            with torch.no_grad():
                for param in conv_out.get_base_layer().parameters():
                    param.zero_()
        merge_and_strip(velocity, "velocity")
        merge_and_strip(self.unet, "student")
        merge_and_strip(self.vae, "student")
        self.unet_velocity = velocity
