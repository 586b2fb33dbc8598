"""Fault injection for the resume tests: a run kills itself (SIGKILL, no clean-up) at a chosen point.

HOLDERPO_KILL_AFTER_STEP=N: after step N (and its checkpoint, when one is due);
HOLDERPO_KILL_DURING_SAVE=N: while step N's checkpoint is written, before it is committed.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist

KILL_AFTER_STEP = "HOLDERPO_KILL_AFTER_STEP"
KILL_DURING_SAVE = "HOLDERPO_KILL_DURING_SAVE"


def kill_if_asked(variable: str, step: int) -> None:
    """Rank 0 sends itself SIGKILL when ``variable`` is set to ``step``; torchrun then stops the rest."""
    if os.environ.get(variable) == str(step) and (not dist.is_initialized() or dist.get_rank() == 0):
        os.kill(os.getpid(), signal.SIGKILL)
