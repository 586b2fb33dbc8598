"""Sharing CPU tensors between processes by shared-memory file name (part of the engine interface:
weight sync allocates buckets this way, engines map them)."""

from __future__ import annotations

import contextlib
import io
import pickle

import torch

__all__ = ["file_system_sharing", "share_tensor", "dumps_shared", "loads_shared", "unlink_created_segments"]

# Shared-memory files this process created. torch removes such a file when its reference count
# (one per holder, plus one per pickled handle not yet unpickled) drops to zero, which never
# happens if a holder is killed (an engine at shutdown) or the interpreter exits without freeing
# the tensor: the file would outlive us in /dev/shm. So we unlink our own files at exit; memory
# still mapped by a live process stays valid (only the name goes).
_CREATED: set[str] = set()


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
    """Move a CPU tensor's storage into shared memory (by file name), in place; returns it. The
    file is unlinked when this process exits (see :func:`unlink_created_segments`)."""
    with file_system_sharing():
        t.share_memory_()
    _, name, _ = t.untyped_storage()._share_filename_cpu_()
    name = name.decode() if isinstance(name, bytes) else str(name)
    if not _CREATED:
        import atexit

        atexit.register(unlink_created_segments)
    _CREATED.add(name)
    return t


def unlink_created_segments() -> None:
    """Remove the names of the shared-memory files this process created (at exit).

    A torch shared-memory file starts with a reference count (``MapInfo``: one int32, the data 64
    bytes further on); the process whose close takes it to zero unlinks the name, and aborts if the
    name is already gone. So before removing a name we add one reference of our own to the count,
    which no close takes away: every later close (this process's own tensors freed during
    interpreter teardown, a peer that still maps the file) only unmaps, and the memory goes with
    the last mapping. (The add is not atomic with a concurrent open or close of the same file: at
    exit, a window of microseconds.)"""
    import mmap
    import os
    import sys

    while _CREATED:
        path = "/dev/shm/" + _CREATED.pop().lstrip("/")
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            with mmap.mmap(fd, 4) as m:
                m[0:4] = (int.from_bytes(m[0:4], sys.byteorder, signed=True) + 1).to_bytes(4, sys.byteorder, signed=True)
            os.unlink(path)
        except (OSError, ValueError):
            pass
        finally:
            os.close(fd)


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
