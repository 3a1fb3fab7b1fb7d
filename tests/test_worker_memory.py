"""The worker fixes glibc's mmap threshold, so mid-sized tensors freed by one job go back to the
system instead of growing a fragmented heap (``worker/memory.py``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

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


def test_a_fixed_threshold_keeps_mid_sized_blocks_out_of_the_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 (glibc >= 2.33)
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    assert not _mmapped(0), "glibc's adaptive default serves the 8 MB block from the heap"
    assert _mmapped(4)


def test_the_engine_applies_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import engine

    seen: list[int] = []
    monkeypatch.setattr(engine, "fix_mmap_threshold", seen.append)
    monkeypatch.setattr(engine, "load_student", lambda path: (_ for _ in ()).throw(RuntimeError("stop")))
    from ctsr.settings import Settings

    with pytest.raises(RuntimeError, match="stop"):
        engine.BatchEngine(Settings(malloc_mmap_threshold_mb=7))
    assert seen == [7]
