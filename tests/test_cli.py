"""The ``ctsr`` command line, end to end on the real photo, and its one-line errors.

Real subprocesses (``python -m ctsr.cli``) cover what only a process shows (exit status, stderr,
no traceback); the many error cases call ``ctsr.cli.main`` in-process, which is the same code
minus ~2 s of interpreter start-up each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTO, assert_one_line_error, run_cli
from PIL import Image
from safetensors.torch import load_file

from ctsr.cli import alpha_label, main
from models import load_student
from models.imaging import load_image
from models.pipeline import TileRunner, UpscaleJob, Upscaler, finish_images


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ctsr model init --arch compact OUT`` in a real process (the default compact-x4 preset)."""
    out = tmp_path_factory.mktemp("cli") / "model"
    result = run_cli("model", "init", "--arch", "compact", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "compact x4" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "compact"
    assert config["provenance"]["preset"] == "compact-x4"
    assert config["provenance"]["seed"] == 0
    return out


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A folder with a second (RGBA) image and a non-image file that must be skipped."""
    folder = tmp_path / "more"
    folder.mkdir()
    img = Image.open(PHOTO).convert("RGB").crop((10, 10, 40, 30))
    alpha = Image.new("L", img.size, 255)
    alpha.paste(0, (0, 0, 10, 10))
    img.putalpha(alpha)
    img.save(folder / "second.png")
    (folder / "README.txt").write_text("not an image")
    return folder


@pytest.mark.slow
def test_upscale_end_to_end(cli_model: Path, inputs: Path, tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    result = run_cli(
        "upscale", PHOTO, inputs, "-o", outdir, "--model", cli_model,
        "--alpha", "0", "--alpha", "1", "--tile", "48", "--overlap", "16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "wrote 4 image(s)" in result.stdout
    names = sorted(p.name for p in outdir.iterdir())
    assert names == ["second_a0.png", "second_a1.png", "seeding_96x72_a0.png", "seeding_96x72_a1.png"]

    photo = {a: Image.open(outdir / f"seeding_96x72_a{a}.png") for a in ("0", "1")}
    second = {a: Image.open(outdir / f"second_a{a}.png") for a in ("0", "1")}
    for img in photo.values():
        assert img.size == (384, 288) and img.mode == "RGB"
    for img in second.values():
        assert img.size == (120, 80) and img.mode == "RGBA"
        assert (np.asarray(img.getchannel("A"))[:36, :36] == 0).all()
    arrays = {a: np.asarray(img) for a, img in photo.items()}
    assert not np.array_equal(arrays["0"], arrays["1"]), "alpha 0 and alpha 1 must give different images"

    # the files are the library's results for the alpha in their name (same batching as the CLI)
    runner = TileRunner(load_student(cli_model), device="cpu")
    image = load_image(PHOTO)
    (sr,) = Upscaler(runner, tile=48, overlap=16, max_batch=4).run([UpscaleJob(image.rgb, (0.0, 1.0))])
    expected = [np.asarray(pil) for pil in finish_images(image, sr)]
    for label, want, other in (("0", expected[0], expected[1]), ("1", expected[1], expected[0])):
        got = arrays[label].astype(int)
        assert np.abs(got - want).max() <= 1
        assert np.abs(got - want).sum() < np.abs(got - other).sum(), f"_a{label} holds the other alpha"


def _corrupt_model(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    data = (dest / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[: len(data) // 3])
    return dest


def test_upscale_with_bad_model_is_one_line(small_compact_ckpt: Path, tmp_path: Path) -> None:
    bad = _corrupt_model(small_compact_ckpt, tmp_path / "bad-model")
    result = run_cli("upscale", PHOTO, "-o", tmp_path / "out", "--model", bad)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "corrupt safetensors file", str(bad))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- errors, in-process -----------------------------------------------------------------------
def _tiny_png(path: Path) -> Path:
    Image.open(PHOTO).convert("RGB").crop((0, 0, 20, 16)).save(path)
    return path


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    assert main([str(a) for a in argv]) == 1
    captured = capsys.readouterr()
    return assert_one_line_error(captured.err, *fragments)


def test_upscale_input_errors(small_compact_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    model = ["--model", small_compact_ckpt]
    text = tmp_path / "notes.png"
    text.write_text("this is not a PNG")
    _fails(capsys, ["upscale", text, "-o", out, *model], "not a readable image", str(text))
    _fails(capsys, ["upscale", tmp_path / "missing.jpg", "-o", out, *model], "no such file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(capsys, ["upscale", empty, "-o", out, *model], "holds no images")
    # inputs are checked before the model is loaded: a missing model does not mask a bad image
    _fails(capsys, ["upscale", text, "-o", out, "--model", tmp_path / "no-model"], "not a readable image")
    _fails(capsys, ["upscale", PHOTO, "-o", out, "--model", tmp_path / "no-model"], "checkpoint folder not found")
    _fails(capsys, ["upscale", PHOTO, "-o", out, *model, "--max-pixels", "1000"], "over the limit of 1000")
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(PHOTO, twin / "seeding_96x72.png")
    _fails(capsys, ["upscale", PHOTO, twin, "-o", out, *model], "same file name stem")
    _fails(capsys, ["upscale", PHOTO, "-o", out, *model, "--alpha", "0.1231", "--alpha", "0.1234"], "repeat")
    assert not out.exists()


def test_upscale_option_errors(small_compact_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = _tiny_png(tmp_path / "tiny.png")
    base = ["upscale", image, "-o", tmp_path / "out", "--model", small_compact_ckpt]
    # an explicit overlap must stay under half a tile (the default shrinks to tile/4 by itself)
    _fails(capsys, [*base, "--tile", "48", "--overlap", "24"], "overlap 24 must be less than half the tile (48)")
    _fails(capsys, [*base, "--device", "cpu", "--dtype", "fp16"], "fp16 is not supported on CPU")
    _fails(capsys, [*base, "--device", "tpu"], "unknown device 'tpu'")
    _fails(capsys, [*base, "--device", "mps"], "unsupported device 'mps'")
    if not torch.cuda.is_available():
        _fails(capsys, [*base, "--device", "cuda"], "cuda", "no CUDA GPU")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
        (["--alpha", "nan"], "alpha must be in [0, 1]"),
        (["--alpha", "high"], "not a number"),
        (["--tile", "-8"], "must be >= 0"),
        (["--batch", "0"], "must be >= 1"),
        (["--color-fix", "sepia"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["upscale", str(PHOTO), "-o", str(tmp_path / "out"), *option])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert message in err.strip().splitlines()[-1]


def test_upscale_without_model_explains_a_missing_bundled_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("models.presets.BUNDLED_MODEL", tmp_path / "not-installed")
    _fails(capsys, ["upscale", str(PHOTO), "-o", str(tmp_path / "out")], "bundled model", "--model")


def test_existing_outputs_need_overwrite(
    small_compact_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _tiny_png(tmp_path / "tiny.png")
    out = tmp_path / "out"
    argv = ["upscale", str(image), "-o", str(out), "--model", str(small_compact_ckpt), "--tile", "0"]
    argv += ["--alpha", "0.25", "--alpha", "0.5"]
    assert main(argv) == 0
    assert "wrote 2 image(s)" in capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert names == ["tiny_a0.25.png", "tiny_a0.5.png"]
    first = (out / "tiny_a0.5.png").stat().st_mtime_ns

    _fails(capsys, argv, "exists (and 1 more)", "--overwrite")
    assert (out / "tiny_a0.5.png").stat().st_mtime_ns == first
    assert main([*argv, "--overwrite"]) == 0
    assert Image.open(out / "tiny_a0.5.png").size == (80, 64)


def test_upscale_16bit_png(small_compact_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grey = (np.asarray(Image.open(PHOTO).convert("L").crop((0, 0, 20, 16)), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "grey16.png"), "-o", str(out), "--model", str(small_compact_ckpt)]) == 0
    result = Image.open(out / "grey16_a0.5.png")
    assert result.mode == "I;16" and result.size == (80, 64)


@pytest.mark.parametrize(
    "case",
    [
        "output is a file",
        "init into a file",
        "--base with a compact model",
    ],
)
def test_user_mistakes_never_give_a_traceback(
    small_compact_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    image = _tiny_png(tmp_path / "tiny.png")
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = {
        "output is a file": ["upscale", image, "-o", afile, "--model", small_compact_ckpt, "--tile", "0"],
        "init into a file": ["model", "init", "--arch", "compact", afile],
        "--base with a compact model": [
            "upscale", image, "-o", tmp_path / "out", "--model", small_compact_ckpt, "--base", tmp_path,
        ],
    }[case]  # fmt: skip
    _fails(capsys, argv)
    assert afile.read_text() == "x"


def test_alpha_label() -> None:
    assert [alpha_label(a) for a in (0.0, 1.0, 0.5, 0.125, 0.3333)] == ["0", "1", "0.5", "0.125", "0.333"]


# -- model init / info ------------------------------------------------------------------------
@pytest.mark.slow
def test_model_init_sd21_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sd21"
    assert main(["model", "init", "--arch", "sd21", "--preset", "sd21-tiny", "--seed", "3", str(out)]) == 0
    assert "sd21 x4" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["adapters.safetensors", "base.safetensors", "config.json"]
    student = load_student(out)
    assert student.family == "sd21"
    assert student.config.provenance["preset"] == "sd21-tiny" and student.config.provenance["seed"] == 3
    with torch.no_grad():
        assert student(torch.rand(1, 3, 8, 8), 0.5).shape == (1, 3, 32, 32)

    assert main(["model", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd21" and info["files"] == ["adapters.safetensors", "base.safetensors"]
    assert info["parameters"] > 0 and info["stored_tensors"] > 0


def test_model_init_is_seeded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert main(["model", "init", "--arch", "compact", "--seed", seed, str(tmp_path / name)]) == 0
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_model_init_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    _fails(capsys, ["model", "init", "--arch", "compact", taken], "not empty", "--overwrite")
    assert (taken / "file").exists()
    _fails(capsys, ["model", "init", "--arch", "compact", "--preset", "sd21-tiny", tmp_path / "x"], "is for sd21")
    _fails(capsys, ["model", "init", "--arch", "compact", "--base", tmp_path, tmp_path / "x"], "--base only applies")
    _fails(capsys, ["model", "init", "--arch", "compact", "--preset", "compact-x5", tmp_path / "x"], "unknown preset")
    _fails(
        capsys, ["model", "init", "--arch", "sd21", "--preset", "sd21-tiny", "--base", tmp_path / "nb", tmp_path / "x"],
        "sd21 base model not found", "unet/config.json",
    )  # fmt: skip
    _fails(capsys, ["model", "info", tmp_path / "nothing"], "checkpoint folder not found")
    assert not (tmp_path / "x").exists()
    assert main(["model", "init", "--arch", "compact", "--overwrite", str(taken)]) == 0
    assert (taken / "config.json").is_file() and not (taken / "file").exists()


def test_worker_with_its_metrics_port_taken_says_so_in_one_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"CTSR_REDIS_URL": "redis://127.0.0.1:1/0", "CTSR_WORKER_METRICS_PORT": str(port)}
        done = run_cli("worker", env=env)
    assert done.returncode != 0
    assert_one_line_error(done.stderr, f"127.0.0.1:{port}", "CTSR_WORKER_METRICS_PORT")
