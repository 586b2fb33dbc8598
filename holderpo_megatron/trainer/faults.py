"""Fault injection for the resume tests: a run kills itself (SIGKILL, no clean-up) at a chosen point.

HOLDERPO_KILL_AFTER_STEP=N: after step N (and its checkpoint, when one is due);
HOLDERPO_KILL_DURING_SAVE=N: while step N's checkpoint is written, before it is committed;
HOLDERPO_KILL_RANK_IN_STEP=R:N: rank R (any rank), mid-step N (after the rollout, before training),
as the kernel's OOM killer would end it.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist

KILL_AFTER_STEP = "HOLDERPO_KILL_AFTER_STEP"
KILL_DURING_SAVE = "HOLDERPO_KILL_DURING_SAVE"
KILL_RANK_IN_STEP = "HOLDERPO_KILL_RANK_IN_STEP"


def kill_if_asked(variable: str, step: int) -> None:
    """Rank 0 sends itself SIGKILL when ``variable`` is set to ``step``; torchrun then stops the rest."""
    if os.environ.get(variable) == str(step) and (not dist.is_initialized() or dist.get_rank() == 0):
        os.kill(os.getpid(), signal.SIGKILL)


def rank_to_kill() -> tuple[int, int] | None:
    """``$HOLDERPO_KILL_RANK_IN_STEP`` as (rank, step); None when unset. `holderpo train` checks it before launch."""
    value = os.environ.get(KILL_RANK_IN_STEP)
    if not value:
        return None
    rank, sep, at = value.partition(":")
    if not (sep and rank.strip().isdigit() and at.strip().isdigit()):
        raise ValueError(f"{KILL_RANK_IN_STEP}={value!r} must be RANK:STEP, two non-negative integers (e.g. 1:2)")
    return int(rank), int(at)


def kill_rank_if_asked(step: int) -> None:
    """The rank named by ``$HOLDERPO_KILL_RANK_IN_STEP`` sends itself SIGKILL in step ``step``."""
    target = rank_to_kill()
    if target is not None and target == (dist.get_rank() if dist.is_initialized() else 0, step):
        os.kill(os.getpid(), signal.SIGKILL)
