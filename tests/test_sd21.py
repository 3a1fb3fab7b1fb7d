"""sd21 specifics: where the prompt embedding comes from, the base's prediction type, and a velocity
that is exactly zero until stage 2 trains it (all on the tiny preset with random weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_sd21, perturb_lora, photo_crop
from diffusers import DDPMScheduler

import models
from models.checkpoint import load_student, save_student
from models.config import StudentConfig
from models.errors import CheckpointError, ConfigError
from models.presets import load_preset


def _lr(batch: int = 2) -> torch.Tensor:
    return torch.stack([photo_crop(7 + 19 * i, 5 + 11 * i, 16, 12) for i in range(batch)])


def _tiny(**arch: Any) -> StudentConfig:
    """The tiny preset with ``arch`` overrides; an override of None removes the option."""
    config = load_preset("sd21-tiny")
    for key, value in arch.items():
        if value is None:
            config.arch.pop(key, None)
        else:
            config.arch[key] = value
    return config


def _perturb_student_only(student: torch.nn.Module) -> None:
    """Trained-looking stage-1 adapters, the velocity adapter left as initialised."""
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name and ".student." in name:
                param.normal_(0, 0.02)


def _with_scheduler(base: Path, folder: Path, **options: Any) -> Path:
    """A copy of ``base`` (links to its unet/ and vae/) with an SD-style scheduler config."""
    folder.mkdir()
    for sub in ("unet", "vae"):
        (folder / sub).symlink_to(base / sub, target_is_directory=True)
    sched = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
    DDPMScheduler(**{**sched, **options}).save_pretrained(folder / "scheduler")
    return folder


def _with_text_encoder(base: Path, folder: Path) -> Path:
    """A copy of ``base`` with a tiny CLIP text encoder and tokenizer (sd21-tiny widths)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir()
    for sub in ("unet", "vae"):
        (folder / sub).symlink_to(base / sub, target_is_directory=True)
    words = ["l", "o", "w", "e", "r", "lo", "l</w>", "w</w>", "r</w>", "low</w>", "er</w>", "<unk>",
             "<|startoftext|>", "<|endoftext|>"]  # fmt: skip
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (folder / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder / "tokenizer")
    config = CLIPTextConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=8, bos_token_id=12, eos_token_id=13, pad_token_id=13,
    )  # fmt: skip
    torch.manual_seed(3)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    return folder


