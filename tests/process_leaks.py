"""Processes a test session started and left running (issue 15): found exactly, reported, killed.

Two nets, because either alone misses some:

* a marker in the environment (``HOLDERPO_TEST_SESSION``), set once by the outermost pytest and
  inherited by every descendant, even one re-parented to PID 1 after its parent died;
* descent: the session makes itself a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so an
  orphaned descendant is re-parented to pytest instead of PID 1 and stays among its descendants.
  This finds processes whose environment can no longer be read: ``setproctitle`` (SGLang's
  ``sglang::scheduler``) writes the new title over the memory ``/proc/PID/environ`` shows.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
import uuid
from dataclasses import dataclass

SESSION_ENV = "HOLDERPO_TEST_SESSION"
_PR_SET_CHILD_SUBREAPER = 36

__all__ = ["SESSION_ENV", "Leftover", "new_session_marker", "become_subreaper", "session_processes",
           "wait_for_exit", "kill_all", "reap_zombie_children", "own_helpers"]


@dataclass(frozen=True)
class Leftover:
    pid: int
    cmdline: str
    age_s: float

    def __str__(self) -> str:
        return f"pid {self.pid} (running {self.age_s:.0f} s): {self.cmdline[:300]}"


def new_session_marker() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex}"


def become_subreaper() -> bool:
    """Orphaned descendants of this process are re-parented to it (Linux 3.4+); False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def own_helpers() -> set[int]:
    """Helpers of this process that end when it ends (they read EOF on a pipe or socket it holds):
    multiprocessing's resource tracker and forkserver, started lazily by the first user, and
    torch's shared-memory manager (``torch_shm_manager``, started by the first CPU tensor shared
    with the ``file_system`` strategy). The same helpers of a dead descendant end on their own."""
    import psutil

    pids = set()
    for c in psutil.Process().children():
        try:
            if c.name() == "torch_shm_manager":
                pids.add(c.pid)
        except psutil.Error:
            pass
    try:
        from multiprocessing import resource_tracker

        pid = getattr(resource_tracker._resource_tracker, "_pid", None)
        if pid:
            pids.add(pid)
    except Exception:  # noqa: BLE001 - a Python without these internals: nothing to exclude
        pass
    try:
        from multiprocessing import forkserver

        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
        if pid:
            pids.add(pid)
    except Exception:  # noqa: BLE001
        pass
    return pids


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def session_processes(marker: str, root_pid: int | None = None, exclude: set[int] = frozenset()) -> list:
    """Live processes (``psutil.Process``) of the session: those whose environment carries
    ``SESSION_ENV=marker`` and the descendants of ``root_pid`` (default: this process), minus
    ``root_pid`` itself and ``exclude``."""
    import psutil

    root_pid = os.getpid() if root_pid is None else root_pid
    skip = {root_pid, *exclude}
    found: dict[int, psutil.Process] = {}
    try:
        for p in psutil.Process(root_pid).children(recursive=True):
            if p.pid not in skip and _alive(p):
                found[p.pid] = p
    except psutil.Error:
        pass
    for p in psutil.process_iter():
        if p.pid in skip or p.pid in found:
            continue
        try:
            if p.environ().get(SESSION_ENV) == marker and _alive(p):
                found[p.pid] = p
        except psutil.Error:  # gone, or another user's
            pass
    return sorted(found.values(), key=lambda p: p.pid)


def describe(procs) -> list[Leftover]:
    import psutil

    out = []
    for p in procs:
        try:
            out.append(Leftover(p.pid, " ".join(p.cmdline()) or p.name(), time.time() - p.create_time()))
        except psutil.Error:
            pass
    return out


def wait_for_exit(procs, grace_s: float) -> list:
    """The processes of ``procs`` still alive after up to ``grace_s`` seconds."""
    deadline = time.monotonic() + grace_s
    left = [p for p in procs if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if _alive(p)]
    return left


def kill_all(procs) -> None:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def reap_zombie_children() -> None:
    """Collect the exit status of dead orphans re-parented to this subreaper (no Popen owns them);
    only at the end of the session, when no test still waits on a child of its own."""
    import psutil

    for p in psutil.Process().children():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass
