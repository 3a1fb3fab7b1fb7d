"""The worker fixes glibc's mmap threshold and trims the heap after forward passes that leave much
of it free, so memory freed by one job goes back to the system instead of growing a fragmented
heap, while tile-sized tensors still come from the heap (``worker/memory.py``)."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from models.imaging import load_image

PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, sys
    from worker.memory import fix_mmap_threshold

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] != "0":
        assert fix_mmap_threshold(int(sys.argv[1]))
    libc.free(libc.malloc(16 << 20))  # glibc's default now raises its threshold to 16 MB
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(8 << 20)
    print(libc.mallinfo2().hblkhd - before >= 8 << 20)  # was the 8 MB block mmapped?
    libc.free(block)
    """
)


def _mmapped(threshold_mb: int) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, str(threshold_mb)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


def _needs_glibc() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 (glibc >= 2.33)
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")


def test_a_fixed_threshold_decides_which_blocks_are_mmapped() -> None:
    _needs_glibc()
    assert not _mmapped(0), "glibc's adaptive default serves the 8 MB block from the heap"
    assert _mmapped(4)
    assert not _mmapped(32), "the worker's default keeps tile-sized blocks in the heap"


TRIM_PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util
    from worker.memory import fix_mmap_threshold, release_free_memory

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert fix_mmap_threshold(32)
    blocks = [libc.malloc(1 << 20) for _ in range(64)]  # 64 MB in the heap, below the threshold
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
    pin = libc.malloc(2 << 20)  # above them (too big for a free bin): their free space is a hole, not the top
    for b in blocks:
        libc.free(b)
    held = rss_mb()
    assert not release_free_memory(above_mb=128)  # 64 MB free: under the bar, kept
    assert held - rss_mb() < 8
    assert release_free_memory(above_mb=32)
    print(held - rss_mb())
    """
)


def test_release_gives_freed_heap_pages_back() -> None:
    _needs_glibc()
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) > 48, f"only {out.stdout.strip()} MB went back"


def test_the_engine_offers_a_trim_after_every_forward_pass(
    monkeypatch: pytest.MonkeyPatch, small_compact_ckpt: Path
) -> None:
    _needs_glibc()
    from ctsr.contract import JobPayload
    from ctsr.settings import Settings
    from worker import engine

    trims: list[int] = []
    monkeypatch.setattr(engine, "release_free_memory", lambda above_mb: trims.append(above_mb) or True)
    runner = engine.BatchEngine(
        Settings(redis_url=None, model=small_compact_ckpt, tile=32, max_batch=1, warmup=False, worker_metrics_port=0)
    )
    buf = io.BytesIO()
    Image.new("RGB", (64, 40), (90, 120, 30)).save(buf, "PNG")
    runner.run([(JobPayload("job", [0.5]), load_image(buf.getvalue()))])
    assert runner.forward_passes > 1
    assert trims == [engine.TRIM_ABOVE_MB] * runner.forward_passes


def test_the_engine_applies_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import engine

    seen: list[int] = []
    monkeypatch.setattr(engine, "fix_mmap_threshold", seen.append)
    monkeypatch.setattr(engine, "load_student", lambda path: (_ for _ in ()).throw(RuntimeError("stop")))
    from ctsr.settings import Settings

    with pytest.raises(RuntimeError, match="stop"):
        engine.BatchEngine(Settings(malloc_mmap_threshold_mb=7))
    assert seen == [7]
