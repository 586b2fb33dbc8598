"""Export at TP > 1: each bucket's tensor-parallel shards gathered to the stage's sender only.

Every TP rank of the sending replica lists the same parameters (``checkpoint.export_params``) and
cuts them into the same buckets (by HF bytes in the engine's dtype; a parameter never straddles
two). Per bucket, the sender posts one receive per piece of each peer's shard, straight into the
bucket where the layout allows (dim-0 shards, gate/up halves: contiguous slices of their HF
tensors; the padded vocab, put last in its bucket, with its padding rows in spare bytes past
the bucket's end) and otherwise into a staging arena reused across buckets (dim-1 shards, interleaved
QKV, a dtype cast); it copies its own shard meanwhile, then writes the
staged pieces into place. Its peers only send views of their parameters: they allocate nothing.
Point-to-point receives rather than ``torch.distributed.gather``: gloo's gather receives into one
temporary of every rank's bytes and copies out of it; a receive lands where it is pointed.

``shared`` (CPU, every rank of the TP group on one host): instead of the bytes, a peer sends
shared-memory handles of its shards (its parameters moved into shared memory once, in place), the
sender copies them straight into the bucket, then releases the peer. The mappings are kept from one
sync to the next, so a sync maps nothing anew: what crosses the process boundary per bucket is a few
hundred bytes of handles and one release token, and the shards' bytes are copied once (a gloo send
copies them through a socket, twice). On GPU the point-to-point path is the one (NCCL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..checkpoint.mapping import ExportParam
from ..rollout.interface import TensorBucket, TensorMeta
from ..rollout.shared_memory import dumps_shared, loads_shared
from .buckets import BucketBuffer, share_all

__all__ = ["GatheredBucket", "PeerShards", "StagingArena", "gathered_buckets"]


@dataclass(frozen=True)
class TPGroup:
    """This replica's tensor-parallel group: ``ranks`` (global, by TP rank), this rank's TP rank,
    the process group, and the TP rank that gathers (the stage's sender)."""

    ranks: tuple[int, ...]
    rank: int
    group: object
    dst: int = 0


class PeerShards:
    """The ``shared`` TP gather's state on one rank: on the sender, the peers' shards it has mapped
    (kept alive between syncs, so that unpickling a peer's handles finds the mapping in torch's
    storage cache instead of mapping the memory again and faulting every page in)."""

    def __init__(self):
        self._held: dict[tuple[int, str], list] = {}

    def receive(self, src: int, key: str, group) -> list:
        """Sender: one peer's pieces of one bucket (per parameter, its export pieces)."""
        import torch.distributed as dist

        box = [None]
        dist.recv_object_list(box, src=src, group=group)
        pieces = loads_shared(box[0])  # before the previous sync's are dropped: cache hits
        self._held[(src, key)] = pieces
        return pieces


class StagingArena:
    """Scratch memory for one bucket's staged pieces, handed out back to back from one buffer
    reused across buckets and syncs. A bucket that needs more than the buffer holds gets the rest
    as tensors of its own, and the next bucket starts from a buffer of the largest need seen, so
    from the second sync on one buffer serves every bucket."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buf: torch.Tensor | None = None
        self._want = 0
        self._used = 0

    def reset(self) -> None:
        """Every piece handed out so far has been written into place: start again from the
        beginning of a buffer large enough for the largest need seen."""
        self._want = max(self._want, self._used)
        self._used = 0
        if self._want and (self._buf is None or self._buf.numel() < self._want):
            self._buf = None
            self._buf = torch.empty(self._want, dtype=torch.uint8, device=self.device)

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        start = -(-self._used // 64) * 64  # aligned for any dtype
        self._used = start + nbytes
        if self._buf is not None and self._used <= self._buf.numel():
            return self._buf[start:self._used].view(dtype).view(shape)
        return torch.empty(shape, dtype=dtype, device=self.device)


class GatheredBucket:
    """One bucket's parameters. The sender calls :meth:`pack` and every peer :meth:`send`, in the
    same order of buckets."""

    def __init__(self, params: Sequence[ExportParam], dtype: torch.dtype, tp: TPGroup, arch,
                 shared: PeerShards | None = None):
        # a padded-vocab parameter goes last: its padding rows are received past the bucket's end
        self.params = sorted(params, key=lambda p: p.mapping.padded)
        self.dtype = dtype
        self.tp = tp
        self.arch = arch
        self.shared = shared  # None: the peers send their bytes (point to point)
        item = torch.empty((), dtype=dtype).element_size()
        self.metas: list[TensorMeta] = []
        off = 0
        for p in self.params:
            for name, shape in zip(p.names, p.shapes):
                nb = int(torch.Size(shape).numel()) * item
                self.metas.append(TensorMeta(name=name, dtype=dtype, shape=tuple(shape), offset=off, nbytes=nb))
                off += nb
        self.nbytes = off
        # the padded vocab's padding rows are received into spare bytes past the bucket's end, so
        # its shards land in place
        last = self.params[-1]
        self.spare = 0
        if last.mapping.padded and last.local.dtype == dtype:
            rows = last.local.shape[0] * len(tp.ranks)
            self.spare = (rows - last.shapes[0][0]) * int(torch.Size(last.shapes[0][1:]).numel()) * item

    def pack(self, buffer: BucketBuffer, stage: StagingArena) -> TensorBucket:
        """The sender: every HF tensor of the bucket, gathered and laid out in ``buffer``."""
        import torch.distributed as dist

        tp = self.tp
        buf = buffer.get(self.nbytes + self.spare)
        stage.reset()
        views = [buf[m.offset: m.offset + m.nbytes].view(m.dtype).view(m.shape) for m in self.metas]
        if self.spare:  # the last tensor with its padding rows after it
            m = self.metas[-1]
            views[-1] = buf[m.offset: m.offset + m.nbytes + self.spare].view(m.dtype).view(
                (-1,) + tuple(m.shape[1:]))
        views = iter(views)
        peers = {}  # shared: TP rank -> its pieces, per parameter of the bucket
        if self.shared is not None:
            peers = {r: self.shared.receive(g, self.metas[0].name, tp.group)
                     for r, g in enumerate(tp.ranks) if r != tp.rank}
        reqs, copies, finishes = [], [], []
        tag = 0
        for k, p in enumerate(self.params):
            outs = [next(views) for _ in p.names]
            targets, finish = p.mapping.gather_plan(p.local, outs, self.arch, len(tp.ranks), stage)
            pieces = p.mapping.export_pieces(p.local)
            for i, (piece, per_rank) in enumerate(zip(pieces, targets)):
                for r, target in enumerate(per_rank):
                    if r == tp.rank:
                        copies.append((target, piece))
                    elif self.shared is not None:
                        copies.append((target, peers[r][k][i]))
                    else:
                        reqs.append(dist.irecv(target, src=tp.ranks[r], group=tp.group, tag=tag))
                tag += 1
            finishes.append(finish)
        for target, piece in copies:  # (point to point: while the peers' bytes arrive)
            target.copy_(piece)
        for req in reqs:
            req.wait()
        if self.shared is not None:  # every peer's shards are read: it may go on
            token = torch.zeros(1)
            for r in peers:
                dist.send(token, dst=tp.ranks[r], group=tp.group)
        for finish in finishes:
            finish()
        stage.reset()  # sized now for the largest need seen, so the next bucket (or sync) fits
        return TensorBucket(buffer=buf, metas=list(self.metas))

    def send(self) -> None:
        """A peer: send this rank's shards (views of the parameters, no copy) to the sender; shared:
        their handles, then wait until the sender has read them."""
        import torch.distributed as dist

        tp = self.tp
        if self.shared is not None:
            pieces = [tuple(p.mapping.export_pieces(p.local)) for p in self.params]
            share_all(t for ps in pieces for t in ps)  # once: no-op while they stay shared
            dist.send_object_list([dumps_shared(pieces)], dst=tp.ranks[tp.dst], group=tp.group)
            token = torch.empty(1)
            dist.recv(token, src=tp.ranks[tp.dst], group=tp.group)
            return
        reqs, tag = [], 0
        for p in self.params:
            for piece in p.mapping.export_pieces(p.local):
                reqs.append(dist.isend(piece, dst=tp.ranks[tp.dst], group=tp.group, tag=tag))
                tag += 1
        for req in reqs:
            req.wait()


def gathered_buckets(params: Sequence[ExportParam], dtype: torch.dtype, bucket_bytes: int, tp: TPGroup,
                     arch, shared: PeerShards | None = None) -> Iterator[GatheredBucket]:
    """Consecutive parameters in buckets of at most ``bucket_bytes`` HF bytes in ``dtype`` (a larger
    parameter forms a bucket of its own; a second padded vocab starts a new one); every TP rank
    cuts the same buckets. ``shared``: gathered through shared-memory handles (see the module)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} is invalid; allowed: an int >= 1")
    item = torch.empty((), dtype=dtype).element_size()
    group: list[ExportParam] = []
    used = 0
    for p in params:
        nb = sum(int(torch.Size(s).numel()) for s in p.shapes) * item
        if group and used + nb > bucket_bytes:
            yield GatheredBucket(group, dtype, tp, arch, shared)
            group, used = [], 0
        if group and p.mapping.padded and any(q.mapping.padded for q in group):
            yield GatheredBucket(group, dtype, tp, arch, shared)  # one padded vocab per bucket: it goes last
            group, used = [], 0
        group.append(p)
        used += nb
    if group:
        yield GatheredBucket(group, dtype, tp, arch, shared)
