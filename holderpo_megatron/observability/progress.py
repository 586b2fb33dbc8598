"""Progress of training steps and evaluation sets, drawn by tqdm (rank 0).

On a terminal tqdm redraws one line in place; on a pipe or file (a job log) every update is one
line of its own (tqdm's format, no carriage returns), so the log stays readable. The stream
defaults to :func:`~.console.console_stream`: the terminal, even while third-party output goes to
the run's log file.
"""

from __future__ import annotations

import time
from typing import Callable, TextIO

from tqdm import tqdm

from .console import console_stream

__all__ = ["StepProgress"]


class StepProgress:
    """``step:  12%|##        | 12/100 [00:37<04:33,  3.10s/step, reward_mean=0.41, p=1.5]``

    ``start_step``: the step a resumed run starts after (its steps do not count towards the rate).
    ``show``: the metric names appended when present. ``desc``/``unit``: the label and the unit
    (``eval`` / ``set`` for evaluation). ``clock``: seconds, for tests.
    """

    def __init__(self, total_steps: int, *, start_step: int = 0, stream: TextIO | None = None, enabled: bool = True,
                 show: tuple[str, ...] = ("reward_mean", "accuracy", "p", "kl", "grad_norm"), desc: str = "step",
                 unit: str = "step", clock: Callable[[], float] = time.time):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"start_step must be in [0, {total_steps}], got {start_step!r}")
        self.total = total_steps
        self.start_step = start_step
        self.stream = stream if stream is not None else console_stream()
        self.enabled = enabled
        self.show = show
        self.desc, self.unit = desc, unit
        self._clock = clock
        self._t0 = clock()
        self._bar = None
        if enabled and bool(getattr(self.stream, "isatty", lambda: False)()):
            # smoothing=0: the rate is the average over this process's steps, as the line mode's
            self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream, desc=desc, unit=unit,
                             smoothing=0, mininterval=0, dynamic_ncols=True, leave=True)
            self._bar._time = clock
            self._bar.start_t = self._bar.last_print_t = self._t0

    def postfix(self, metrics: dict | None) -> str:
        parts = []
        for k in self.show:
            v = (metrics or {}).get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{k}={v:.4g}")
        return ", ".join(parts)

    def line(self, step: int, metrics: dict | None = None, note: str = "") -> str:
        """The one-line record of ``step`` (the non-terminal form)."""
        post = ", ".join(p for p in (note, self.postfix(metrics)) if p)
        return tqdm.format_meter(step, self.total, self._clock() - self._t0, prefix=self.desc, unit=self.unit,
                                 initial=self.start_step, postfix=post or None, ascii=True)

    def update(self, step: int, metrics: dict | None = None, note: str = "") -> None:
        """``step`` done (absolute, not an increment); ``note``: free text shown before the metrics."""
        if not self.enabled:
            return
        if self._bar is not None:
            post = ", ".join(p for p in (note, self.postfix(metrics)) if p)
            self._bar.set_postfix_str(post, refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            self.stream.write(self.line(step, metrics, note) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
