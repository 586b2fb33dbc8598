"""What keeps a run to itself: one run per run directory, and workers that end with their launcher.

* :func:`acquire_run_lock`: an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` (holder PID and host
  written in it), held for the whole run and released by the kernel on any death. ``holderpo
  train`` takes it before it starts anything and its workers check it is theirs; under torchrun
  started by hand, rank 0 takes it. A second run on the same directory is refused, naming the holder.
* :func:`die_with_parent`: torchrun starts its workers in new sessions, so killing the launcher's
  process group (a user's ``kill -9``, an OOM killer) misses them. Each worker asks the kernel for
  SIGKILL when its parent dies (Linux ``PR_SET_PDEATHSIG``) and a watchdog thread polls the parent
  (every platform); the SGLang processes a worker starts end with it the same way.
* :func:`die_with_multiprocessing_parent`: the same for the ``multiprocessing`` children (spawn) a
  worker starts through libraries: Megatron's checkpoint writer keeps a ``Manager`` process for the
  worker's life, SGLang's engine its scheduler and detokenizer. A spawn child re-imports the worker's
  ``__main__`` module (as ``__mp_main__``) before anything else, so that module calls this at import:
  without it, a SIGKILLed worker left its Manager, and the resource tracker they share, running
  forever under PID 1 (issue 15).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

__all__ = ["RunDirectoryBusy", "RunLock", "acquire_run_lock", "hold_run_lock", "die_with_parent", "LOCK_FILE",
           "LOCK_OWNER_ENV", "MP_PARENT_ENV", "mark_multiprocessing_parent", "die_with_multiprocessing_parent"]

LOCK_FILE = ".lock"
LOCK_OWNER_ENV = "HOLDERPO_RUN_LOCK_OWNER"  # set by `holderpo train` for its workers: the PID holding the lock
MP_PARENT_ENV = "HOLDERPO_MP_PARENT_PID"  # the PID a multiprocessing child must die with
_PR_SET_PDEATHSIG = 1


class RunDirectoryBusy(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """A held lock on a run directory (``release()`` or process exit frees it)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "an unknown process"
    fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
    if "pid" in fields:
        return f"PID {fields['pid']} on host {fields.get('host', '?')} (since {fields.get('since', '?')})"
    return "an unknown process"


def acquire_run_lock(run_dir: str | os.PathLike) -> RunLock:
    """Take the run directory's lock (creating the directory) or raise :class:`RunDirectoryBusy`."""
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirectoryBusy(f"run directory {run_dir} is in use by another run: {_holder(path)}; wait for it "
                                   "to end or stop it, or use another name/output_dir") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, (f"pid={os.getpid()} host={socket.gethostname()} "
                  f"since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n").encode())
    return RunLock(path, fd)


def hold_run_lock(run_dir: str | os.PathLike) -> RunLock | None:
    """In a worker: None when the launcher that started this run (``$HOLDERPO_RUN_LOCK_OWNER``)
    holds the lock; else take it (torchrun started by hand). Raises :class:`RunDirectoryBusy`."""
    owner = os.environ.get(LOCK_OWNER_ENV)
    try:
        return acquire_run_lock(run_dir)
    except RunDirectoryBusy:
        path = Path(run_dir) / LOCK_FILE
        if owner and f"pid={owner} " in (path.read_text() if path.is_file() else ""):
            return None  # our launcher's
        raise


def die_with_parent(poll_s: float = 1.0, expected_parent: int | None = None) -> None:
    """End this process (SIGKILL) when its parent dies: ``PR_SET_PDEATHSIG`` on Linux (the
    kernel does it at once), plus a daemon thread polling the parent, which first kills this
    process's children. A parent already gone (re-parented to init, or not ``expected_parent``)
    ends this process now. The kernel's signal follows the parent *thread* that started this
    process: start long-lived children from a long-lived thread."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # gone before the kernel was asked: re-parented (to init or a subreaper), or not the one expected
    if parent == 1 or os.getppid() != parent or (expected_parent is not None and parent != expected_parent):
        os.kill(os.getpid(), signal.SIGKILL)

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                _kill_children()
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="holderpo-parent-watchdog", daemon=True).start()


def mark_multiprocessing_parent() -> None:
    """In a process whose ``multiprocessing`` children must die with it: tell them its PID."""
    os.environ[MP_PARENT_ENV] = str(os.getpid())


def die_with_multiprocessing_parent() -> None:
    """In a ``multiprocessing`` child of a marked process (:func:`mark_multiprocessing_parent`):
    die with it (:func:`die_with_parent`), and mark this process for its own children."""
    expected = os.environ.get(MP_PARENT_ENV, "")
    die_with_parent(expected_parent=int(expected) if expected.isdigit() else None)
    mark_multiprocessing_parent()


def _kill_children() -> None:
    try:
        import psutil
    except ImportError:
        return
    for c in psutil.Process().children(recursive=True):
        try:
            c.kill()
        except psutil.Error:
            pass
