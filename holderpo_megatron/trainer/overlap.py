"""Rollout overlap (``rollout.overlap: true``): the next step's batch generates while this step trains.

    step t:  samples of t arrive ──> rank 0 submits step t+1's prompts (a background thread)
             ──> score, train step t            (the engines generate step t+1 meanwhile)
             ──> wait until step t+1's batch is done (``time/rollout_wait``)
             ──> weight sync of version t+1     (lands after the batch: its samples carry version t)
    step t+1: its samples are ready; they are one version behind the trainer (``rollout/staleness_*``)

The engines run on their own GPUs (``placement: separate``), so generation and training use
different hardware; the loss takes the engine's log-probs as old (the trainer no longer holds the
weights that sampled them). Every rank holds a :class:`RolloutPrefetch` (the data position is every
rank's); only rank 0 runs the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Generic, TypeVar

__all__ = ["RolloutPrefetch"]

log = logging.getLogger("holderpo")

T = TypeVar("T")


class RolloutPrefetch(Generic[T]):
    """At most one batch in flight: the step it is for, the data position before its items were drawn
    (what a checkpoint saves: a resumed run draws those items again and regenerates them with its own
    weights), and on rank 0 the thread producing it.

    The thread is a daemon, so a run that fails while a batch is in flight never waits for it at exit;
    :meth:`close` gives it ``join_s`` seconds (the fleet's servers are gone by then, so its requests fail
    fast) and says so when it is still running."""

    def __init__(self):
        self.step: int | None = None
        self.data_state: dict | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._done.set()  # nothing in flight
        self._result: T | None = None
        self._error: BaseException | None = None
        self._closed = False

    def holds(self, step: int) -> bool:
        """Whether the batch of ``step`` was submitted (on every rank: its items are already drawn)."""
        return self.step == step

    def submit(self, step: int, data_state: dict, produce: Callable[[], T] | None) -> None:
        """Every rank: record ``step`` and the data position before its items. Rank 0 passes ``produce``
        (generation, rewards, advantages of those items) and it starts on a background thread."""
        if self._closed:
            raise RuntimeError(f"rollout prefetch: submit of step {step} after close")
        if self.step is not None:
            raise RuntimeError(f"rollout prefetch: step {self.step}'s batch is still held; step {step} cannot be "
                               f"submitted before it is taken")
        self.step, self.data_state = step, data_state
        self._done.clear()
        self._result = self._error = None
        if produce is None:
            self._done.set()
            return

        def run():
            try:
                self._result = produce()
            except BaseException as e:  # handed to the main thread by take()
                self._error = e
            finally:
                self._done.set()

        self._thread = threading.Thread(target=run, name=f"rollout-step{step}", daemon=True)
        self._thread.start()

    def wait(self) -> float:
        """Block until the batch in flight (if any) is done; seconds waited. A failure is kept for :meth:`take`."""
        t0 = time.perf_counter()
        self._done.wait()
        return time.perf_counter() - t0

    def take(self, step: int) -> T | None:
        """The batch of ``step`` (rank 0; None elsewhere), waiting for it; raises what producing it raised."""
        if self.step != step:
            raise RuntimeError(f"rollout prefetch holds step {self.step}, not step {step}")
        self.wait()
        result, error = self._result, self._error
        self.step = self.data_state = self._thread = None
        self._result = self._error = None
        if error is not None:
            raise RuntimeError(f"generating step {step + 1}'s batch in the background failed: "
                               f"{type(error).__name__}: {error}") from error
        return result

    def close(self, join_s: float = 30.0) -> None:
        """Drop what is held; give a running thread ``join_s`` seconds. Idempotent."""
        self._closed = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(join_s)
            if thread.is_alive():
                log.warning("rollout overlap: the background generation of step %s was still running %.0f s "
                            "after shutdown (a daemon thread: it does not hold the process)", (self.step or 0) + 1, join_s)
        self.step = self.data_state = self._thread = None
        self._result = self._error = None
