"""Wall-clock time per phase of a training step: ``with timer("rollout"): ...``."""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Accumulates seconds per phase name until :meth:`pop` hands the totals over (once per step).

    A phase may be entered several times per step (its times add up); phases may nest (each is
    timed on its own, so nested time counts in both). ``synchronize`` (e.g. ``torch.cuda.synchronize``)
    is called at each boundary so asynchronous GPU work is charged to the phase that launched it.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self._sync = synchronize
        self._clock = clock
        self._totals: dict[str, float] = {}
        self._open: list[str] = []

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if not isinstance(phase, str) or not phase or "/" in phase:
            raise ValueError(f"phase name must be a non-empty string without '/', got {phase!r}")
        if phase in self._open:
            raise ValueError(f"phase {phase!r} is already being timed (re-entered inside itself)")
        if self._sync is not None:
            self._sync()
        self._open.append(phase)
        start = self._clock()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self._totals[phase] = self._totals.get(phase, 0.0) + (self._clock() - start)
            self._open.remove(phase)

    def totals(self) -> dict[str, float]:
        """Seconds per phase since the last :meth:`pop` (a copy)."""
        return dict(self._totals)

    def pop(self) -> dict[str, float]:
        """The totals, reset to empty (phases still open keep timing into the next period)."""
        out, self._totals = self._totals, {}
        return out
