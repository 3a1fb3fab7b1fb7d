"""``ctsr model calibrate``: alpha = 1 moved to where the trained path's PSNR peaks on training pairs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import PHOTO, assert_one_line_error, compact_config, make_compact

import models
from ctsr.cli import main
from models.errors import ConfigError
from models.training.calibrate import calibrate, path_positions
from models.training.config import TrainConfig
from models.training.pairs import PairSet, PairSpec, make_pairs
from models.training.stages import build_stage


class Line(models.CTSRStudent):
    """A path whose PSNR peak is known: ``z0`` is the LR image, ``v`` adds ``step`` to every pixel
    and decoding is nearest upscaling, so the path meets a photo brightened by ``b`` at ``b / step``."""

    family = "line"

    def __init__(self, step: float = 0.1) -> None:
        super().__init__(compact_config())
        self.step = torch.nn.Parameter(torch.tensor(step))

    def encode(self, lr: torch.Tensor) -> torch.Tensor:
        return lr

    def velocity(self, z0: torch.Tensor) -> torch.Tensor:
        return torch.full_like(z0, float(self.step))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(z, scale_factor=self.scale, mode="nearest")

    def trainable_parameters(self, stage: str, decoder: bool = False, encoder: bool = False) -> list[Any]:
        return [self.step]

    @classmethod
    def build(cls, config: Any, folder: Path | None = None, **options: Any) -> Line:
        return cls()

    def state_files(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def load_state_files(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        pass


def brightened_pairs(name: str, brighten: float) -> PairSet:
    """Pairs whose HR is the nearest-upscaled LR plus ``brighten`` (no clipping: LR in [.2, .7])."""
    lr = (torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 0.5 + 0.2) * 255
    hr = F.interpolate(lr + brighten * 255, scale_factor=4, mode="nearest")
    as_u8 = lambda x: x.round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    return PairSet(Path(name), as_u8(hr), as_u8(lr), PairSpec(count=6, hr_size=32), name, frozenset())


def test_calibration_finds_each_folders_peak_and_takes_the_earliest() -> None:
    student = Line()
    student.config.path_end = 0.3  # an earlier calibration is ignored (the raw path is scanned) and kept
    result = calibrate(student, [brightened_pairs("a", 0.06), brightened_pairs("b", 0.09)], step=0.05)
    assert student.config.path_end == 0.3
    assert result.peaks == {"a": 0.6, "b": 0.9} and result.path_end == 0.6
    peak = result.positions.index(0.6)
    steps = [y - x for x, y in itertools.pairwise(result.psnr["a"])]
    assert all(d > 0 for d in steps[:peak]) and all(d < 0 for d in steps[peak:])  # rises to the peak, then falls
    assert result.pairs_used == 12
    # a path that only gets better towards its end stays as it is
    assert calibrate(Line(), [brightened_pairs("c", 0.12)], step=0.1).path_end == 1.0


def test_calibration_refuses_what_it_cannot_scan() -> None:
    with pytest.raises(ConfigError, match="divide 1 evenly"):
        path_positions(0.3)
    with pytest.raises(ConfigError, match="at least one"):
        calibrate(Line(), [])
    with pytest.raises(ConfigError, match="distinct names"):
        calibrate(Line(), [brightened_pairs("a", 0.06), brightened_pairs("a", 0.09)])
    other = brightened_pairs("x2", 0.06)
    other.spec = PairSpec(count=6, hr_size=32, scale=2)
    with pytest.raises(ConfigError, match="x2, the student is x4"):
        calibrate(Line(), [other])


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pairs") / "pairs"
    make_pairs([PHOTO], PairSpec(count=6, hr_size=32, seed=3, photo_scales=(1.0,)), folder, workers=1)
    return folder


def test_ctsr_model_calibrate_writes_a_calibrated_copy_and_training_from_it_starts_uncut(
    pairs_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a small random compact's path gains PSNR towards t = 1 (13.29 → 13.37 dB on these pairs);
    # with its velocity reversed it loses PSNR from the first step, so the peak is the first position
    away = models.save_student(make_compact(velocity_gain=-30.0), tmp_path / "away")
    out = tmp_path / "calibrated"
    args = ["model", "calibrate", str(away), "--pairs", str(pairs_folder), "-o", str(out)]
    assert main([*args, "--step", "0.25"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0].split() == ["position", "pairs"] and [line.split()[0] for line in said[1:5]] == [
        "0.250", "0.500", "0.750", "1.000",
    ]  # fmt: skip
    assert said[1].endswith("*") and said[-1].endswith(f"alpha = 1 now decodes path position 0.25; wrote {out}")
    config = json.loads((out / "config.json").read_text())
    record = config["provenance"]["path_end_calibration"]
    assert config["path_end"] == record["path_end"] == record["peaks"]["pairs"] == 0.25
    assert record["pairs_used"] == 6 and record["positions"] == [0.25, 0.5, 0.75, 1.0]
    psnr = record["psnr"]["pairs"]
    assert psnr == sorted(psnr, reverse=True)
    source, written = models.load_student(away).state_dict(), models.load_student(out).state_dict()
    assert source.keys() == written.keys() and all(torch.equal(source[k], written[k]) for k in source)

    # an existing output is kept unless --overwrite; a file is never a checkpoint; a bad step fails first
    assert main(args) == 1
    assert_one_line_error(capsys.readouterr().err, "is not empty", "--overwrite")
    (tmp_path / "file").write_text("x")
    assert main([*args[:-1], str(tmp_path / "file"), "--overwrite"]) == 1
    assert_one_line_error(capsys.readouterr().err, "is not a folder")
    assert main([*args[:-1], str(tmp_path / "new"), "--step", "0.3"]) == 1
    assert_one_line_error(capsys.readouterr().err, "divide 1 evenly")

    # where the path peaks at its end, an earlier cut is dropped
    toward = make_compact(velocity_gain=30.0)
    toward.config.path_end = 0.5
    models.save_student(toward, tmp_path / "toward")
    assert main(["model", "calibrate", str(tmp_path / "toward"), "--pairs", str(pairs_folder), "-o",
                 str(tmp_path / "uncut"), "--step", "0.25"]) == 0  # fmt: skip
    assert "alpha = 1 decodes the path's end (was 0.5)" in capsys.readouterr().out
    assert "path_end" not in json.loads((tmp_path / "uncut" / "config.json").read_text())

    # training from a calibrated checkpoint trains the raw path, so the cut is dropped
    config_train = TrainConfig(stage="stage2", pairs=str(pairs_folder), output=str(tmp_path / "t"), init=str(out),
                               fidelity_teacher="unused", device="cpu", loss={"reconstruction": 1.0})  # fmt: skip
    stage = build_stage(config_train)
    assert stage.student.config.path_end is None  # type: ignore[attr-defined]
    assert stage.student.config.provenance["path_end_before_training"] == 0.25  # type: ignore[attr-defined]
