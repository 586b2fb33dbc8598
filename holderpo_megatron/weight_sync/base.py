"""The synchroniser every transport shares: roles, streaming in buckets, the ledger, the engine protocol.

Every trainer rank calls :meth:`WeightSynchronizer.sync` together. Roles (from the
:class:`~.source.WeightSource`): all TP ranks of the first data-parallel replica export their
stage (in step); one *sender* per pipeline stage packs its stage's tensors into buckets of at most
``bucket_bytes``, cast to the engine's dtype; stage 0's sender is the *owner*, the rank that holds
the :class:`~holderpo_megatron.rollout.RolloutEngine`. Later stages' senders relay their buckets to
the owner one at a time (how depends on the transport), so at most two buckets per stage are in
memory. The owner counts every tensor against the model's expected HF tensor list
(:class:`~.buckets.SyncLedger`: each name exactly once, shapes, dtype, total bytes) before it
declares the new weight version.

Around the transfer the owner pauses generation, and afterwards flushes the engine's KV / prefix
cache, sets the weight version (stamped on every later sample) and resumes generation.

A transport is a subclass in its own module (``tensor_transport``, ``distributed_transport``,
``disk_transport``); :mod:`.factory` picks one from the topology.
"""

from __future__ import annotations

import abc
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from ..rollout.interface import RolloutEngine, TensorBucket
from .buckets import DEFAULT_BUCKET_BYTES, BucketBuffer, SyncLedger, pack_bucket
from .source import WeightSource
from .tp_gather import GatheredBucket, StagingArena

