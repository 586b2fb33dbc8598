"""The trainer's side of a weights-update process group shared with a rollout engine.

SGLang's ranks join with their own ``init_custom_process_group`` (a ``tcp://`` rendezvous, store
keys prefixed by the group name); this side joins the same rendezvous as rank 0 the same way, as a
process group separate from the trainer's default (Megatron) world.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["free_port", "open_weights_update_group", "close_weights_update_group", "broadcast_from_trainer"]


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def open_weights_update_group(master_address: str, master_port: int, world_size: int, group_name: str,
                              backend: str, timeout: timedelta = timedelta(seconds=300)):
    """Join as rank 0, hosting the group's TCP store. Blocks until all ``world_size`` ranks joined.

    The store is made here, not through ``rendezvous(tcp://...)``: under torchrun that sees
    ``TORCHELASTIC_USE_AGENT_STORE`` and connects as a client to a store it expects torchrun's agent
    to host, so nobody hosts this group's store and every member waits forever."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    store = dist.TCPStore(master_address, master_port, world_size, is_master=True, timeout=timeout, multi_tenant=True)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, 0, [], Backend(backend), store, group_name=group_name,
                                      backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def broadcast_from_trainer(tensor: torch.Tensor, pg) -> None:
    """Broadcast ``tensor`` from group rank 0 (this process) to the engine ranks."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    pg.broadcast([tensor], opts).wait()


def close_weights_update_group(pg) -> None:
    dist.destroy_process_group(pg)
