"""Loss metrics that combine exactly across microbatches and ranks.

A mean is kept as (sum, count), a total (a count of things) as a sum, a min as a min, a max as a max, so merging two microbatches (or an
all-reduce over data-parallel ranks, done by ``parallel/``) gives the same numbers as one big batch.
Values stay detached 0-dim tensors on the loss's device: nothing forces a host sync until
``to_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LossMetrics"]


@dataclass
class LossMetrics:
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    mins: dict[str, torch.Tensor] = field(default_factory=dict)
    maxs: dict[str, torch.Tensor] = field(default_factory=dict)
    constants: dict[str, float] = field(default_factory=dict)

    def add_mean(self, name: str, value_sum: torch.Tensor, count: torch.Tensor) -> None:
        self.sums[name] = value_sum.detach().double()
        self.counts[name] = torch.as_tensor(count).detach().double()

    def add_total(self, name: str, value: torch.Tensor) -> None:
        """A count that adds up across microbatches and ranks (e.g. sequences seen)."""
        self.totals[name] = torch.as_tensor(value).detach().double()

    def add_extreme(self, name: str, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Record min and max of ``values`` over ``valid`` entries as ``name_min``/``name_max``."""
        v = values.detach().double()
        inf = torch.tensor(float("inf"), dtype=v.dtype, device=v.device)
        self.mins[name + "_min"] = torch.where(valid, v, inf).amin() if v.numel() else inf
        self.maxs[name + "_max"] = torch.where(valid, v, -inf).amax() if v.numel() else -inf

    def add_max(self, name: str, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Record the max of ``values`` over ``valid`` entries as ``name`` (-inf if none)."""
        v = values.detach().double()
        inf = torch.tensor(float("inf"), dtype=v.dtype, device=v.device)
        self.maxs[name] = torch.where(valid, v, -inf).amax() if v.numel() else -inf

    def add_constant(self, name: str, value: float) -> None:
        self.constants[name] = float(value)

    def merge(self, other: "LossMetrics") -> "LossMetrics":
        out = LossMetrics(
            dict(self.sums), dict(self.counts), dict(self.totals), dict(self.mins), dict(self.maxs), dict(self.constants)
        )
        for k, v in other.totals.items():
            out.totals[k] = out.totals[k] + v if k in out.totals else v
        for k, v in other.sums.items():
            out.sums[k] = out.sums[k] + v if k in out.sums else v
            out.counts[k] = out.counts[k] + other.counts[k] if k in out.counts else other.counts[k]
        for k, v in other.mins.items():
            out.mins[k] = torch.minimum(out.mins[k], v) if k in out.mins else v
        for k, v in other.maxs.items():
            out.maxs[k] = torch.maximum(out.maxs[k], v) if k in out.maxs else v
        out.constants.update(other.constants)
        return out

    def to_dict(self) -> dict[str, float]:
        """Plain floats: means (NaN where nothing was counted), mins, maxs (None-free, inf if empty)."""
        out: dict[str, float] = {}
        for k, s in self.sums.items():
            c = float(self.counts[k])
            out[k] = float(s) / c if c > 0 else float("nan")
        out.update({k: float(v) for k, v in self.totals.items()})
        out.update({k: float(v) for k, v in self.mins.items()})
        out.update({k: float(v) for k, v in self.maxs.items()})
        out.update(self.constants)
        return out
