"""A plain-text progress bar with ETA for training steps (stderr, rank 0; no tqdm needed).

On a terminal the line is redrawn in place; on a pipe or file (a job log) it prints one line per
step, so the log stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

__all__ = ["StepProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``; ``None``/negative -> ``?``."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class StepProgress:
    """``step 12/100 [###.......] 12%  3.1 s/step  ETA 4:33  reward=0.41 p=1.50``

    ``start_step``: the step a resumed run starts after (its steps do not count towards the rate).
    ``show``: the metric names appended to the line when present.
    """

    def __init__(self, total_steps: int, *, start_step: int = 0, stream: TextIO | None = None, enabled: bool = True,
                 width: int = 24, show: tuple[str, ...] = ("reward", "accuracy", "p", "kl", "grad_norm"),
                 clock: Callable[[], float] = time.perf_counter):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"start_step must be in [0, {total_steps}], got {start_step!r}")
        self.total = total_steps
        self.start_step = start_step
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.width = width
        self.show = show
        self._clock = clock
        self._t0 = clock()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = False

    def eta(self, step: int) -> tuple[float, float]:
        """(seconds per step, seconds left) from the steps done in this process."""
        done = step - self.start_step
        if done <= 0:
            return float("nan"), float("nan")
        rate = (self._clock() - self._t0) / done
        return rate, rate * (self.total - step)

    def line(self, step: int, metrics: dict | None = None) -> str:
        frac = min(max(step / self.total, 0.0), 1.0)
        fill = int(frac * self.width)
        rate, left = self.eta(step)
        parts = [f"step {step}/{self.total} [{'#' * fill}{'.' * (self.width - fill)}] {frac * 100:3.0f}%"]
        parts.append(f"{rate:.2f} s/step" if rate == rate else "- s/step")
        parts.append(f"ETA {format_duration(left)}")
        for k in self.show:
            v = (metrics or {}).get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{k}={v:.4g}")
        return "  ".join(parts)

    def update(self, step: int, metrics: dict | None = None) -> None:
        if not self.enabled:
            return
        text = self.line(step, metrics)
        if self._tty:
            self.stream.write("\r\033[K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
