"""A plain progress bar on stderr and the summary a conversion ends with."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

__all__ = ["ProgressBar", "ConversionSummary", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


class ProgressBar:
    """``[#######.....]  54%  1.21 GB / 2.24 GB  3.2 s`` redrawn in place on a terminal; on a
    pipe or file, one line per 10%. ``enabled=False`` prints nothing."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, stream=None, width: int = 30):
        self.total = max(int(total), 1)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = width
        self.done = 0
        self.start = time.perf_counter()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_draw = 0.0
        self._last_decile = -1
        self._draw(force=True)

    def update(self, n: int) -> None:
        self.done += int(n)
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        now = time.perf_counter()
        if self._tty:
            if not force and now - self._last_draw < 0.1 and frac < 1.0:
                return
            end = "\r"
        else:
            decile = int(frac * 10)
            if not force and decile == self._last_decile:
                return
            self._last_decile = decile
            end = "\n"
        self._last_draw = now
        fill = int(frac * self.width)
        bar = "#" * fill + "." * (self.width - fill)
        self.stream.write(f"{self.desc} [{bar}] {frac * 100:3.0f}%  {human_bytes(self.done)} / "
                          f"{human_bytes(self.total)}  {now - self.start:.1f} s{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self._tty or self._last_decile != int(min(self.done / self.total, 1.0) * 10):
                self._draw(force=True)
            if self._tty:
                self.stream.write("\n")
                self.stream.flush()


@dataclass
class ConversionSummary:
    """What a conversion did: tensors and bytes written (this rank's share under torchrun)."""

    direction: str
    output: str
    tensors: int
    bytes: int
    seconds: float
    dtype: str

    def __str__(self) -> str:
        rate = self.bytes / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.direction}: {self.tensors} tensors, {human_bytes(self.bytes)} ({self.dtype}) in "
                f"{self.seconds:.1f} s ({human_bytes(rate)}/s) -> {self.output}")
