"""Group-relative advantages: one scalar per sequence from the rewards of its prompt's group."""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "ADVANTAGE_ESTIMATORS"]

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo")


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    estimator: str = "grpo",
    eps: float = 1e-6,
    unbiased_std: bool = True,
) -> torch.Tensor:
    """Advantages for ``rewards`` laid out as consecutive groups of ``group_size`` samples.

    Args:
        rewards: ``[B]`` with B = num_prompts * group_size, samples of one prompt adjacent.
        estimator: ``grpo`` (r - group mean) / (group std + eps); ``dr_grpo`` r - group mean.
    Returns:
        ``[B]`` float32. A group of identical rewards (or of size 1) gives exactly 0.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [batch], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards is not a multiple of group_size={group_size}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    r = rewards.double().view(-1, group_size)
    centred = r - r.mean(-1, keepdim=True)
    if estimator == "dr_grpo" or group_size == 1:
        adv = centred
    else:
        std = r.std(-1, unbiased=unbiased_std, keepdim=True)
        adv = centred / (std + eps)
    # Identical rewards: centred is exactly 0 up to rounding of the mean; make it exact.
    same = (r == r[:, :1]).all(-1, keepdim=True)
    adv = torch.where(same, torch.zeros_like(adv), adv)
    return adv.reshape(-1).float()
