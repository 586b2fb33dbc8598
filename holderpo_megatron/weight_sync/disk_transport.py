"""The ``disk`` transport: safetensors files on a filesystem the engine can read, loaded with one
``update_weights_from_disk`` call. The slow fallback that always works; chosen only when asked."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from ..rollout.interface import TensorBucket, TensorMeta
from .base import WeightSynchronizer
from .buckets import DEFAULT_BUCKET_BYTES, SyncLedger

__all__ = ["DiskTransport"]

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
    brackets_engine_update = False  # update_weights_from_disk is the whole update

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

    def _transfer(self, ledger: SyncLedger | None, version: int) -> bool:
        import torch.distributed as dist

        src = self.source
        step_dir = self.root / f"step-{version}"
        files = self._write_stage(step_dir)
        if src.is_sender and not src.is_owner:
            dist.send_object_list([files], dst=src.stage_senders[0])
        if not src.is_owner:
            return False
        for stage in range(1, src.pp_size):
            box = [None]
            dist.recv_object_list(box, src=src.stage_senders[stage])
            files += box[0]
        self._write_index(step_dir, files, ledger)
        self.engine.update_weights_from_disk(str(step_dir))  # flushes the cache itself
        if self._last is not None and self._last != step_dir:
            shutil.rmtree(self._last, ignore_errors=True)
        self._last = step_dir
        return True

    def _write_stage(self, step_dir: Path) -> list[tuple[str, list[TensorMeta]]]:
        """This rank's stage as safetensors files in ``step_dir`` (senders); [(file name, metas)]."""
        src = self.source
        files: list[tuple[str, list[TensorMeta]]] = []
        if not src.participates:
            return files
        if not src.is_sender:
            self._follow()
            return files
        step_dir.mkdir(parents=True, exist_ok=True)
        buf = self._buffers("disk")[0]
        for k, g in enumerate(self._groups()):
            b = self._pack(g, buf)
            fname = f"model-pp{src.pp_rank:03d}-{k:05d}.safetensors"
            _write_safetensors(step_dir / fname, b)
            files.append((fname, b.metas))
            self._sent.add(b)
        return files

    def _write_index(self, step_dir: Path, files: list[tuple[str, list[TensorMeta]]], ledger: SyncLedger) -> None:
        """Owner: every stage's files counted, then the index and the config beside them."""
        weight_map = {}
        for fname, metas in files:
            ledger.add_bucket(metas)
            weight_map.update({m.name: fname for m in metas})
        ledger.check_complete()  # before the engine reads a checkpoint with holes
        index = {"metadata": {"total_size": ledger.bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (step_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for side in ("config.json", "generation_config.json"):
            if (self.config_dir / side).is_file():
                shutil.copyfile(self.config_dir / side, step_dir / side)