# -- the prompt embedding -----------------------------------------------------------------------
def test_text_encoder_of_the_base_encodes_the_prompt(tiny_base: Path, tmp_path: Path) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    base = _with_text_encoder(tiny_base, tmp_path / "with-encoder")
    student = models.build_student(_tiny(prompt_embedding="text_encoder", prompt="lower"), base_model=base)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    ids = tokenizer("lower", padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = CLIPTextModel.from_pretrained(base / "text_encoder")(ids)[0]
    assert torch.equal(student.prompt_embeds, expected) and student.prompt_embeds.any()
    assert student.config.provenance["prompt_embeds"] == f"text encoder of {base}"
    assert student.config.arch["prompt_embedding"] == "text_encoder"

    zeros = models.build_student(_tiny(), base_model=base)  # the explicit choice wins over an encoder
    assert not zeros.prompt_embeds.any() and "zeros" in zeros.config.provenance["prompt_embeds"]


def test_no_text_encoder_is_refused_without_the_explicit_option(tiny_base: Path) -> None:
    with pytest.raises(ConfigError) as info:
        models.build_student(_tiny(prompt_embedding=None))  # no base folder: no text encoder
    message = str(info.value)
    assert "cannot encode the prompt" in message and "without a text encoder" in message
    assert '"prompt_embedding": "zeros"' in message

    with pytest.raises(ConfigError) as info:  # a base folder without text_encoder/ is named
        models.build_student(_tiny(prompt_embedding="text_encoder"), base_model=tiny_base)
    assert str(tiny_base) in str(info.value) and "no text encoder" in str(info.value)

    with pytest.raises(ConfigError, match="'random' only describes checkpoints written before"):
        models.build_student(_tiny(prompt_embedding="random"))
    with pytest.raises(ConfigError, match="prompt_embedding must be 'text_encoder' or 'zeros', not 'noise'"):
        models.build_student(_tiny(prompt_embedding="noise"))


def test_zeros_prompt_embedding_is_deterministic_and_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ctsr.cli import main

    embeddings = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        student = models.build_student(_tiny())
        embeddings.append(student.prompt_embeds.clone())
    assert torch.equal(embeddings[0], embeddings[1])
    assert not embeddings[0].any(), "the 'zeros' embedding is all zeros"
    assert student.config.arch["prompt_embedding"] == "zeros"
    assert "zeros" in student.config.provenance["prompt_embeds"]

    folder = save_student(student, tmp_path / "ckpt")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["arch"]["prompt_embedding"] == "zeros"
    assert "zeros" in saved["provenance"]["prompt_embeds"]
    assert not load_student(folder).prompt_embeds.any()

    assert main(["model", "info", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"]["prompt_embedding"] == "zeros" and "zeros" in info["provenance"]["prompt_embeds"]
    assert info["arch"]["velocity_zero_init"] is True


def test_a_new_config_without_the_options_is_saved_with_them_explicit(tmp_path: Path) -> None:
    config = _tiny(velocity_zero_init=None)
    student = models.build_student(config)
    assert "velocity_zero_init" not in config.arch, "the caller's config is not modified"
    saved = json.loads((save_student(student, tmp_path / "ckpt") / "config.json").read_text())
    assert saved["arch"]["velocity_zero_init"] is True and saved["arch"]["prompt_embedding"] == "zeros"


def _as_written_before_the_options(folder: Path, provenance: dict[str, str] | None = None) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key in ("prompt_embedding", "velocity_zero_init"):
        del data["arch"][key]
    data["provenance"].pop("prompt_embeds", None)
    data["provenance"].update(provenance or {})
    path.write_text(json.dumps(data))


def test_checkpoints_written_before_the_options_keep_their_behaviour_explicitly(tmp_path: Path) -> None:
    """Their stored embedding loads as stored, their velocity keeps the base's conv_out, and the
    loaded config says so (``ctsr model info`` prints it)."""
    student = make_sd21(seed=4)
    folder = save_student(student, tmp_path / "old")
    _as_written_before_the_options(folder)
    old = load_student(folder)
    assert old.config.arch["prompt_embedding"] == "random"
    assert old.config.arch["velocity_zero_init"] is False
    assert torch.equal(old.prompt_embeds, student.prompt_embeds)
    lr = _lr(1)
    with torch.no_grad():
        z0 = old.encode(lr)
        assert torch.equal(z0, student.encode(lr))
        legacy_v = old.velocity(z0)
        # the old velocity: the velocity UNet's whole output, base conv_out included
        old.unet.set_adapter("velocity")
        t = torch.full((1,), old.arch.velocity_timestep, dtype=torch.long)
        assert torch.equal(legacy_v, old.unet(z0, t, old._cond(1, z0.dtype)).sample)
        assert not torch.allclose(legacy_v, student.velocity(z0))
        before = old(lr, 0.7)
        old.prepare_for_inference()
        assert float((old(lr, 0.7) - before).abs().max()) <= 1e-4
    # re-saving writes the options explicitly
    resaved = json.loads((save_student(load_student(folder), tmp_path / "again") / "config.json").read_text())
    assert resaved["arch"]["prompt_embedding"] == "random" and resaved["arch"]["velocity_zero_init"] is False

    encoded = save_student(make_sd21(seed=4), tmp_path / "encoded")
    _as_written_before_the_options(encoded, {"prompt_embeds": "text encoder of /models/sd21"})
    assert load_student(encoded).config.arch["prompt_embedding"] == "text_encoder"


# -- the base's prediction type -----------------------------------------------------------------
def test_unimplemented_prediction_type_is_refused() -> None:
    with pytest.raises(ConfigError, match="prediction_type 'sample' is not implemented"):
        models.build_student(_tiny(prediction_type="sample"))


def test_base_scheduler_prediction_type_is_read_and_checked(tiny_base: Path, tmp_path: Path) -> None:
    sample = _with_scheduler(tiny_base, tmp_path / "sample", prediction_type="sample")
    with pytest.raises(ConfigError) as info:
        models.build_student(_tiny(), base_model=sample)
    assert "prediction_type 'sample'" in str(info.value) and str(sample) in str(info.value)

    v_base = _with_scheduler(tiny_base, tmp_path / "v", prediction_type="v_prediction")
    student = models.build_student(_tiny(), base_model=v_base)
    assert student.config.arch["prediction_type"] == "v_prediction"
    assert student.config.arch["num_train_timesteps"] == 1000

    with pytest.raises(ConfigError, match="prediction_type is 'epsilon' in this config but 'v_prediction'"):
        models.build_student(_tiny(prediction_type="epsilon"), base_model=v_base)

    eps_base = _with_scheduler(tiny_base, tmp_path / "eps", prediction_type="epsilon")
    folder = save_student(models.build_student(_tiny(), base_model=eps_base), tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["arch"]["prediction_type"] == "epsilon"
    with pytest.raises(CheckpointError, match="prediction_type is 'epsilon' in this config but 'v_prediction'"):
        load_student(folder, base_model=v_base)  # trained for another parameterisation

    linear = _with_scheduler(tiny_base, tmp_path / "linear", beta_schedule="linear")
    with pytest.raises(ConfigError, match="beta_schedule 'linear'"):
        models.build_student(_tiny(), base_model=linear)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_one_step_latent_matches_diffusers_for_the_prediction_type(prediction_type: str) -> None:
    """``z0`` is diffusers' own ``pred_original_sample`` for the UNet's output at the fixed timestep."""
    torch.manual_seed(0)
    student = models.build_student(_tiny(prediction_type=prediction_type)).eval()
    perturb_lora(student)
    seen: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        seen["z"], seen["out"] = args[0], output.sample

    handle = student.unet.register_forward_hook(grab)
    with torch.no_grad():
        z0 = student.encode(_lr(1))
    handle.remove()
    a = student.arch
    scheduler = DDPMScheduler(
        num_train_timesteps=a.num_train_timesteps, beta_start=a.beta_start, beta_end=a.beta_end,
        beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False,
    )  # fmt: skip
    expected = scheduler.step(seen["out"], a.timestep, seen["z"]).pred_original_sample
    assert torch.allclose(z0, expected, atol=1e-5, rtol=1e-5)


# -- the velocity starts at zero --------------------------------------------------------------
def test_untrained_velocity_leaves_alpha_without_effect() -> None:
    torch.manual_seed(0)
    student = models.build_student(_tiny()).eval()
    _perturb_student_only(student)  # a trained stage 1, stage 2 not started
    lr = _lr(2)
    with torch.no_grad():
        assert not student.velocity(student.encode(lr)).any()
        sweep = student.sweep(lr, [0, 0.5, 1])
        assert torch.equal(sweep[0], sweep[1]) and torch.equal(sweep[0], sweep[2])
        student.prepare_for_inference()  # fused for serving: still exactly zero
        assert not student.velocity(student.encode(lr)).any()
        fused = student.sweep(lr, [0, 0.5, 1])
    assert torch.equal(fused[0], fused[1]) and torch.equal(fused[0], fused[2])
    assert float((fused[0] - sweep[0]).abs().max()) <= 1e-4


def test_zero_started_velocity_trains_and_fuses() -> None:
    """Stage 2's first step already moves the velocity's output layer; a trained velocity matters
    and the fused student matches the unfused one."""
    torch.manual_seed(0)
    student = models.build_student(_tiny())
    _perturb_student_only(student)
    params = student.trainable_parameters("stage2")
    names = {id(p): n for n, p in student.named_parameters()}
    out_b = [p for p in params if "conv_out.lora_B.velocity" in names[id(p)]]
    assert len(out_b) == 1
    lr = _lr(1)
    with torch.no_grad():
        z0 = student.encode(lr)
    assert not student.velocity(z0).any()
    (student.velocity(z0) - 1).square().mean().backward()  # v is 0, its output layer's gradient is not
    assert out_b[0].grad is not None and out_b[0].grad.abs().sum() > 0

    student.eval()
    with torch.no_grad():
        for p in params:
            if ".lora_B." in names[id(p)]:
                p.normal_(0, 0.1)
        v = student.velocity(z0)
        unfused = student.sweep(lr, [0.0, 1.0])
        assert v.abs().mean() > 1e-3 and float((unfused[0] - unfused[1]).abs().max()) > 1e-2
        student.prepare_for_inference()
        assert float((student.velocity(z0) - v).abs().max()) <= 1e-4
        assert float((student.sweep(lr, [0.0, 1.0]) - unfused).abs().max()) <= 1e-4
