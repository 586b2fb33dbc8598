"""Sharing CPU tensors between processes by shared-memory file name (part of the engine interface:
weight sync allocates buckets this way, engines map them)."""

from __future__ import annotations

import contextlib
import io
import pickle

import torch

__all__ = ["file_system_sharing", "share_tensor", "dumps_shared", "loads_shared"]


@contextlib.contextmanager
def file_system_sharing():
    """While active, pickled CPU tensors travel as shared-memory *file names*: any process on the
    host (an engine's scheduler, a server we did not start, another trainer rank) can map them,
    where the default (file descriptor) strategy reaches only our own children."""
    import torch.multiprocessing as tmp

    prev = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        tmp.set_sharing_strategy(prev)


def share_tensor(t: torch.Tensor) -> torch.Tensor:
    """Move a CPU tensor's storage into shared memory (by file name); returns it."""
    with file_system_sharing():
        t.share_memory_()
    return t


def dumps_shared(obj) -> bytes:
    """Pickle with torch's reductions: CPU tensors become shared-memory handles (no data copied
    if they are already shared)."""
    import torch.multiprocessing  # noqa: F401  (registers the tensor reductions)
    from multiprocessing.reduction import ForkingPickler

    buf = io.BytesIO()
    with file_system_sharing():
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads_shared(data: bytes):
    return pickle.loads(data)
