"""Packing HF-named tensors into size-bounded buckets, and the ledger proving each was sent once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping

import torch

from ..rollout.interface import TensorBucket, TensorMeta
from ..rollout.shared_memory import share_tensor

__all__ = ["DEFAULT_BUCKET_BYTES", "BucketBuffer", "group_into_buckets", "pack_bucket", "pack_unshared", "is_shared",
           "share_all", "SyncLedger"]

DEFAULT_BUCKET_BYTES = 512 * 1024**2


def group_into_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                       ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most ``bucket_bytes`` (a larger tensor forms a group of its own).
    Tensors are held by reference until their group is yielded (exported tensors are mostly views
    of the parameters, so a group costs little beyond its fused-layout copies)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes={bucket_bytes} is invalid; allowed: an int >= 1")
    group: list[tuple[str, torch.Tensor]] = []
    used = 0
    for name, t in named_tensors:
        nb = t.numel() * t.element_size()
        if group and used + nb > bucket_bytes:
            yield group
            group, used = [], 0
        group.append((name, t))
        used += nb
    if group:
        yield group


class BucketBuffer:
    """One reusable flat ``uint8`` staging buffer (grown on demand). ``shared=True`` puts it in
    shared memory, shared by file name, so an engine process can map it without a copy."""

    def __init__(self, device: torch.device | str = "cpu", shared: bool = False):
        self.device = torch.device(device)
        self.shared = shared
        self._buf: torch.Tensor | None = None

    def get(self, nbytes: int) -> torch.Tensor:
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            if self.shared and self.device.type == "cpu":
                share_tensor(buf)
            self._buf = buf
        return self._buf


def pack_bucket(group: list[tuple[str, torch.Tensor]], buffer: BucketBuffer) -> TensorBucket:
    """Copy a group into the buffer back to back (one dtype per bucket keeps offsets aligned)."""
    dtypes = {t.dtype for _, t in group}
    if len(dtypes) != 1:
        raise ValueError(f"a bucket must hold one dtype, got {sorted(map(str, dtypes))}")
    total = sum(t.numel() * t.element_size() for _, t in group)
    buf = buffer.get(total)
    metas, off = [], 0
    for name, t in group:
        nb = t.numel() * t.element_size()
        buf[off: off + nb].view(t.dtype).copy_(t.reshape(-1))
        metas.append(TensorMeta(name=name, dtype=t.dtype, shape=tuple(t.shape), offset=off, nbytes=nb))
        off += nb
    return TensorBucket(buffer=buf, metas=metas)


def is_shared(t: torch.Tensor) -> bool:
    """A CPU tensor whose storage is in shared memory (an engine process can map it)."""
    return t.device.type == "cpu" and t.untyped_storage().is_shared()


def share_all(tensors: Iterable[torch.Tensor]) -> None:
    """Move every CPU tensor's storage into shared memory, in place (views keep pointing into it);
    tensors already shared, and device tensors, are left alone."""
    for t in tensors:
        if t.device.type == "cpu" and not t.untyped_storage().is_shared():
            share_tensor(t)


def pack_unshared(group: list[tuple[str, torch.Tensor]], buffer: BucketBuffer) -> list[tuple[str, torch.Tensor]]:
    """Zero-copy where possible: tensors already in shared memory (views of parameters moved
    there) pass through untouched; the rest (fused-layout splits, TP-gathered or cast tensors) are
    copied back to back into ``buffer`` and passed as views of it."""
    rest = [(n, t) for n, t in group if not is_shared(t)]
    packed = dict(pack_bucket(rest, buffer).tensors()) if rest else {}
    return [(n, packed[n] if n in packed else t) for n, t in group]


@dataclass
class SyncLedger:
    """Every expected HF tensor arrives exactly once, with its shape and the engine's dtype.

    ``expected``: HF name -> shape (``checkpoint.expected_hf_shapes(arch)``)."""

    expected: Mapping[str, tuple[int, ...]]
    dtype: torch.dtype
    seen: dict[str, int] = field(default_factory=dict)
    buckets: int = 0

    @property
    def expected_bytes(self) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(int(torch.Size(s).numel()) * item for s in self.expected.values())

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def add(self, meta: TensorMeta) -> None:
        if meta.name not in self.expected:
            raise AssertionError(f"weight sync sent {meta.name!r}, which is not an HF tensor of this model")
        if meta.name in self.seen:
            raise AssertionError(f"weight sync sent {meta.name!r} twice")
        if tuple(meta.shape) != tuple(self.expected[meta.name]):
            raise AssertionError(f"weight sync sent {meta.name!r} with shape {tuple(meta.shape)}, "
                                 f"expected {tuple(self.expected[meta.name])}")
        if meta.dtype != self.dtype:
            raise AssertionError(f"weight sync sent {meta.name!r} as {meta.dtype}, the engine holds {self.dtype}")
        self.seen[meta.name] = meta.nbytes

    def add_bucket(self, metas: Iterable[TensorMeta]) -> None:
        for m in metas:
            self.add(m)
        self.buckets += 1

    def add_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """A bucket sent as separate (shared-memory) tensors."""
        self.add_bucket(TensorMeta(n, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size()) for n, t in named_tensors)

    def check_complete(self) -> None:
        missing = [n for n in self.expected if n not in self.seen]
        if missing:
            raise AssertionError(f"weight sync did not send {missing[0]!r} (and {len(missing) - 1} more); "
                                 f"{len(self.seen)} of {len(self.expected)} tensors arrived")
        if self.bytes != self.expected_bytes:
            raise AssertionError(f"weight sync sent {self.bytes} bytes, expected {self.expected_bytes}")
