"""Run a function on N local processes joined in a gloo process group (for tests/distributed)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn, world_size: int, store: str, args: tuple) -> None:
    torch.set_num_threads(1)  # N processes share the machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
    )
    try:
        fn(rank, world_size, *args)  # an exception propagates to mp.spawn with this rank's traceback
    except BaseException:
        # also said at once: a rank that raises may hang in its exit (gloo's threads) while the others
        # time out in their next collective, and mp.spawn then reports one of those timeouts instead
        import traceback

        print(f"rank {rank} raised:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    # Tear down together, then skip interpreter finalisation: gloo's worker threads tearing down
    # alongside Python's own finalisation abort the process about one run in a few hundred
    # ("terminate called without an active exception", SIGABRT) after every assertion passed.
    dist.barrier()
    dist.destroy_process_group()
    # os._exit skips multiprocessing's exit handler, which would stop the children a library started
    # (Megatron's checkpoint writer keeps a Manager process per rank): stop them here
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(10)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_gloo(fn, world_size: int, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; an exception in any
    of them fails the caller with that process's traceback. ``fn`` must be a module-level function."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(fn, world_size, os.path.join(d, "store"), args), nprocs=world_size, join=True)


class AllReduceRecorder:
    """Context manager recording the shape of every ``torch.distributed.all_reduce`` issued inside."""

    def __init__(self):
        self.numels: list[int] = []

    def __enter__(self):
        self._orig = dist.all_reduce

        def recording(tensor, *a, **kw):
            self.numels.append(tensor.numel())
            return self._orig(tensor, *a, **kw)

        dist.all_reduce = recording
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig
        return False
