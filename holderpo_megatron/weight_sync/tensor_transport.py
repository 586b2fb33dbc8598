"""The ``tensor`` transport: tensors handed to a colocated engine in memory (shared memory on CPU,
CUDA IPC handles on GPU); every stage sender must share the engine's host."""

from __future__ import annotations

import torch

from ..rollout.interface import TensorBucket
from ..rollout.shared_memory import dumps_shared, loads_shared
from .base import Delivery, WeightSynchronizer
from .buckets import DEFAULT_BUCKET_BYTES, BucketBuffer, SyncLedger, pack_unshared
from .tp_gather import GatheredBucket

__all__ = ["TensorTransport"]


class TensorTransport(WeightSynchronizer):
    """Colocated: tensors handed to the engine in memory (``update_weights_from_tensor``, between
    ``begin_weight_update`` and ``end_weight_update``); all senders must share the engine's host.

    On CPU at TP1 (``zero_copy``, the default there) each sender first moves its parameters into shared
    memory (once, in place); a bucket is then a list of tensors sent as shared-memory handles:
    views of the parameters as they are, and only what the export creates (q/k/v splits,
    dtype-cast tensors) is copied, into a reused shared buffer. The engine's
    scheduler maps the memory and copies once, into its own weights. Without ``zero_copy`` (and
    on GPU) every bucket is packed into one flat buffer (SGLang's flattened-bucket format).
    Later pipeline stages hand the owner handles, not bytes. Senders double-buffer, and the owner
    prepares bucket k+1 while the engine loads bucket k."""

    name = "tensor"

    def __init__(self, source, engine, *, dtype, bucket_bytes=DEFAULT_BUCKET_BYTES, pipelined: bool = True,
                 zero_copy: bool | None = None):
        super().__init__(source, engine, dtype=dtype, bucket_bytes=bucket_bytes, pipelined=pipelined)
        # default: on CPU at TP1, where most exported tensors are views of the parameters (at TP>1
        # every bucket is gathered from the TP ranks straight into a flat buffer)
        self.zero_copy = (source.device.type == "cpu" and source.tp_size == 1) if zero_copy is None else bool(zero_copy)
        if self.zero_copy and source.device.type != "cpu":
            raise ValueError("zero_copy=True needs CPU tensors (on GPU the transport sends CUDA IPC handles)")
        self._shared = False

    def _new_buffer(self) -> BucketBuffer:
        return BucketBuffer(self.source.device, shared=True)

    def _pack(self, group, buffer) -> Delivery:
        if self.zero_copy and not isinstance(group, GatheredBucket):
            return pack_unshared(group, buffer)
        return super()._pack(group, buffer)  # TP > 1: gathered straight into the flat bucket

    def _transfer(self, ledger: SyncLedger | None, version: int) -> bool:
        if self.zero_copy and not self._shared and self.source.is_sender:
            self.source.share_memory()  # once: the parameters stay in shared memory afterwards
            self._shared = True
        return self._stream(ledger)

    def _deliver(self, item: Delivery, flush_cache: bool) -> None:
        if isinstance(item, TensorBucket):
            self.engine.update_weights_from_bucket(item, flush_cache=flush_cache)
        else:
            self.engine.update_weights_from_tensors(item, flush_cache=flush_cache)

    def _relay_send(self, groups) -> None:
        import torch.distributed as dist

        owner = self.source.stage_senders[0]
        buffers = self._buffers("relay", 2)
        acks: list = []  # (request, tensor) per bucket in flight, oldest first
        sends: list = []  # the handles' messages, sent without waiting for the owner to take them
        any_bucket = False
        for k, (g, last) in enumerate(groups):
            if len(acks) == 2:  # bucket k-2's buffer is about to be reused: wait until the engine loaded it
                acks.pop(0)[0].wait()
            b = self._pack(g, buffers[k % 2])
            # post the ack's receive first: the owner acknowledges bucket k while this rank may
            # already be packing bucket k+1
            ack = torch.zeros(1)
            acks.append((dist.irecv(ack, src=owner), ack))
            # handles, not bytes; not waited for: this rank packs its next bucket while the owner
            # still delivers its own stage
            sends += _isend_bytes(dumps_shared((b, last)), owner)
            self._sent.add(b)
            any_bucket = True
        if not any_bucket:
            sends += _isend_bytes(dumps_shared(None), owner)
        for req in sends:
            req.wait()
        for req, _ in acks:
            req.wait()

    def _relay_recv(self, src_rank: int):
        import torch.distributed as dist

        ack = torch.ones(1)
        while True:
            item = loads_shared(_recv_bytes(src_rank))
            if item is None:
                return
            bucket, last = item
            yield bucket, (lambda: dist.send(ack, dst=src_rank)), last
            if last:
                return


def _isend_bytes(data: bytes, dst: int) -> list:
    """``data`` to ``dst`` without waiting: its length, then the bytes (two messages, in order).
    Returns the requests; the tensors stay alive with them."""
    import torch.distributed as dist

    size = torch.tensor([len(data)], dtype=torch.int64)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return [_Keep(dist.isend(size, dst=dst), size), _Keep(dist.isend(payload, dst=dst), payload)]


def _recv_bytes(src: int) -> bytes:
    import torch.distributed as dist

    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src=src)
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(payload, src=src)
    return payload.numpy().tobytes()


class _Keep:
    """A request and the tensor it sends, kept alive together until it is waited for."""

    def __init__(self, req, tensor: torch.Tensor):
        self.req, self.tensor = req, tensor

    def wait(self) -> None:
        self.req.wait()
