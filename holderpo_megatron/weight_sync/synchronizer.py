"""Megatron shards -> HF tensors -> rollout engine: one synchroniser interface, one class per transport.

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

=================  ===========================================  ==============================================
transport          engine call                                  stage relay to the owner
=================  ===========================================  ==============================================
``tensor``         ``update_weights_from_tensor`` per bucket    shared-memory handles (CPU; no data copied)
``distributed``    ``update_weights_from_distributed`` per      point-to-point send over the trainer world
                   bucket, broadcast over a weights-update group
``disk``           ``update_weights_from_disk`` once            none: each sender writes its own safetensors
=================  ===========================================  ==============================================
"""

from __future__ import annotations

import abc
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..rollout.interface import RolloutEngine, TensorBucket, TensorMeta
from ..rollout.shared_memory import dumps_shared, loads_shared
from .buckets import DEFAULT_BUCKET_BYTES, BucketBuffer, SyncLedger, group_into_buckets, pack_bucket, pack_unshared
from .source import WeightSource

__all__ = ["SyncReport", "SyncTopology", "WeightSynchronizer", "TensorTransport", "DistributedTransport",
           "DiskTransport", "TRANSPORTS", "choose_transport", "make_weight_synchronizer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    """``bytes``/``tensors``/``buckets``: what reached the engine (owner) or what this rank sent."""

    transport: str
    version: int
    seconds: float
    bytes: int
    tensors: int
    buckets: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")

    def to_dict(self, prefix: str = "weight_sync/") -> dict[str, float]:
        return {prefix + "seconds": self.seconds, prefix + "gb_per_s": self.gb_per_s, prefix + "bytes": float(self.bytes),
                prefix + "tensors": float(self.tensors), prefix + "buckets": float(self.buckets)}


class WeightSynchronizer(abc.ABC):
    """Push the trainer's current weights into the rollout engine; see the module docstring."""

    name: str = ""

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

    # -- the protocol, the same for every transport ----------------------------------------------
    def sync(self, version: int) -> SyncReport:
        src, eng = self.source, self.engine
        t0 = time.perf_counter()
        ledger = SyncLedger(src.expected, self.dtype) if src.is_owner else None
        self._sent = [0, 0, 0]  # bytes, tensors, buckets sent by this rank
        self._flushed = False  # the transport flushed the engine's cache with its last update
        if eng is not None:
            eng.pause_generation()
            self._begin()
        try:
            self._transfer(ledger)
            if eng is not None:
                self._end()
        except BaseException:
            if eng is not None:
                self._abort()
            raise
        if eng is not None:
            ledger.check_complete()
            if not self._flushed:
                eng.flush_cache()
            eng.set_weight_version(version)
            eng.continue_generation()
        seconds = time.perf_counter() - t0
        if ledger is not None:
            return SyncReport(self.name, version, seconds, ledger.bytes, len(ledger.seen), ledger.buckets)
        return SyncReport(self.name, version, seconds, *self._sent)

    def close(self) -> None:
        """Release what the transport keeps between syncs (process groups, files, buffers)."""
        self._bufs = {}

    def _buffers(self, key: str, n: int = 1) -> list[BucketBuffer]:
        """Staging buffers kept across syncs (fresh memory costs page faults on every sync)."""
        if not hasattr(self, "_bufs"):
            self._bufs = {}
        if key not in self._bufs:
            self._bufs[key] = [self._new_buffer() for _ in range(n)]
        return self._bufs[key]

    # -- hooks -----------------------------------------------------------------------------------
    def _begin(self) -> None:
        pass

    def _end(self) -> None:
        pass

    def _abort(self) -> None:
        pass

    @abc.abstractmethod
    def _transfer(self, ledger: SyncLedger | None) -> None: ...

    # -- shared by the streaming transports (tensor, distributed) --------------------------------
    def _groups(self):
        return group_into_buckets(self.source.named_tensors(self.dtype), self.bucket_bytes)

    def _stream(self, ledger: SyncLedger | None) -> None:
        src = self.source
        # The owner delivers each bucket once it knows whether another follows, so the last one
        # can flush the engine's cache in the same call (SGLang's standalone flush on CPU runs a
        # full gc pass, ~0.4 s).
        pending: list = []  # [(bucket, done)] at most one

        def deliver(bucket, done, last=False):
            _account(ledger, bucket)
            self._deliver(bucket, flush_cache=last)
            done()

        def push(bucket, done):
            if pending:
                deliver(*pending.pop())
            pending.append((bucket, done))

        if src.participates:
            if src.is_owner:
                self._stream_own(ledger, last_stage=src.pp_size == 1)
            elif src.is_sender:
                self._relay_send(self._groups())
            else:
                for _ in self._groups():  # TP peers: the export all-gathers in step with the sender
                    pass
        if src.is_owner and src.pp_size > 1:
            for stage in range(1, src.pp_size):
                for b, done in self._relay_recv(src.stage_senders[stage]):
                    push(b, done)
            if pending:
                deliver(*pending.pop(), last=True)
                self._flushed = True

    def _stream_own(self, ledger: SyncLedger, last_stage: bool) -> None:
        """The owner's own stage: pack bucket k+1 while the engine loads bucket k (a delivery
        thread; the engine works in its own process, so the two overlap on two cores). Three
        staging buffers: one being packed, one waiting (last-bucket lookahead), one loading."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        bufs = self._buffers("own", 3)
        inflight: deque = deque()
        pending = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-sync-deliver") as ex:
            try:
                for k, g in enumerate(self._groups()):
                    while len(inflight) > (1 if self.pipelined else 0):  # bucket k-3's buffer (k % 3) must be free
                        inflight.popleft().result()
                    b = self._pack(g, bufs[k % 3])
                    _account(ledger, b)
                    if pending is not None:
                        inflight.append(ex.submit(self._deliver, pending, False))
                    pending = b
                if pending is not None:
                    inflight.append(ex.submit(self._deliver, pending, last_stage))
                    self._flushed = last_stage
                while inflight:
                    inflight.popleft().result()
            finally:
                for f in inflight:
                    f.cancel()

    def _new_buffer(self) -> BucketBuffer:
        return BucketBuffer(self.source.device)

    def _pack(self, group, buffer: BucketBuffer):
        """What one delivery carries: a packed bucket (or, zero-copy, named tensors)."""
        return pack_bucket(group, buffer)

    def _count(self, b) -> None:
        if isinstance(b, TensorBucket):
            self._sent[0] += b.nbytes
            self._sent[1] += len(b.metas)
        else:
            self._sent[0] += sum(t.numel() * t.element_size() for _, t in b)
            self._sent[1] += len(b)
        self._sent[2] += 1

    def _deliver(self, bucket: TensorBucket, flush_cache: bool) -> None:
        raise NotImplementedError

    def _relay_send(self, groups) -> None:
        raise NotImplementedError

    def _relay_recv(self, src_rank: int):
        raise NotImplementedError


class TensorTransport(WeightSynchronizer):
    """Colocated: tensors handed to the engine in memory (``update_weights_from_tensor``, between
    ``begin_weight_update`` and ``end_weight_update``); all senders must share the engine's host.

    On CPU at TP1 (``zero_copy``, the default there) each sender first moves its parameters into shared
    memory (once, in place); a bucket is then a list of tensors sent as shared-memory handles:
    views of the parameters as they are, and only what the export creates (q/k/v splits,
    TP-gathered or dtype-cast tensors) is copied, into a reused shared buffer. The engine's
    scheduler maps the memory and copies once, into its own weights. Without ``zero_copy`` (and
    on GPU) every bucket is packed into one flat buffer (SGLang's flattened-bucket format).
    Later pipeline stages hand the owner handles, not bytes. Senders double-buffer, and the owner
    prepares bucket k+1 while the engine loads bucket k."""

    name = "tensor"

    def __init__(self, source, engine, *, dtype, bucket_bytes=DEFAULT_BUCKET_BYTES, pipelined: bool = True,
                 zero_copy: bool | None = None):
        super().__init__(source, engine, dtype=dtype, bucket_bytes=bucket_bytes, pipelined=pipelined)
        # default: on CPU at TP1, where most exported tensors are views of the parameters (at TP>1
        # they are all-gathered copies: packing them flat is cheaper than one handle per tensor)
        self.zero_copy = (source.device.type == "cpu" and source.tp_size == 1) if zero_copy is None else bool(zero_copy)
        if self.zero_copy and source.device.type != "cpu":
            raise ValueError("zero_copy=True needs CPU tensors (on GPU the transport sends CUDA IPC handles)")
        self._shared = False

    def _new_buffer(self) -> BucketBuffer:
        return BucketBuffer(self.source.device, shared=True)

    def _pack(self, group, buffer):
        return pack_unshared(group, buffer) if self.zero_copy else pack_bucket(group, buffer)

    def _transfer(self, ledger):
        if self.zero_copy and not self._shared and self.source.is_sender:
            self.source.share_memory()
            self._shared = True
        self._stream(ledger)

    def _begin(self):
        self.engine.begin_weight_update()

    def _end(self):
        self.engine.end_weight_update()

    def _abort(self):
        try:
            self.engine.end_weight_update()
        except Exception as e:  # the transfer's own error is the one to report
            log.error("end_weight_update after a failed sync also failed: %r", e)

    def _deliver(self, bucket, flush_cache: bool) -> None:
        if isinstance(bucket, TensorBucket):
            self.engine.update_weights_from_bucket(bucket, flush_cache=flush_cache)
        else:
            self.engine.update_weights_from_tensors(bucket, flush_cache=flush_cache)

    def _relay_send(self, groups) -> None:
        import torch.distributed as dist

        owner = self.source.stage_senders[0]
        buffers = self._buffers("relay", 2)
        acks: list = []  # (request, tensor) per bucket in flight, oldest first
        for k, g in enumerate(groups):
            if len(acks) == 2:  # bucket k-2's buffer is about to be reused: wait until the engine loaded it
                acks.pop(0)[0].wait()
            b = self._pack(g, buffers[k % 2])
            # post the ack's receive first: gloo's send waits for a matching receive, and the owner
            # acknowledges bucket k while this rank is already sending bucket k+1
            ack = torch.zeros(1)
            acks.append((dist.irecv(ack, src=owner), ack))
            dist.send_object_list([dumps_shared(b)], dst=owner)
            self._count(b)
        dist.send_object_list([None], dst=owner)
        for req, _ in acks:
            req.wait()

    def _relay_recv(self, src_rank: int):
        import torch.distributed as dist

        ack = torch.ones(1)
        while True:
            box = [None]
            dist.recv_object_list(box, src=src_rank)
            if box[0] is None:
                return
            yield loads_shared(box[0]), (lambda: dist.send(ack, dst=src_rank))



class DistributedTransport(WeightSynchronizer):
    """Engine elsewhere: the owner and the engine's ranks form a weights-update process group
    (``init_weights_update_group``, once, on the first sync) and every bucket is broadcast from the
    owner (``update_weights_from_distributed``, flattened-bucket format). Later stages send their
    buckets to the owner point to point over the trainer's world. ``backend``: "gloo" on CPU
    (SGLang accepts it), "nccl" on GPU."""

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

    def _open_group(self):
        from .process_group import free_port, open_weights_update_group

        port = self.master_port or free_port(self.master_address)
        world = 1 + self.engine.weights_update_world_size
        errors = []

        def engine_side():
            try:
                self.engine.init_weights_update_group(self.master_address, port, self.group_name, self.backend)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=engine_side, name="engine-joins-weights-group", daemon=True)
        t.start()
        try:
            self._pg = open_weights_update_group(self.master_address, port, world, self.group_name, self.backend)
        finally:
            t.join()
        if errors:
            raise errors[0]

    def _begin(self):
        if self._pg is None:
            self._open_group()
        self.engine.begin_weight_update()

    def _end(self):
        self.engine.end_weight_update()

    def _abort(self):
        try:
            self.engine.end_weight_update()
        except Exception as e:
            log.error("end_weight_update after a failed sync also failed: %r", e)

    def _deliver(self, bucket: TensorBucket, flush_cache: bool) -> None:
        from .process_group import broadcast_from_trainer

        errors = []

        def engine_side():
            try:
                self.engine.update_weights_from_distributed(bucket.metas, self.group_name, flush_cache=flush_cache)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=engine_side, name="engine-receives-bucket", daemon=True)
        t.start()
        try:
            broadcast_from_trainer(bucket.flat, self._pg)
        finally:
            t.join()
        if errors:
            raise errors[0]

    def _relay_send(self, groups) -> None:
        import torch.distributed as dist

        owner = self.source.stage_senders[0]
        buf = self._buffers("relay")[0]
        for g in groups:
            b = pack_bucket(g, buf)
            dist.send_object_list([b.metas], dst=owner)
            dist.send(b.flat, dst=owner)
            self._count(b)
        dist.send_object_list([None], dst=owner)

    def _relay_recv(self, src_rank: int):
        import torch.distributed as dist

        # the owner's own staging buffers: its own stage is fully delivered before any relay starts;
        # two alternate (one bucket may wait for the next: last-bucket flush)
        bufs = self._buffers("own", 3)[:2]
        k = 0
        while True:
            box = [None]
            dist.recv_object_list(box, src=src_rank)
            metas: list[TensorMeta] | None = box[0]
            if metas is None:
                return
            nbytes = metas[-1].offset + metas[-1].nbytes
            flat = bufs[k % 2].get(nbytes)[:nbytes]
            k += 1
            dist.recv(flat, src=src_rank)
            yield TensorBucket(flat, metas), (lambda: None)

    def _transfer(self, ledger):
        self._stream(ledger)

    def close(self) -> None:
        if self._pg is not None:
            from .process_group import close_weights_update_group

            if self.engine is not None:
                self.engine.destroy_weights_update_group(self.group_name)
            close_weights_update_group(self._pg)
            self._pg = None
        super().close()


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _write_safetensors(path: Path, bucket: TensorBucket) -> None:
    """A bucket's flat buffer is already a safetensors data section: write the header, then it."""
    header = {"__metadata__": {"format": "pt"}}
    for m in bucket.metas:
        header[m.name] = {"dtype": _ST_DTYPES[m.dtype], "shape": list(m.shape), "data_offsets": [m.offset, m.offset + m.nbytes]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        flat = bucket.flat.cpu()
        if flat.numel():
            f.write(memoryview(flat.numpy()))
    os.replace(tmp, path)


class DiskTransport(WeightSynchronizer):
    """The slow fallback that always works: each stage's sender writes its buckets as safetensors
    files into ``root/step-<version>/`` (a filesystem the engine can read), the owner adds the
    index and ``config.json`` (from ``config_dir``, default the engine's model directory) and calls
    ``update_weights_from_disk``. Only the newest step directory is kept. ``root=None``: a
    temporary directory on the owner's host, valid when every sender shares that host."""

    name = "disk"

    def __init__(self, source, engine, *, dtype, bucket_bytes=DEFAULT_BUCKET_BYTES, pipelined: bool = True,
                 root: str | None = None, config_dir: str | None = None):
        super().__init__(source, engine, dtype=dtype, bucket_bytes=bucket_bytes, pipelined=pipelined)
        if root is None:
            root = self._agree_on_tmp_root()
        self.root = Path(root)
        if source.is_owner:
            self.config_dir = Path(config_dir or getattr(getattr(engine, "config", None), "model_path", "") or "")
            if not (self.config_dir / "config.json").is_file():
                raise ValueError(f"config_dir={str(self.config_dir)!r} has no config.json; pass the HF model directory")
        self._last: Path | None = None

    def _agree_on_tmp_root(self) -> str:
        src = self.source
        root = tempfile.mkdtemp(prefix="holderpo-weights-") if src.is_owner else None
        if src.pp_size > 1 and src.is_sender:
            import torch.distributed as dist

            box = [root]
            dist.broadcast_object_list(box, src=src.stage_senders[0], group=src.sender_group)
            root = box[0]
        return root or ""

    def _transfer(self, ledger):
        import torch.distributed as dist

        src = self.source
        step_dir = self.root / f"step-{self._version}"
        files: list[tuple[str, list[TensorMeta]]] = []
        if src.participates:
            if src.is_sender:
                step_dir.mkdir(parents=True, exist_ok=True)
                buf = self._buffers("disk")[0]
                for k, g in enumerate(self._groups()):
                    b = pack_bucket(g, buf)
                    fname = f"model-pp{src.pp_rank:03d}-{k:05d}.safetensors"
                    _write_safetensors(step_dir / fname, b)
                    files.append((fname, b.metas))
                    self._count(b)
            else:
                for _ in self._groups():
                    pass
        if src.is_sender and not src.is_owner:
            dist.send_object_list([files], dst=src.stage_senders[0])
        if src.is_owner:
            for stage in range(1, src.pp_size):
                box = [None]
                dist.recv_object_list(box, src=src.stage_senders[stage])
                files += box[0]
            weight_map = {}
            for fname, metas in files:
                ledger.add_bucket(metas)
                weight_map.update({m.name: fname for m in metas})
            ledger.check_complete()
            index = {"metadata": {"total_size": ledger.bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (step_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            for side in ("config.json", "generation_config.json"):
                if (self.config_dir / side).is_file():
                    shutil.copyfile(self.config_dir / side, step_dir / side)
            self.engine.update_weights_from_disk(str(step_dir))  # flushes the cache itself
            self._flushed = True
            if self._last is not None and self._last != step_dir:
                shutil.rmtree(self._last, ignore_errors=True)
            self._last = step_dir

    def sync(self, version: int) -> SyncReport:
        self._version = int(version)
        return super().sync(version)


def _account(ledger: SyncLedger, item) -> None:
    if isinstance(item, TensorBucket):
        ledger.add_bucket(item.metas)
    else:
        ledger.add_tensors(item)


TRANSPORTS: dict[str, type[WeightSynchronizer]] = {
    "tensor": TensorTransport, "distributed": DistributedTransport, "disk": DiskTransport,
}


@dataclass(frozen=True)
class SyncTopology:
    """Where the engine runs relative to the trainer.

    ``colocated``: on the owner's node, sharing its memory (the embedded engine, or servers
    started on this node) -> ``tensor``. Otherwise the engine is reachable over the network ->
    ``distributed``; ``disk`` only on request (or ``network=False``: no process group can reach
    the engine, but a shared filesystem can)."""

    colocated: bool = True
    network: bool = True


def choose_transport(topology: SyncTopology) -> str:
    if topology.colocated:
        return "tensor"
    return "distributed" if topology.network else "disk"


def make_weight_synchronizer(source: WeightSource, engine: RolloutEngine | None, *, dtype: torch.dtype,
                             transport: str = "auto", topology: SyncTopology = SyncTopology(),
                             bucket_bytes: int = DEFAULT_BUCKET_BYTES, **transport_kwargs) -> WeightSynchronizer:
    """The synchroniser for ``transport`` ("auto": picked from ``topology``). Call on every trainer
    rank; ``engine`` on the owner rank only, None elsewhere. ``dtype``: the engine's weight dtype
    (``SGLangEngineConfig.torch_dtype``), known on every rank."""
    name = choose_transport(topology) if transport == "auto" else transport
    if name not in TRANSPORTS:
        raise ValueError(f"transport={transport!r} is invalid; allowed: 'auto' | {' | '.join(map(repr, TRANSPORTS))}")
    return TRANSPORTS[name](source, engine, dtype=dtype, bucket_bytes=bucket_bytes, **transport_kwargs)
