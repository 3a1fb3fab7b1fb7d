"""Child processes of ``ctsr serve`` that are restarted when they die and die with their parent.

Each :class:`Supervised` child runs in a thread of its own that starts it, waits for it and, while
the stack is up, starts it again after a back-off (1, 2, 4 … 30 s). A child that keeps dying
(``max_restarts`` within ``window_s``), or that dies before it ever became ready, stops the stack
with one clear line instead of looping. Children get ``PR_SET_PDEATHSIG`` (Linux): a ``kill -9``
of ``ctsr serve`` sends them SIGTERM instead of leaving orphans. The kernel ties that signal to the
*thread* that forked the child, so each child is forked by its own long-lived thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("ctsr.serve")

PR_SET_PDEATHSIG = 1
BACKOFF_MAX_S = 30.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervised:
    def __init__(
        self,
        name: str,
        command: Callable[[], list[str]],
        env: dict[str, str],
        pidfile: Path,
        on_give_up: Callable[[str], None],
        ready: Callable[[], bool] = lambda: True,
        max_restarts: int = 5,
        window_s: float = 600.0,
    ) -> None:
        self.name, self.command, self.env, self.pidfile = name, command, env, pidfile
        self.on_give_up, self.ready = on_give_up, ready
        self.max_restarts, self.window_s = max_restarts, window_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.started = threading.Event()  # the first process is running
        self.restarts: list[float] = []
        self.was_ready = False
        self.thread = threading.Thread(target=self._run, name=f"ctsr-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.started.wait()

    def _spawn(self) -> None:
        # Its own session: a Ctrl-C in the terminal reaches serve alone, which then stops its
        # children in order (the worker finishes its batch before Redis goes).
        self.proc = subprocess.Popen(self.command(), env=self.env, preexec_fn=_die_with_parent, start_new_session=True)
        self.pidfile.write_text(f"{self.proc.pid}\n")
        self.started.set()

    def _run(self) -> None:
        backoff = 1.0
        while True:
            self._spawn()
            assert self.proc is not None
            while self.proc.poll() is None:
                if not self.was_ready and self.ready():
                    self.was_ready = True
                time.sleep(0.2)
            code = self.proc.returncode
            if self.stopping.is_set():
                return
            if not self.was_ready and self.ready():  # it got ready between two looks (a ready key outlives it)
                self.was_ready = True
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < self.window_s] + [now]
            if not self.was_ready:
                self.on_give_up(f"the {self.name} exited (status {code}) before it was ready; stopping")
                return
            if len(self.restarts) > self.max_restarts:
                times, minutes = len(self.restarts), self.window_s / 60
                self.on_give_up(f"the {self.name} keeps dying ({times} times in {minutes:.0f} min); stopping")
                return
            log.warning("the %s exited (status %s); restarting it in %.0f s", self.name, code, backoff)
            if self.stopping.wait(backoff):
                return
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    def stop(self, timeout: float) -> int | None:
        """SIGTERM the child and wait (then SIGKILL); returns its exit status."""
        self.stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        return None if proc is None else proc.returncode


def stop_leftover(pidfile: Path, expect: str) -> None:
    """A child of an earlier ``ctsr serve`` that outlived it (its parent was killed before
    children died with their parent): stop it if the pid still runs ``expect``."""
    try:
        pid = int(pidfile.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return
    if expect not in cmdline:
        return
    log.warning("stopping pid %d left over from an earlier ctsr serve (%s)", pid, expect)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def lock_state_dir(folder: Path) -> int:
    """Hold ``folder/serve.lock`` for this process's life: one ``ctsr serve`` per state folder."""
    fd = os.open(folder / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SystemExit(
            f"ctsr serve: another ctsr serve (pid {holder}) uses {folder}; stop it or pass --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