__all__ = ["SyncReport", "WeightSynchronizer"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# One item a transport delivers to the engine: a packed bucket, or (zero-copy) a list of named tensors.
Delivery = TensorBucket | list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class SyncReport:
    """One sync as this rank saw it. ``bytes``/``tensors``/``buckets``: what reached the engine
    (owner) or what this rank sent (other senders; 0 on ranks that send nothing). ``seconds``:
    wall time of the whole sync on this rank."""

    transport: str
    version: int
    seconds: float
    bytes: int
    tensors: int
    buckets: int

    @property
    def gb_per_s(self) -> float:
        """Throughput in 10^9 bytes per second (inf for an instantaneous sync)."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def to_dict(self, prefix: str = "weight_sync/") -> dict[str, float]:
        """Metrics: ``weight_sync/seconds``, ``weight_sync/gb_per_s``, ``weight_sync/bytes``,
        ``weight_sync/tensors``, ``weight_sync/buckets``."""
        return {prefix + "seconds": self.seconds, prefix + "gb_per_s": self.gb_per_s, prefix + "bytes": float(self.bytes),
                prefix + "tensors": float(self.tensors), prefix + "buckets": float(self.buckets)}


@dataclass
class _Sent:
    """What this rank sent during one sync (a non-owner sender's report)."""

    bytes: int = 0
    tensors: int = 0
    buckets: int = 0

    def add(self, item: Delivery) -> None:
        if isinstance(item, TensorBucket):
            self.bytes += item.nbytes
            self.tensors += len(item.metas)
        else:
            self.bytes += sum(t.numel() * t.element_size() for _, t in item)
            self.tensors += len(item)
        self.buckets += 1


def _account(ledger: SyncLedger, item: Delivery) -> None:
    if isinstance(item, TensorBucket):
        ledger.add_bucket(item.metas)
    else:
        ledger.add_tensors(item)


def with_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """``(item, is_last)`` per item; the next item is taken before an item is handed out."""
    it = iter(items)
    try:
        cur = next(it)
    except StopIteration:
        return
    for nxt in it:
        yield cur, False
        cur = nxt
    yield cur, True


class WeightSynchronizer(abc.ABC):
    """Push the trainer's current weights into the rollout engine; see the module docstring.

    ``dtype``: the engine's weight dtype (every rank knows it); ``bucket_bytes``: the largest
    bucket, in bytes; ``pipelined``: the owner packs bucket k+1 while the engine loads bucket k.
    ``engine``: on the owner rank only, None elsewhere."""

    name: str = ""
    #: several engine calls make one update, bracketed by begin/end_weight_update (tensor,
    #: distributed); False: one engine call is the whole update (disk)
    brackets_engine_update: bool = True

    def __init__(self, source: WeightSource, engine: RolloutEngine | None, *, dtype: torch.dtype,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, pipelined: bool = True):
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes={bucket_bytes!r} is invalid; allowed: an int >= 1")
        if source.is_owner and engine is None:
            raise ValueError("the owner rank (pipeline stage 0's sender, usually global rank 0) must hold the engine")
        if not source.is_owner and engine is not None:
            raise ValueError("only the owner rank (pipeline stage 0's sender) may hold the engine")
        if engine is not None and engine.dtype != dtype:
            raise ValueError(f"dtype={dtype} but the engine holds {engine.dtype}; pass the engine's dtype")
        self.source = source
        self.engine = engine
        self.dtype = dtype
        self.bucket_bytes = bucket_bytes
        self.pipelined = pipelined
        self._bufs: dict[str, list[BucketBuffer]] = {}
        self._staging = StagingArena(source.device)  # TP > 1: pieces that cannot land in the bucket
        self._sent = _Sent()

    # -- the protocol, the same for every transport ----------------------------------------------
    def sync(self, version: int, declare: bool = True) -> SyncReport:
        """Every trainer rank, together: the engine ends up holding this step's weights, stamped
        ``version``. Returns this rank's :class:`SyncReport`. ``declare=False``: the engine holds
        the new weights (its ledger is complete) but stays paused, not yet stamped; call
        :meth:`declare` once every engine of a fleet has its weights (no sample from mixed weights)."""
        src, eng = self.source, self.engine
        version = int(version)
        t0 = time.perf_counter()
        ledger = SyncLedger(src.expected, self.dtype) if src.is_owner else None
        self._sent = _Sent()
        if eng is not None:
            eng.pause_generation()
            self._connect()
            if self.brackets_engine_update:
                eng.begin_weight_update()
        try:
            flushed = self._transfer(ledger, version)
            if eng is not None and self.brackets_engine_update:
                eng.end_weight_update()
        except BaseException:
            if eng is not None and self.brackets_engine_update:
                self._end_after_failure()
            raise
        if eng is not None:
            ledger.check_complete()
            if not flushed:
                eng.flush_cache()
        if declare:
            self.declare(version)
        seconds = time.perf_counter() - t0
        if ledger is not None:
            return SyncReport(self.name, version, seconds, ledger.bytes, len(ledger.seen), ledger.buckets)
        return SyncReport(self.name, version, seconds, self._sent.bytes, self._sent.tensors, self._sent.buckets)

    def declare(self, version: int) -> None:
        """Owner: stamp the engine's weights ``version`` and let it generate again."""
        if self.engine is not None:
            self.engine.set_weight_version(int(version))
            self.engine.continue_generation()

    def _end_after_failure(self) -> None:
        try:
            self.engine.end_weight_update()
        except Exception as e:  # the transfer's own error is the one to report
            log.error("end_weight_update after a failed sync also failed: %r", e)

    def close(self) -> None:
        """Release what the transport keeps between syncs (process groups, files, buffers)."""
        self._bufs = {}
        self._staging = StagingArena(self.source.device)

    def _buffers(self, key: str, n: int = 1) -> list[BucketBuffer]:
        """Staging buffers kept across syncs (fresh memory costs page faults on every sync)."""
        if key not in self._bufs:
            self._bufs[key] = [self._new_buffer() for _ in range(n)]
        return self._bufs[key]

    # -- hooks -----------------------------------------------------------------------------------
    def _connect(self) -> None:
        """Owner only, before each update: make sure the engine can receive (distributed: the
        weights-update group, opened on the first sync)."""

    def _transfer(self, ledger: SyncLedger | None, version: int) -> bool:
        """Move this rank's part of the weights; ``ledger`` on the owner, None elsewhere.
        True if the engine's cache was flushed with the last update (saves a separate flush).
        Default: stream buckets (tensor, distributed)."""
        return self._stream(ledger)

    def _deliver(self, item: Delivery, flush_cache: bool) -> None:
        """Owner: load one bucket into the engine."""
        raise NotImplementedError

    def _relay_send(self, groups: Iterator[tuple[list[tuple[str, torch.Tensor]] | GatheredBucket, bool]]) -> None:
        """A later stage's sender: hand every ``(group, is_last)`` to the owner, the flag with its
        bucket (so the owner delivers each bucket as it arrives, and the very last flushes the
        engine's cache); a stage without any bucket sends an end marker instead."""
        raise NotImplementedError

    def _relay_recv(self, src_rank: int) -> Iterator[tuple[Delivery, Callable[[], None], bool]]:
        """Owner: yield ``(bucket, done, is_last)`` per bucket relayed by ``src_rank``, up to the one
        flagged last (or an end marker); call ``done()`` once the engine has loaded it (the sender
        may then reuse its buffer)."""
        raise NotImplementedError

    # -- streaming (tensor, distributed) ---------------------------------------------------------
    def _groups(self) -> Iterator[list[tuple[str, torch.Tensor]] | GatheredBucket]:
        return self.source.buckets(self.dtype, self.bucket_bytes)

    def _follow(self) -> None:
        """A TP peer of a sender: send this rank's shards of every bucket, in step with it."""
        for g in self._groups():
            g.send()

    def _stream(self, ledger: SyncLedger | None) -> bool:
        """Every rank's part of a streamed sync; True if the last delivery flushed the cache."""
        src = self.source
        flushed = False
        if src.participates:
            if src.is_owner:
                flushed = self._stream_own(ledger, last_stage=src.pp_size == 1)
            elif src.is_sender:
                self._relay_send(with_last(self._groups()))
            else:
                self._follow()
        if src.is_owner and src.pp_size > 1:
            flushed = self._deliver_relayed(ledger)
        return flushed

    def _deliver_relayed(self, ledger: SyncLedger) -> bool:
        """Owner: every later stage's buckets, in stage order, each delivered as it arrives; the
        last stage's last one flushes the engine's cache in the same call (SGLang's standalone
        flush on CPU runs a full gc pass, ~0.4 s)."""
        flushed = False
        for stage in range(1, self.source.pp_size):
            for bucket, done, last in self._relay_recv(self.source.stage_senders[stage]):
                flush = last and stage == self.source.pp_size - 1
                _account(ledger, bucket)
                self._deliver(bucket, flush_cache=flush)
                done()
                flushed = flushed or flush
        return flushed

    def _stream_own(self, ledger: SyncLedger, last_stage: bool) -> bool:
        """The owner's own stage: pack bucket k+1 while the engine loads bucket k (a delivery
        thread; the engine works in its own process, so the two overlap on two cores). Each bucket
        goes to the engine as soon as it is packed; whether it is the last (which flushes the
        cache, when this stage is the last) is known from the next group, listed first (listing
        costs no copy). Two staging buffers: one being packed, one loading.
        True if the last bucket flushed the cache."""
        bufs = self._buffers("own", 2)
        inflight: deque = deque()
        flushed = False
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync-deliver") as ex:
            try:
                for k, (g, last) in enumerate(with_last(self._groups())):
                    while len(inflight) > (1 if self.pipelined else 0):  # bucket k-2's buffer (k % 2) must be free
                        inflight.popleft().result()
                    b = self._pack(g, bufs[k % 2])
                    _account(ledger, b)
                    flush = last and last_stage
                    inflight.append(ex.submit(self._deliver, b, flush))
                    flushed = flushed or flush
                while inflight:
                    inflight.popleft().result()
            finally:
                for f in inflight:
                    f.cancel()
        return flushed

    def _new_buffer(self) -> BucketBuffer:
        return BucketBuffer(self.source.device)

    def _pack(self, group: list[tuple[str, torch.Tensor]] | GatheredBucket, buffer: BucketBuffer) -> Delivery:
        """What one delivery carries: a packed bucket (or, zero-copy, named tensors)."""
        if isinstance(group, GatheredBucket):
            return group.pack(buffer, self._staging)
        return pack_bucket(group, buffer)
