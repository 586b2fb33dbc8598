"""The ``distributed`` transport: buckets broadcast to the engine over a weights-update process
group (NCCL on GPU, gloo on CPU); works wherever the engine is, on any host."""

from __future__ import annotations

import threading

from ..rollout.interface import TensorBucket
from .base import WeightSynchronizer
from .buckets import DEFAULT_BUCKET_BYTES

__all__ = ["DistributedTransport"]


def _run_beside(engine_side, trainer_side, thread_name: str) -> None:
    """Both ends of a collective from this one process: the engine's call (it blocks until the
    collective completes) on a thread, the trainer's here. The engine's error, if any, is raised."""
    errors: list[BaseException] = []

    def run():
        try:
            engine_side()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, name=thread_name, daemon=True)
    t.start()
    try:
        trainer_side()
    finally:
        t.join()
    if errors:
        raise errors[0]


class DistributedTransport(WeightSynchronizer):
    """Engine elsewhere: the owner and the engine's ranks form a weights-update process group
    (``init_weights_update_group``, once, on the first sync) and every bucket is broadcast from the
    owner (``update_weights_from_distributed``, flattened-bucket format). Later stages send their
    buckets to the owner point to point over the trainer's world. ``backend``: "gloo" on CPU
    (SGLang accepts it), "nccl" on GPU; ``master_address``/``master_port``: the group's
    rendezvous, on the owner (port None: a free one)."""

    name = "distributed"

    def __init__(self, source, engine, *, dtype, bucket_bytes=DEFAULT_BUCKET_BYTES, pipelined: bool = True,
                 backend: str | None = None, master_address: str = "127.0.0.1", master_port: int | None = None,
                 group_name: str = "holderpo_weights_update"):
        super().__init__(source, engine, dtype=dtype, bucket_bytes=bucket_bytes, pipelined=pipelined)
        self.backend = backend or ("nccl" if source.device.type == "cuda" else "gloo")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend={self.backend!r} is invalid; allowed: 'gloo' (CPU) | 'nccl' (GPU)")
        self.master_address = master_address
        self.master_port = master_port
        self.group_name = group_name
        self._pg = None

    def _connect(self) -> None:
        if self._pg is not None:
            return
        from .process_group import free_port, open_weights_update_group

        port = self.master_port or free_port(self.master_address)
        world = 1 + self.engine.weights_update_world_size

        def trainer_side():
            self._pg = open_weights_update_group(self.master_address, port, world, self.group_name, self.backend)

        _run_beside(lambda: self.engine.init_weights_update_group(self.master_address, port, self.group_name,
                                                                  self.backend),
                    trainer_side, "engine-joins-weights-group")

    def _deliver(self, item: TensorBucket, flush_cache: bool) -> None:
        from .process_group import broadcast_from_trainer

        _run_beside(lambda: self.engine.update_weights_from_distributed(item.metas, self.group_name,
                                                                        flush_cache=flush_cache),
                    lambda: broadcast_from_trainer(item.flat, self._pg), "engine-receives-bucket")

    def _relay_send(self, groups) -> None:
        import torch.distributed as dist

        owner = self.source.stage_senders[0]
        buf = self._buffers("relay")[0]
        any_bucket = False
        for g, last in groups:
            b = self._pack(g, buf)
            dist.send_object_list([(b.metas, last)], dst=owner)
            dist.send(b.flat, dst=owner)
            self._sent.add(b)
            any_bucket = True
        if not any_bucket:
            dist.send_object_list([None], dst=owner)

    def _relay_recv(self, src_rank: int):
        import torch.distributed as dist

        # the owner's own staging buffer: its own stage is fully delivered before any relay starts,
        # and each relayed bucket is delivered before the next is received
        buf = self._buffers("own", 2)[0]
        while True:
            box = [None]
            dist.recv_object_list(box, src=src_rank)
            if box[0] is None:
                return
            metas, last = box[0]
            nbytes = metas[-1].offset + metas[-1].nbytes
            flat = buf.get(nbytes)[:nbytes]
            dist.recv(flat, src=src_rank)
            yield TensorBucket(flat, metas), (lambda: None), last
            if last:
                return

    def close(self) -> None:
        if self._pg is not None:
            from .process_group import close_weights_update_group

            if self.engine is not None:
                self.engine.destroy_weights_update_group(self.group_name)
            close_weights_update_group(self._pg)
            self._pg = None
        super().close()
