"""A small process pool with a per-call wall-clock timeout that kills and replaces stuck workers.

``concurrent.futures.ProcessPoolExecutor`` cannot cancel a running call, and a SymPy
simplification can run for hours inside C code where no signal reaches it; so each worker runs
one call at a time, and a worker that overruns its deadline is SIGKILLed and replaced. The call
scores as a timeout; the batch never stalls.

The worker processes (fresh interpreters, deadlines, kill, orphan exit) are
:mod:`holderpo_megatron.workers.subprocess_pool`'s; this module hands calls to whichever worker
is free and turns each event into a :class:`CallOutcome`. The function to run travels pickled (by
reference: a module-level function) with the parent's ``sys.path``.

Not thread-safe: one ``map`` at a time.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from holderpo_megatron.workers.subprocess_pool import Lost, Reply, SubprocessPool, WorkerProcess, WorkerProgram

__all__ = ["TimeoutPool", "CallOutcome"]

log = logging.getLogger("holderpo.rewards")


@dataclass(frozen=True)
class CallOutcome:
    """What one call came to: ``status`` is "ok" (``value`` set), "timeout" or "error" (``error`` set).
    ``seconds``: wall time from dispatch to outcome."""

    status: str
    value: Any = None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class _CallProgram(WorkerProgram):
    """What each worker runs: ``initializer()`` once at start-up, then ``fn(*args)`` per request."""

    fn: Callable
    initializer: Callable | None = None

    def start(self) -> str:
        if self.initializer is not None:
            self.initializer()  # raising ends the worker: the parent reports a start-up failure
        return ""

    def handle(self, args: tuple) -> Any:
        return self.fn(*args)

    def describe_error(self, exc: Exception) -> str:
        # the verifier's own frames say where it failed; three are enough
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"


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
        # pickled here: an unpicklable fn (a lambda, a local function) fails now, not in a worker
        self._pool = SubprocessPool(_CallProgram(fn, initializer), workers, name="verifier", log=log,
                                    startup_timeout_s=startup_timeout_s, stop_grace_s=2.0, start=False)
        self.restarts = 0  # workers killed and replaced over the pool's life
        self._closed = False

    def map(self, calls: Sequence[tuple]) -> list[CallOutcome]:
        """Run ``fn(*args)`` for every ``args`` in ``calls``; outcomes come back in input order."""
        if self._closed:
            raise RuntimeError("TimeoutPool.map called after close()")
        if not calls:
            return []
        self._pool.fill()
        try:
            return self._run(calls)
        except BaseException:
            # Interrupted (Ctrl-C, a start-up failure): drop busy workers so that no stale result
            # reaches the next map; the next map starts fresh ones.
            for w in list(self._pool.workers):
                if w.busy:
                    self._pool.discard(w)
            raise

    def map_within_budget(self, calls: Sequence[tuple], budget_s: float | None,
                          started: float) -> list[CallOutcome | None]:
        """``map`` bounded by a batch budget: ``budget_s`` seconds from ``started`` (a
        ``time.monotonic()``; None: no budget). Calls go out in waves of ``workers * floor(budget
        left / timeout_s)`` (at least ``workers``), so a wave ends within the budget left, or one
        ``timeout_s`` past it when less than that is left; calls the budget did not reach are None."""
        if budget_s is None:
            return list(self.map(calls))
        out: list[CallOutcome | None] = []
        while len(out) < len(calls):
            left = budget_s - (time.monotonic() - started)
            if left <= 0:
                break
            wave = self.n_workers * max(1, math.floor(left / self.timeout_s))
            out.extend(self.map(calls[len(out):len(out) + wave]))
        return out + [None] * (len(calls) - len(out))

    def _run(self, calls: Sequence[tuple]) -> list[CallOutcome]:
        results: list[CallOutcome | None] = [None] * len(calls)
        next_call = 0
        remaining = len(calls)
        while remaining:
            for w in self._pool.idle():
                if next_call == len(calls):
                    break
                if not self._pool.submit(w, tuple(calls[next_call]), next_call, self.timeout_s):
                    self._replace(w)  # died while idle; the call waits for another worker
                    continue
                next_call += 1
            for event in self._pool.wait(self._pool.waiting()):
                if isinstance(event, Reply):
                    results[event.tag] = (CallOutcome("ok", value=event.value, seconds=event.seconds) if event.ok
                                          else CallOutcome("error", error=event.value, seconds=event.seconds))
                else:
                    results[event.tag] = self._lost(event)
                remaining -= 1
        return results  # type: ignore[return-value]

    def _lost(self, event: Lost) -> CallOutcome:
        """A worker that died or overran: its call's outcome; the worker replaced. One that could
        not start raises (a broken environment would fail every call the same way)."""
        if event.during_startup:
            self._pool.stop()
            raise RuntimeError(f"verifier worker pid {event.worker.pid} {event.reason}")
        self._replace(event.worker)
        if event.cause == "timeout":
            return CallOutcome("timeout", seconds=event.seconds)
        return CallOutcome("error", error=f"worker died ({event.how})", seconds=event.seconds)

    def _replace(self, w: WorkerProcess) -> None:
        self._pool.replace(w)
        self.restarts += 1

    def close(self) -> None:
        """Stop every worker (idempotent); the pool cannot be used afterwards."""
        self._closed = True
        self._pool.close()

    def __enter__(self) -> "TimeoutPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
