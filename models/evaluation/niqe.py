"""NIQE (Mittal, Soundararajan & Bovik 2013, "Making a completely blind image quality analyzer").

No-reference "naturalness": the distance between a multivariate Gaussian fitted to the image's
local natural-scene statistics and one fitted (by the authors) to pristine photos. Lower is more
natural. The algorithm follows the authors' MATLAB release step by step, so scores are comparable
with the numbers SR papers print:

1. luma = MATLAB ``rgb2ycbcr`` Y rounded to 8 bits, ``crop_border`` dropped, then cut down to a
   whole number of 96×96 blocks;
2. at two scales (the second a MATLAB ``imresize(…, 0.5)``, bicubic with antialiasing), MSCN
   coefficients (x − μ) / (σ + 1) with a 7×7 Gaussian window (sigma 7/6, replicate borders);
3. per block, 18 features: an AGGD fit of the MSCN values and of their products with the four
   neighbours (horizontal, vertical, two diagonals; circular within the block), by moment matching
   over the shape grid 0.2:0.001:10;
4. the mean (nanmean) and covariance (rows without NaN) of the 36-dim block features, and the
   distance sqrt(dᵀ pinv((Σ_pristine + Σ_image) / 2) d) with d the difference of the means.

The pristine model (a 36-dim mean and 36×36 covariance) is the authors' published one. It is not
shipped here: :func:`load_niqe_params` takes it from an explicit path or ``$CTSR_NIQE_PARAMS``,
else from the cache, else fetches it once from PyPI, from the ``basicsr-1.4.2`` sdist, which carries
it as ``basicsr/metrics/niqe_pris_params.npz`` (sdist checked against PyPI's sha256, the npz
against a pinned one).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ImageError
from .metrics import ImageLike, crop, rgb_to_y, to_uint8

BLOCK_SIZE = 96
NIQE_WINDOW = 7
NIQE_SIGMA = 7 / 6
NIQE_C = 1.0
#: |x − μ| below this (grey levels) is float noise of a flat window, not signal; see :func:`mscn`.
FLAT_TOLERANCE = 1e-8
FEATURES = 36

ENV_PARAMS = "CTSR_NIQE_PARAMS"
ENV_CACHE_DIR = "CTSR_CACHE_DIR"
BASICSR_VERSION = "1.4.2"
#: Tried in order: the per-version JSON document, then the project one (its ``releases`` table).
PYPI_JSON_URLS = (
    f"https://pypi.org/pypi/basicsr/{BASICSR_VERSION}/json",
    "https://pypi.org/pypi/basicsr/json",
)
NPZ_MEMBER_SUFFIX = "/basicsr/metrics/niqe_pris_params.npz"
NPZ_SHA256 = "2a7c182a68c9e7f1b2e2e5ec723279d6f65d912b6fcaf37eb2bf03d7367c4296"
PARAMS_FILENAME = f"niqe_pris_params-basicsr-{BASICSR_VERSION}.npz"
MAX_SDIST_BYTES = 20 * 1024 * 1024
#: Pauses between the tries of one download; only a timeout, a dropped connection or a 5xx/429 is retried.
RETRY_DELAYS_S = (1.0, 4.0)


# -- pristine model -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NIQEParams:
    """The pristine multivariate Gaussian: ``mu`` [36] and ``cov`` [36, 36], float64."""

    mu: np.ndarray
    cov: np.ndarray


def cache_dir() -> Path:
    """``$CTSR_CACHE_DIR`` or ``~/.cache/ctsr``: where fetched files are kept between runs."""
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "ctsr")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _transient(exc: OSError) -> bool:
    """Worth another try: a timeout, a refused or dropped connection, or the server's 5xx/429."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return True


def _read_url(url: str, timeout: float, limit: int = MAX_SDIST_BYTES) -> bytes:
    """GET ``url`` (https or file), refusing bodies over ``limit`` bytes. Tests monkeypatch this.

    An http(s) GET is tried again after :data:`RETRY_DELAYS_S` when it fails transiently: one slow
    answer from PyPI's CDN should not cost an evaluation its NIQE column.
    """
    delays = RETRY_DELAYS_S if url.startswith(("http://", "https://")) else ()
    for delay in (*delays, None):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data: bytes = response.read(limit + 1)
            break
        except OSError as exc:
            if delay is None or not _transient(exc):
                raise
            time.sleep(delay)
    if len(data) > limit:
        raise ValueError(f"{url} is larger than {limit} bytes")
    return data


