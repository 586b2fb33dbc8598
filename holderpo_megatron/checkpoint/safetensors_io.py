"""Safetensors read and write with plain file I/O: one tensor in memory at a time.

The ``safetensors`` package maps whole files into memory (their pages then count in the reader's
RSS) and serialises a whole file in memory before writing it; converting a model larger than RAM
needs neither. The format is small (8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw little-endian bytes), so it is read and written
here directly, and the files stay loadable by ``safetensors``, transformers and SGLang.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

__all__ = ["SafetensorsReader", "ShardedSafetensorsWriter", "plan_shards", "DTYPES", "dtype_name"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors; supported: {sorted(map(str, _NAMES))}")
    return _NAMES[dtype]


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        header = json.loads(f.read(n))
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
        if end - begin != numel * DTYPES[info["dtype"]].itemsize or base + end > size:
            raise ValueError(f"{path}: tensor {name!r} has a byte range {begin}..{end} that does not match its "
                             f"shape {info['shape']} / dtype {info['dtype']} or the file size {size}")
    return header, base


class SafetensorsReader(Mapping[str, torch.Tensor]):
    """Lazy, read-only ``name -> tensor`` view over an HF directory's ``*.safetensors`` files.

    Reads ``model.safetensors.index.json`` when present, else every ``*.safetensors`` file in the
    directory. Indexing reads that one tensor from disk (no mmap, no caching); ``shapes()`` and
    ``dtype(name)`` need only the headers.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map'")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(p.name for p in self.directory.glob("*.pt"))
            hint = f" (found {found[:3]}: only safetensors checkpoints are read)" if found else ""
            raise ValueError(f"no *.safetensors files in {str(self.directory)!r}{hint}")
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for fname in files:
            path = self.directory / fname
            if not path.is_file():
                raise ValueError(f"{index}: shard {fname!r} does not exist")
            header, base = _read_header(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in both {self._where[name][0].name} and {fname}")
                self._where[name] = (path, info, base)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        path, info, base = self._where[name]
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(base + begin)
            view = memoryview(buf.numpy())
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise ValueError(f"{path}: truncated while reading {name!r}")
                got += n
        dtype = DTYPES[info["dtype"]]
        return (buf.view(dtype) if buf.numel() else torch.empty(0, dtype=dtype)).reshape(info["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(info["shape"]) for n, (_, info, _) in self._where.items()}

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._where[name][1]["dtype"]]

    def nbytes(self) -> int:
        return sum(i["data_offsets"][1] - i["data_offsets"][0] for _, i, _ in self._where.values())


def plan_shards(entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
                ) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Split ``(name, shape, dtype)`` entries, in order, into shards of at most ``max_shard_bytes``
    (a single larger tensor gets a shard of its own)."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        n = _nbytes(e[1], e[2])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _nbytes(shape, dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= int(d)
    return n


class ShardedSafetensorsWriter:
    """Writes HF-sharded safetensors whose layout is planned up front from names, shapes and dtypes.

    Because every byte range is known before any data arrives, each tensor is written to its place
    as soon as it is given (any order) and then dropped: memory holds only the tensors in flight.
    Files are ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``, which is
    written last by :meth:`close` (after checking every planned tensor arrived exactly once).

    Several processes may fill the same files (each its own tensors): one creates them
    (``create=True``, the default), the others open the same plan with ``create=False``; each calls
    :meth:`close_files`, then the creator :meth:`write_index` once all are done.
    """

    def __init__(self, directory: str | os.PathLike, entries: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 1024**3, *, create: bool = True):
        self.directory = Path(directory)
        entries = list(entries)
        shards = plan_shards(entries, max_shard_bytes)
        n = len(shards)
        self._slot: dict[str, tuple[str, int, tuple[int, ...], torch.dtype]] = {}
        self._left: dict[str, int] = {}
        self._files: dict[str, object] = {}
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.written = 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype in shard:
                nb = _nbytes(shape, dtype)
                header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nb]}
                offset += nb
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
            base = 8 + len(raw)
            if create:
                with open(self.directory / fname, "wb") as f:
                    f.write(struct.pack("<Q", len(raw)))
                    f.write(raw)
                    f.truncate(base + offset)
            for name, shape, dtype in shard:
                self._slot[name] = (fname, base + header[name]["data_offsets"][0], tuple(shape), dtype)
                self.weight_map[name] = fname
            self._left[fname] = len(shard)
            self.total_bytes += offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slot:
            raise ValueError(f"tensor {name!r} was not planned for this checkpoint (or was written twice)")
        fname, offset, shape, dtype = self._slot[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r}: got {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        del self._slot[name]
        f = self._files.get(fname)
        if f is None:
            f = self._files[fname] = open(self.directory / fname, "r+b")
        f.seek(offset)
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.written += 1
        self._left[fname] -= 1
        if self._left[fname] == 0:
            f.close()
            del self._files[fname]

    def close(self) -> None:
        """Single writer: check every planned tensor was written, then write the index."""
        self.close_files()
        if self._slot:
            missing = sorted(self._slot)
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"tensor {missing[0]!r}{more} was never written")
        self.write_index()

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    abort = close_files
