"""Stream the full tensors out of a Megatron ``torch_dist`` checkpoint without building a model.

A ``torch_dist`` checkpoint is a torch.distributed.checkpoint (DCP) directory: ``.metadata`` lists,
per Megatron key, the global shape, dtype and the stored chunks (Megatron saves every layer of
``decoder.layers.*`` and every TP shard as a chunk of its own); each chunk is one ``torch.save``
record at a byte range of a ``*.distcp`` file. Reading a layer therefore touches only that layer's
chunks. This reads them directly (``torch.load(weights_only=True)`` per chunk) rather than through
``megatron.core.dist_checkpointing.load``: no Megatron import (seconds of start-up), no process
group, no collective planning per read, and one copy less.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..models import ModelArch, padded_vocab_size
from .dist_ckpt import parse_dtype, read_marker
from .mapping import ParamMapping, VocabMapping, hf_shape, mappings_for
from .safe_metadata import read_dcp_metadata

__all__ = ["MegatronCheckpointReader"]


class _FileSlice(io.RawIOBase):
    """A read-only, seekable window ``[offset, offset + length)`` of an open file."""

    def __init__(self, f, offset: int, length: int):
        self.f, self.start, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, min(self.length, base + pos))
        return self.pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self.length - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buf)[:n])
        self.pos += got
        return got


def _model_key(key: str) -> bool:
    return key.startswith(("embedding.", "decoder.", "output_layer."))


class MegatronCheckpointReader:
    """The full (TP1-layout) tensors of a checkpoint, one layer at a time, and their HF form.

    ``arch`` comes from the checkpoint's own config.json; construction refuses a checkpoint that
    is incomplete, or whose tensors disagree with that config (missing, extra, shape).
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(ckpt_dir)
        self.marker = read_marker(self.dir)
        self.arch = ModelArch.from_pretrained_dir(self.dir)
        md = read_dcp_metadata(self.dir)  # allow-listed unpickling: a crafted .metadata runs nothing
        self.meta = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self._storage = md.storage_data
        self.mappings = [m for m in mappings_for(self.arch) if m.export]
        self._check()
        self._check_files()

    # -- validation ------------------------------------------------------------------------------
    def _check(self) -> None:
        a = self.arch
        saved_tp = int(self.marker.get("saved_layout", {}).get("tensor_parallel", 1))
        expected = {}
        for m in self.mappings:
            key = m.checkpoint_key
            if key not in self.meta:
                raise ValueError(f"checkpoint {str(self.dir)!r}: tensor {key!r} is missing (needed by "
                                 f"{a.architecture}, qkv_bias={a.qkv_bias}, qk_norm={a.qk_norm}, "
                                 f"tie_word_embeddings={a.tie_word_embeddings})")
            got = tuple(self.meta[key].size)
            full_shape = got[1:] if m.per_layer else got
            if isinstance(m, VocabMapping):  # Megatron padded the vocab for the TP it was saved at
                full_shape = (padded_vocab_size(a.vocab_size, saved_tp),) + tuple(full_shape[1:])
            hf = [torch.empty(hf_shape(a, syms), device="meta") for syms in m.hf_shapes]
            shape = tuple(m.fuse(hf, a, torch.Size(full_shape)).shape)
            expected[key] = ((a.num_layers,) + shape) if m.per_layer else shape
            if got != expected[key]:
                raise ValueError(
                    f"checkpoint {str(self.dir)!r}: tensor {key!r} has shape {got} but config.json implies "
                    f"{expected[key]} (saved at tensor_parallel={saved_tp}; num_hidden_layers={a.num_layers}, "
                    f"vocab_size={a.vocab_size}, hidden_size={a.hidden_size}, num_attention_heads={a.num_heads}, "
                    f"num_key_value_heads={a.num_kv_heads}, head_dim={a.head_dim}, "
                    f"intermediate_size={a.intermediate_size})")
        extra = sorted(k for k in self.meta if _model_key(k) and k not in expected)
        if extra:
            raise ValueError(f"checkpoint {str(self.dir)!r}: unexpected tensor {extra[0]!r} for {a.architecture} "
                             f"(qkv_bias={a.qkv_bias}, qk_norm={a.qk_norm}, tie_word_embeddings={a.tie_word_embeddings})")

    def _check_files(self) -> None:
        """Every stored chunk's file is there and long enough (before any weight is read)."""
        need: dict[str, int] = {}
        for info in (self._storage or {}).values():
            rel = getattr(info, "relative_path", None)
            if rel is None:
                continue
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
        for rel, size in sorted(need.items()):
            f = self.dir / rel
            if not f.is_file():
                raise ValueError(f"checkpoint {str(self.dir)!r}: {rel} is missing (its .metadata lists tensors "
                                 "stored there): the checkpoint is incomplete")
            got = f.stat().st_size
            if got < size:
                raise ValueError(f"checkpoint {str(self.dir)!r}: {rel} is {got} bytes but its .metadata places data up "
                                 f"to byte {size}: the file is truncated")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint was saved in (its marker's)."""
        return parse_dtype(self.marker["dtype"])

    # -- reading ---------------------------------------------------------------------------------
    def _load_chunk(self, key: str, chunk) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self._storage[MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"checkpoint {str(self.dir)!r}: tensor {key!r} is stored with transforms "
                             f"{info.transform_descriptors!r}, which this reader does not support")
        with open(self.dir / info.relative_path, "rb", buffering=0) as f:
            return torch.load(io.BufferedReader(_FileSlice(f, info.offset, info.length), 1 << 20),
                              map_location="cpu", weights_only=True)

    def read_region(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The box ``[offsets, offsets + sizes)`` of checkpoint tensor ``key`` (its stored dtype),
        assembled from every stored chunk that overlaps it."""
        md = self.meta[key]
        for chunk in md.chunks:  # the common case, a whole stored chunk: no copy
            if tuple(chunk.offsets) == tuple(offsets) and tuple(chunk.sizes) == tuple(sizes):
                t = self._load_chunk(key, chunk)
                if tuple(t.shape) == tuple(sizes):
                    return t
        out = torch.empty(tuple(sizes), dtype=md.properties.dtype)
        covered = 0
        for chunk in md.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + cs) for o, s, c, cs in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            t = self._load_chunk(key, chunk)
            if tuple(t.shape) != tuple(chunk.sizes):
                raise ValueError(f"checkpoint {str(self.dir)!r}: a chunk of {key!r} has shape {tuple(t.shape)}, "
                                 f"its metadata says {tuple(chunk.sizes)}")
            src = t[tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets))].copy_(src)
            covered += int(torch.Size([b - a for a, b in zip(lo, hi)]).numel())
            del t, src
        if covered != out.numel():
            raise ValueError(f"checkpoint {str(self.dir)!r}: tensor {key!r} is not fully stored "
                             f"({covered} of {out.numel()} values at offsets {tuple(offsets)})")
        return out

    def read(self, m: ParamMapping, layer: int | None) -> torch.Tensor:
        """The full (TP1) Megatron tensor of mapping ``m`` at ``layer`` (None for non-layer ones)."""
        size = tuple(self.meta[m.checkpoint_key].size)
        if m.per_layer:
            return self.read_region(m.checkpoint_key, (layer,) + (0,) * (len(size) - 1), (1,) + size[1:])[0]
        return self.read_region(m.checkpoint_key, (0,) * len(size), size)

    def iter_hf(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) in HF order (embedding, layer 0..L-1, final norm, lm_head),
        one Megatron tensor in memory at a time; ``dtype`` casts (default: as stored)."""
        first = [m for m in self.mappings if not m.per_layer and m.is_embedding]
        last = [m for m in self.mappings if not m.per_layer and not m.is_embedding]
        per_layer = [m for m in self.mappings if m.per_layer]
        order = [(m, None) for m in first]
        order += [(m, i) for i in range(self.arch.num_layers) for m in per_layer]
        order += [(m, None) for m in last]
        for m, layer in order:
            full = self.read(m, layer)
            for n, h in zip(m.hf_names(layer), m.split(full, self.arch)):
                yield n, (h if dtype is None else h.to(dtype)).contiguous()
            del full
