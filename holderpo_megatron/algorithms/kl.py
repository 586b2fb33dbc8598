"""KL estimators against a reference policy, per token, from samples of the current policy.

With log-ratio l = logp - ref_logp (nats):
    k1 = l                         unbiased, high variance, can be negative
    k2 = l^2 / 2                   biased, low variance
    k3 = exp(-l) - 1 + l           unbiased, low variance, >= 0 (Schulman's estimator)
k3 clamps l to [-clamp, clamp] before exp so a far-off token cannot overflow, and the result to
[0, clamp] (verl/slime use 10 for both).
"""

from __future__ import annotations

import torch

__all__ = ["kl_penalty", "KL_ESTIMATORS"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: float = 10.0) -> torch.Tensor:
    """Per-token KL estimate ``[B, T]`` (float32), with gradient w.r.t. ``logp`` only."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} does not match logp shape {tuple(logp.shape)}")
    if not clamp > 0:
        raise ValueError(f"clamp must be > 0, got {clamp!r}")
    log_ratio = logp.float() - ref_logp.detach().float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    lr = log_ratio.clamp(-clamp, clamp)
    return (torch.exp(-lr) - 1 + lr).clamp(0.0, clamp)