def _sdist_entry(json_urls: tuple[str, ...], timeout: float) -> dict[str, Any]:
    """The PyPI file record (url, digests) of the basicsr sdist, from the first JSON that answers."""
    errors = []
    for url in json_urls:
        try:
            meta = json.loads(_read_url(url, timeout))
        except (OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
            continue
        files = meta.get("releases", {}).get(BASICSR_VERSION)
        if files is None and meta.get("info", {}).get("version") == BASICSR_VERSION:
            files = meta.get("urls")
        for entry in files or []:
            if entry.get("packagetype") == "sdist" and entry.get("filename", "").endswith(".tar.gz"):
                record: dict[str, Any] = entry
                return record
        errors.append(f"{url}: no basicsr {BASICSR_VERSION} sdist listed")
    raise ValueError("; ".join(errors))


def _extract_npz(sdist: bytes) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(NPZ_MEMBER_SUFFIX):
                handle = tar.extractfile(member)
                if handle is not None:
                    return handle.read()
    raise ValueError(f"the sdist has no *{NPZ_MEMBER_SUFFIX}")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file + rename, so concurrent workers never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_niqe_params(
    directory: str | os.PathLike[str] | None = None,
    *,
    json_urls: tuple[str, ...] | None = None,
    npz_sha256: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download the pristine-model npz from the basicsr sdist on PyPI into ``directory`` (the cache).

    ``json_urls`` and ``npz_sha256`` default to :data:`PYPI_JSON_URLS` and :data:`NPZ_SHA256`.
    Returns the cached file's path. Raises :class:`ConfigError` (one line) when it cannot be fetched
    or does not verify.
    """
    json_urls = PYPI_JSON_URLS if json_urls is None else json_urls
    npz_sha256 = NPZ_SHA256 if npz_sha256 is None else npz_sha256
    target = Path(directory) if directory is not None else cache_dir()
    target = target / PARAMS_FILENAME
    try:
        entry = _sdist_entry(json_urls, timeout)
        sdist = _read_url(entry["url"], timeout)
        expected = entry.get("digests", {}).get("sha256")
        if not expected or _sha256(sdist) != expected:
            raise ValueError(f"{entry.get('filename')} does not match PyPI's sha256")
        npz = _extract_npz(sdist)
        if _sha256(npz) != npz_sha256:
            raise ValueError(f"its niqe_pris_params.npz has sha256 {_sha256(npz)}, expected {npz_sha256}")
        _atomic_write(target, npz)
    except (OSError, ValueError, KeyError, tarfile.TarError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(
            f"cannot fetch the NIQE pristine model from PyPI (basicsr {BASICSR_VERSION} sdist): {reason}; "
            f"set {ENV_PARAMS} to a local niqe_pris_params.npz instead"
        ) from None
    return target


def _read_params(path: Path) -> NIQEParams:
    try:
        with np.load(path, allow_pickle=False) as data:
            mu = np.asarray(data["mu_pris_param"], dtype=np.float64).reshape(-1)
            cov = np.asarray(data["cov_pris_param"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot read NIQE parameters from {path}: {' '.join(str(exc).split())}") from None
    if mu.shape != (FEATURES,) or cov.shape != (FEATURES, FEATURES):
        raise ConfigError(f"NIQE parameters in {path} have shapes {mu.shape} and {cov.shape}, expected (36,), (36, 36)")
    return NIQEParams(mu=mu, cov=cov)


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int) -> NIQEParams:
    return _read_params(Path(path))


def load_niqe_params(path: str | os.PathLike[str] | None = None, *, fetch: bool = True) -> NIQEParams:
    """The pristine model from ``path``, else ``$CTSR_NIQE_PARAMS``, else the cache (fetched if missing).

    A cached file that fails its pinned sha256 is fetched again; an explicit file is trusted as is
    (it may be a re-export of the authors' ``modelparameters.mat``), only its shapes are checked.
    """
    explicit = path if path is not None else os.environ.get(ENV_PARAMS) or None
    if explicit is not None:
        resolved = Path(explicit)
        if not resolved.is_file():
            raise ConfigError(f"NIQE parameter file {resolved} does not exist")
    else:
        resolved = cache_dir() / PARAMS_FILENAME
        if not (resolved.is_file() and _sha256(resolved.read_bytes()) == NPZ_SHA256):
            if not fetch:
                raise ConfigError(f"NIQE parameters are not cached at {resolved} (and fetching is off)")
            resolved = fetch_niqe_params()
    return _load_cached(str(resolved.resolve()), resolved.stat().st_mtime_ns)


# -- MATLAB imresize (bicubic, antialiased) ------------------------------------------------------
def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    near = (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    weights: np.ndarray = near + far
    return weights


@functools.lru_cache(maxsize=32)
def _resize_taps(in_len: int, out_len: int, scale: float, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based source indices, both [out, taps], of MATLAB's ``imresize`` along one axis.

    Out-of-range taps are mirrored with the edge repeated (MATLAB's index sequence 1..n, n..1, …).
    """
    shrink = scale < 1 and antialias
    width = 4.0 / scale if shrink else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in 1-based input coordinates
    left = np.floor(u - width / 2)
    idx = left[:, None] + np.arange(math.ceil(width) + 2)[None, :]
    dist = u[:, None] - idx
    weights = scale * _cubic(dist * scale) if shrink else _cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    j = np.mod(idx.astype(np.int64) - 1, 2 * in_len)
    return weights, np.where(j < in_len, j, 2 * in_len - 1 - j)


def _resize_axis0(img: np.ndarray, out_len: int, scale: float, antialias: bool) -> np.ndarray:
    weights, index = _resize_taps(img.shape[0], out_len, scale, antialias)
    shape = (out_len,) + (1,) * (img.ndim - 1)
    out = np.zeros((out_len, *img.shape[1:]), dtype=np.float64)
    for t in range(weights.shape[1]):  # a handful of taps: cheaper than a dense [out, in] matrix
        out += weights[:, t].reshape(shape) * img[index[:, t]]
    return out


def imresize(img: np.ndarray, scale: float, antialias: bool = True) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (bicubic) of a float [H, W] or [H, W, C] array, not rounded.

    Output size is ceil(H·scale) × ceil(W·scale), as in MATLAB. torch's bicubic differs (a = −0.75,
    no antialiasing, other borders), which would shift NIQE's second-scale features.
    """
    h, w = img.shape[:2]
    rows = _resize_axis0(img.astype(np.float64), math.ceil(h * scale), float(scale), antialias)
    cols = _resize_axis0(np.swapaxes(rows, 0, 1), math.ceil(w * scale), float(scale), antialias)
    return np.ascontiguousarray(np.swapaxes(cols, 0, 1))


# -- features -------------------------------------------------------------------------------------
def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    kernel: np.ndarray = k / k.sum()
    return kernel


def _filter_replicate(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Separable same-size correlation with replicated borders (MATLAB ``imfilter(…, 'replicate')``)."""
    r = len(k) // 2
    h, w = img.shape
    padded = np.pad(img, r, mode="edge")
    rows = sum(k[i] * padded[i : i + h, :] for i in range(len(k)))
    out: np.ndarray = sum(k[i] * rows[:, i : i + w] for i in range(len(k)))
    return out


def mscn(img: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients (Eq. 1), 7×7 Gaussian window, C = 1.

    In a flat window x − μ is 0 mathematically but ±1e-13 after filtering, and the AGGD fit counts
    signs: such noise would put every flat pixel on one side or the other at random. Differences
    below :data:`FLAT_TOLERANCE` grey levels are therefore snapped to 0, which the fit then skips,
    as the reference intends (its float32 filtering happens to give exact zeros there).
    """
    k = _gaussian_1d(NIQE_WINDOW, NIQE_SIGMA)
    mu = _filter_replicate(img, k)
    sigma = np.sqrt(np.abs(_filter_replicate(img * img, k) - mu * mu))
    centred = img - mu
    centred[np.abs(centred) < FLAT_TOLERANCE] = 0.0
    normalised: np.ndarray = centred / (sigma + NIQE_C)
    return normalised


@functools.lru_cache(maxsize=1)
def _aggd_grid() -> tuple[np.ndarray, ...]:
    """Shape grid 0.2:0.001:10 with r(γ) = Γ(2/γ)² / (Γ(1/γ) Γ(3/γ)) and the two Γ ratios used later."""
    gam = np.arange(0.2, 10.001, 0.001)
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    lg1, lg2, lg3 = lg(1 / gam), lg(2 / gam), lg(3 / gam)
    r_gam = np.exp(2 * lg2 - lg1 - lg3)
    return gam, r_gam, np.exp(0.5 * (lg1 - lg3)), np.exp(lg2 - lg1)


def _nearest_on_grid(r_gam: np.ndarray, values: np.ndarray) -> np.ndarray:
    """argmin (r_gam − v)² per value (r_gam is increasing); NaN → index 0, like MATLAB's ``min``."""
    hi = np.clip(np.searchsorted(r_gam, values), 1, len(r_gam) - 1)
    lo = hi - 1
    pick_lo = (values - r_gam[lo]) ** 2 <= (r_gam[hi] - values) ** 2
    idx = np.where(pick_lo, lo, hi)
    return np.where(np.isnan(values), 0, idx)


def aggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching AGGD fit of each row of ``x`` [N, n]: (alpha, beta_l, beta_r, grid index).

    A row without negative (or positive) values gets NaN betas, as in the reference; the MVG fit
    then skips it for the covariance.
    """
    gam, r_gam, beta_ratio, _ = _aggd_grid()
    neg, pos = x < 0, x > 0
    sq = x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        left_std = np.sqrt((sq * neg).sum(1) / neg.sum(1))
        right_std = np.sqrt((sq * pos).sum(1) / pos.sum(1))
        gammahat = left_std / right_std
        rhat = np.abs(x).mean(1) ** 2 / sq.mean(1)
        rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
    idx = _nearest_on_grid(r_gam, rhatnorm)
    return gam[idx], left_std * beta_ratio[idx], right_std * beta_ratio[idx], idx


#: (row, column) circular shifts giving the horizontal, vertical and two diagonal neighbours.
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


def block_features(blocks: np.ndarray) -> np.ndarray:
    """The 18 NIQE features of each MSCN block in ``blocks`` [N, h, w] → [N, 18]."""
    n = blocks.shape[0]
    alpha, beta_l, beta_r, _ = aggd_fit(blocks.reshape(n, -1))
    feats = [alpha, (beta_l + beta_r) / 2]
    mean_ratio = _aggd_grid()[3]
    for shift in _SHIFTS:
        pairs = blocks * np.roll(blocks, shift, axis=(1, 2))
        alpha, beta_l, beta_r, idx = aggd_fit(pairs.reshape(n, -1))
        feats += [alpha, (beta_r - beta_l) * mean_ratio[idx], beta_l, beta_r]
    return np.stack(feats, axis=1)


def _blocks(img: np.ndarray, size: int) -> np.ndarray:
    nh, nw = img.shape[0] // size, img.shape[1] // size
    return img[: nh * size, : nw * size].reshape(nh, size, nw, size).transpose(0, 2, 1, 3).reshape(-1, size, size)


def niqe_features(y: np.ndarray, block_size: int = BLOCK_SIZE) -> np.ndarray:
    """Per-block 36-dim features ([N, 36]) of a luma image on the 0..255 scale (two scales)."""
    nh, nw = y.shape[0] // block_size, y.shape[1] // block_size
    if nh == 0 or nw == 0:
        raise ImageError(f"NIQE needs at least {block_size}x{block_size} pixels (after cropping), got {y.shape}")
    img = y[: nh * block_size, : nw * block_size].astype(np.float64)
    scale1 = block_features(_blocks(mscn(img), block_size))
    half = imresize(img / 255.0, 0.5) * 255.0
    scale2 = block_features(_blocks(mscn(half), block_size // 2))
    return np.concatenate([scale1, scale2], axis=1)


def niqe_distance(features: np.ndarray, params: NIQEParams) -> float:
    """Eq. 10: the distance between the image's MVG (nanmean, cov of NaN-free rows) and the pristine one.

    With a single usable block the image covariance is taken as zero (no spread to estimate).
    """
    mu = np.nanmean(features, axis=0)
    rows = features[~np.isnan(features).any(axis=1)]
    cov = np.cov(rows, rowvar=False) if len(rows) > 1 else np.zeros((FEATURES, FEATURES))
    d = params.mu - mu
    return float(np.sqrt(d @ np.linalg.pinv((params.cov + cov) / 2) @ d))


def niqe_y(y: np.ndarray, params: NIQEParams, block_size: int = BLOCK_SIZE) -> float:
    """NIQE of an already cropped, 8-bit-rounded luma image."""
    return niqe_distance(niqe_features(y, block_size), params)


def niqe(
    img: ImageLike,
    crop_border: int = 0,
    params: NIQEParams | str | os.PathLike[str] | None = None,
    block_size: int = BLOCK_SIZE,
) -> float:
    """NIQE of an image (lower = more natural); see the module docstring for accepted inputs.

    ``params``: a loaded :class:`NIQEParams`, a path to an npz, or None for :func:`load_niqe_params`.
    """
    if not isinstance(params, NIQEParams):
        params = load_niqe_params(params)
    y = rgb_to_y(crop(to_uint8(img), crop_border))
    return niqe_y(np.floor(y + 0.5), params, block_size)  # MATLAB's uint8 Y: round half away from zero
