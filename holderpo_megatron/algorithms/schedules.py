"""Schedules for the Hölder power p over training steps.

With x = min(1, step / schedule_steps), mid = (p_min + p_max) / 2 and amp = (p_max - p_min) / 2:

    constant     p_max
    linear       p_min + (p_max - p_min) * x            (p_min -> p_max)
    linear_dec   p_max - (p_max - p_min) * x            (p_max -> p_min)
    sin          mid - amp * cos(pi * x)                (p_min -> p_max)
    cos          mid + amp * cos(pi * x)                (p_max -> p_min)
    quad         p_min + (p_max - p_min) * x**power     (p_min -> p_max)
    quad_dec     p_max - (p_max - p_min) * x**power     (p_max -> p_min)
    cubic        mid + amp * (2x - 1)**3                (p_min -> p_max)
    cubic_dec    mid - amp * (2x - 1)**3                (p_max -> p_min)

The paper anneals from signal (large p) to stability (small p), e.g. ``linear_dec`` 2 -> -1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["PSchedule", "SCHEDULE_KINDS"]

SCHEDULE_KINDS = ("constant", "linear", "linear_dec", "sin", "cos", "quad", "quad_dec", "cubic", "cubic_dec")


@dataclass(frozen=True)
class PSchedule:
    kind: str = "constant"
    p_min: float = 1.0
    p_max: float = 1.0
    schedule_steps: int = 1
    power: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        for name in ("p_min", "p_max", "power"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"schedule {name} must be a finite number, got {v!r}")
        if self.p_min > self.p_max:
            raise ValueError(f"schedule p_min ({self.p_min}) must be <= p_max ({self.p_max})")
        if isinstance(self.schedule_steps, bool) or not isinstance(self.schedule_steps, int) or self.schedule_steps < 1:
            raise ValueError(f"schedule schedule_steps must be an int >= 1, got {self.schedule_steps!r}")
        if self.power <= 0:
            raise ValueError(f"schedule power must be > 0, got {self.power!r}")

    def value(self, step: int) -> float:
        """p at training step ``step`` (>= 0); constant after ``schedule_steps``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        x = min(1.0, step / self.schedule_steps)
        lo, hi = float(self.p_min), float(self.p_max)
        mid, amp = (lo + hi) / 2, (hi - lo) / 2
        k = self.kind
        if k == "constant":
            return hi
        if k == "linear":
            return lo + (hi - lo) * x
        if k == "linear_dec":
            return hi - (hi - lo) * x
        if k == "sin":
            return mid - amp * math.cos(math.pi * x)
        if k == "cos":
            return mid + amp * math.cos(math.pi * x)
        if k == "quad":
            return lo + (hi - lo) * x**self.power
        if k == "quad_dec":
            return hi - (hi - lo) * x**self.power
        if k == "cubic":
            return mid + amp * (2 * x - 1) ** 3
        return mid - amp * (2 * x - 1) ** 3  # cubic_dec

    def metrics(self, step: int) -> dict[str, float | str]:
        """What the schedule reports each step."""
        return {"p": self.value(step), "p_schedule": self.kind, "p_min": self.p_min, "p_max": self.p_max}

    def to_dict(self) -> dict:
        return asdict(self)
