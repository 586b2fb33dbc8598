"""A small process pool with a per-call wall-clock timeout that kills and replaces stuck workers.

``concurrent.futures.ProcessPoolExecutor`` cannot cancel a running call, and a SymPy
simplification can run for hours inside C code where no signal reaches it; so each worker here
owns one pair of pipes, the parent sends one call at a time, and a worker that overruns its
deadline is SIGKILLed and replaced. The call scores as a timeout; the batch never stalls.

Workers are fresh interpreters (``python -c`` + ``subprocess``), not ``multiprocessing``
processes: spawn/forkserver re-import the parent's ``__main__`` in every worker (a trainer's main
module imports torch and Megatron: seconds and hundreds of MB per worker, and unguarded scripts
recurse), and fork is unsafe in a parent with CUDA or threads. The function to run travels
pickled (by reference: a module-level function) with the parent's ``sys.path``.

Not thread-safe: one ``map`` at a time. A worker stuck in C code when the parent dies abnormally
lingers until its computation ends (idle workers exit on the closed pipe).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["TimeoutPool", "CallOutcome"]

# The directory holding the holderpo_megatron package, so the worker's bootstrap import works
# from a source checkout that is not pip-installed.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = ("import sys; from holderpo_megatron.rewards.pool import _worker_entry; "
              "_worker_entry(int(sys.argv[1]), int(sys.argv[2]))")


@dataclass(frozen=True)
class CallOutcome:
    """What one call came to: ``status`` is "ok" (``value`` set), "timeout" or "error" (``error`` set)."""

    status: str
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


def _worker_entry(read_fd: int, write_fd: int) -> None:
    """Worker main loop: (sys.path, fn, initializer) first, then one (task_id, args) per call."""
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    sys_path, payload = inbox.recv()
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    fn, initializer = pickle.loads(payload)  # after sys.path: fn's module may live in tests/
    if initializer is not None:
        initializer()
    outbox.send(("ready", None))
    while True:
        try:
            msg = inbox.recv()
        except EOFError:  # the parent went away
            return
        if msg is None:
            return
        task_id, args = msg
        try:
            out = ("ok", fn(*args))
        except Exception as exc:  # reported to the parent, which counts it
            out = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        outbox.send((task_id, out))


class _Worker:
    def __init__(self, payload: bytes):
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(p2c_r), str(c2p_w)],
                                         pass_fds=(p2c_r, c2p_w), stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
        self.send_conn = Connection(p2c_w, readable=False)
        self.conn = Connection(c2p_r, writable=False)  # what the parent waits on
        self.send_conn.send((list(sys.path), payload))
        self.started_at = time.monotonic()
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0
        self.dispatched_at = 0.0

    def send(self, msg) -> None:
        self.send_conn.send(msg)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10.0)
        for c in (self.send_conn, self.conn):
            if not c.closed:
                c.close()


def _shutdown(workers: list[_Worker]) -> None:
    # Idle workers exit on a None message; busy or still-starting ones are killed outright.
    idle = []
    for w in workers:
        if w.ready and w.task is None and w.proc.poll() is None:
            try:
                w.send(None)
                idle.append(w)
                continue
            except (OSError, ValueError):
                pass
        w.kill()
    for w in idle:
        try:
            w.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        w.kill()
    workers.clear()


class TimeoutPool:
    """``workers`` processes running ``fn(*args)``; each call gets ``timeout_s`` seconds of wall time.

    Workers start lazily on the first ``map`` and persist across calls. Start-up (importing the
    verifier) is not charged to the first call's timeout: a call is dispatched only to a worker
    that has reported ready. A worker that cannot start within ``startup_timeout_s`` (a broken
    environment) raises ``RuntimeError`` rather than stalling.
    """

    def __init__(self, fn: Callable, workers: int = 2, timeout_s: float = 5.0,
                 initializer: Callable | None = None, startup_timeout_s: float = 120.0):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.fn = fn
        self.n_workers = workers
        self.timeout_s = float(timeout_s)
        self.initializer = initializer
        self.startup_timeout_s = startup_timeout_s
        # Pickled once, here: an unpicklable fn (a lambda, a local function) fails now, not in a worker.
        self._payload = pickle.dumps((fn, initializer))
        self._workers: list[_Worker] = []
        self.restarts = 0  # workers killed and replaced over the pool's life
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def _spawn(self) -> _Worker:
        w = _Worker(self._payload)
        self._workers.append(w)
        return w

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        self.restarts += 1
        self._spawn()

    def map(self, calls: Sequence[tuple]) -> list[CallOutcome]:
        """Run ``fn(*args)`` for every ``args`` in ``calls``; outcomes come back in input order."""
        if self._closed:
            raise RuntimeError("TimeoutPool.map called after close()")
        if not calls:
            return []
        while len(self._workers) < self.n_workers:
            self._spawn()
        try:
            return self._run(calls)
        except BaseException:
            # Interrupted (Ctrl-C, a start-up failure): drop busy workers so that no stale result
            # reaches the next map; the next map starts fresh ones.
            for w in list(self._workers):
                if w.task is not None:
                    w.kill()
                    self._workers.remove(w)
            raise

    def _run(self, calls: Sequence[tuple]) -> list[CallOutcome]:
        results: list[CallOutcome | None] = [None] * len(calls)
        next_call = 0
        remaining = len(calls)
        while remaining:
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.task is None and next_call < len(calls):
                    try:
                        w.send((next_call, tuple(calls[next_call])))
                    except (BrokenPipeError, ConnectionResetError, EOFError):
                        self._replace(w)  # died while idle; the call waits for another worker
                        continue
                    w.task, w.dispatched_at = next_call, now
                    w.deadline = now + self.timeout_s
                    next_call += 1
            busy = [w for w in self._workers if w.task is not None]
            starting = [w for w in self._workers if not w.ready]
            wake = [w.deadline for w in busy] + [w.started_at + self.startup_timeout_s for w in starting]
            wait_s = max(0.0, min(wake) - time.monotonic()) if wake else None
            ready_conns = wait([w.conn for w in busy + starting], timeout=wait_s)
            by_conn = {id(w.conn): w for w in self._workers}
            for conn in ready_conns:
                w = by_conn[id(conn)]
                try:
                    task_id, out = conn.recv()
                except (EOFError, OSError):
                    # The worker died (crash, OOM kill): its call is an error, the worker replaced.
                    if not w.ready:
                        try:
                            code = w.proc.wait(timeout=10.0)
                        except subprocess.TimeoutExpired:
                            code = None
                        _shutdown(self._workers)
                        raise RuntimeError(f"verifier worker exited during start-up (exit code {code})")
                    secs = time.monotonic() - w.dispatched_at
                    try:
                        code = w.proc.wait(timeout=5.0)
                    except subprocess.TimeoutExpired:  # pipe closed but process alive: kill below
                        code = None
                    results[w.task] = CallOutcome("error", error=f"worker died (exit code {code})", seconds=secs)
                    remaining -= 1
                    w.task = None
                    self._replace(w)
                    continue
                if task_id == "ready":
                    w.ready = True
                    continue
                assert task_id == w.task, (task_id, w.task)
                status, payload = out
                secs = time.monotonic() - w.dispatched_at
                results[task_id] = (CallOutcome("ok", value=payload, seconds=secs) if status == "ok"
                                    else CallOutcome("error", error=payload, seconds=secs))
                remaining -= 1
                w.task = None
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.deadline and results[w.task] is None:
                    results[w.task] = CallOutcome("timeout", seconds=now - w.dispatched_at)
                    remaining -= 1
                    w.task = None
                    self._replace(w)
                elif not w.ready and now - w.started_at > self.startup_timeout_s:
                    _shutdown(self._workers)
                    raise RuntimeError(f"verifier worker did not start within {self.startup_timeout_s:.0f} s")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop every worker (idempotent); the pool cannot be used afterwards."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "TimeoutPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
