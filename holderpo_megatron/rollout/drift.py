"""Train/rollout log-prob drift: how far the engine's log-probs are from the trainer's re-scoring.

A large drift means the engine samples from a different policy than the one being trained
(stale or wrongly synced weights, precision, a kernel mismatch), which biases importance ratios.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["LogprobDrift", "logprob_drift"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogprobDrift:
    """|logp_train - logp_rollout| over all response tokens of a batch, in nats."""

    mean_abs: float
    max_abs: float
    num_tokens: int
    threshold: float

    @property
    def exceeded(self) -> bool:
        return self.max_abs > self.threshold

    def to_dict(self, prefix: str = "rollout/logprob_drift") -> dict[str, float]:
        return {f"{prefix}_mean": self.mean_abs, f"{prefix}_max": self.max_abs, f"{prefix}_tokens": float(self.num_tokens)}


def logprob_drift(train_logprobs: Sequence[torch.Tensor], rollout_logprobs: Sequence[torch.Tensor], *,
                  response_starts: Sequence[int] | None = None, threshold: float | None = 0.05,
                  logger: logging.Logger | None = None) -> LogprobDrift:
    """Compare, per sample, the trainer's log-probs of the response tokens with the engine's.

    ``rollout_logprobs[i]``: ``[R_i]`` (a :class:`~.interface.Sample`'s ``logprobs``).
    ``train_logprobs[i]``: the same ``[R_i]`` response tokens, or, with ``response_starts``, the
    trainer's whole-sequence scores ``[n_i - 1]`` (log p(x_t | x_<t), t = 1..n-1, as the Actor's
    ``score`` returns) of which the last ``R_i`` are taken: position ``response_starts[i] - 1`` on.
    Warns (logging) when the max exceeds ``threshold`` (None: never; the caller judges the total).
    """
    if len(train_logprobs) != len(rollout_logprobs):
        raise ValueError(f"{len(train_logprobs)} trainer rows but {len(rollout_logprobs)} rollout rows")
    if response_starts is not None and len(response_starts) != len(train_logprobs):
        raise ValueError(f"{len(response_starts)} response_starts for {len(train_logprobs)} rows")
    if threshold is not None and not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold={threshold!r} is invalid; allowed: None or a finite float >= 0 (nats)")
    diffs = []
    for i, (t, r) in enumerate(zip(train_logprobs, rollout_logprobs)):
        t = t.detach().double().reshape(-1)
        r = r.detach().double().reshape(-1)
        if response_starts is not None:
            start = int(response_starts[i]) - 1
            if start < 0 or start + r.numel() != t.numel():
                raise ValueError(f"sample {i}: response_start={response_starts[i]} with {r.numel()} response tokens "
                                 f"does not fit a {t.numel() + 1}-token sequence")
            t = t[start:]
        if t.numel() != r.numel():
            raise ValueError(f"sample {i}: {t.numel()} trainer log-probs vs {r.numel()} rollout log-probs")
        diffs.append((t - r).abs())
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    out = LogprobDrift(mean_abs=float(d.mean()) if d.numel() else 0.0, max_abs=float(d.max()) if d.numel() else 0.0,
                       num_tokens=int(d.numel()), threshold=math.inf if threshold is None else float(threshold))
    if out.exceeded:
        (logger or log).warning(
            "train/rollout log-prob drift above threshold: max |logp_train - logp_rollout| = %.4g nats "
            "(mean %.4g over %d response tokens, threshold %.4g)", out.max_abs, out.mean_abs, out.num_tokens, threshold)
    return out
