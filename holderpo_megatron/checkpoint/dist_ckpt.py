"""Megatron ``torch_dist`` checkpoints (``megatron.core.dist_checkpointing``): save, load, read.

A checkpoint directory holds Megatron's files (``.metadata``, ``*.distcp``, ``common.pt``,
``metadata.json``), the HF ``config.json`` / generation config / tokenizer files (so it describes
itself), and last of all :data:`MARKER`, written just before the directory is renamed into place.
A directory without the marker is refused: it is being written, or its writer died.

The tensors are stored layout-independently (each is the full TP1 tensor; ``decoder.layers.*``
stacked on a leading layer axis), so a checkpoint saved at any TP/PP loads at any other.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from ..models import ModelArch, padded_vocab_size
from .mapping import ParamMapping, VocabMapping, hf_shape, mappings_for
from .output_dir import check_output_dir, copy_side_files, publish, read_json, staging_dir

__all__ = [
    "MARKER", "FORMAT", "save_megatron_checkpoint", "load_megatron_checkpoint", "read_marker",
    "MegatronCheckpointReader", "DTYPE_NAMES", "parse_dtype",
]

MARKER = "holderpo_checkpoint.json"
FORMAT = "holderpo/megatron-torch_dist"
FORMAT_VERSION = 1
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' | 'bfloat16' | torch.bfloat16 (fp16, fp32 likewise) -> torch dtype; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = _SHORT.get(name, name)
    if key not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not supported; supported: bf16, fp16, fp32")
    return DTYPE_NAMES[key]


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _on_rank0(fn):
    """Run ``fn`` on rank 0; every rank returns its result or raises its error (no hang)."""
    out = [None, None]
    if _rank() == 0:
        try:
            out = [fn(), None]
        except Exception as e:  # re-raised on every rank below
            out = [None, f"{type(e).__name__}: {e}"]
            if not (dist.is_initialized() and dist.get_world_size() > 1):
                raise
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(out, src=0)
    if out[1] is not None:
        raise ValueError(out[1])
    return out[0]


@contextlib.contextmanager
def _quiet_dcp():
    # Megatron 0.16 calls torch's deprecated checkpoint.load_state_dict on every load.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*load_state_dict.*deprecated", category=FutureWarning)
        yield


def read_marker(ckpt_dir: str | os.PathLike) -> dict:
    """The completion marker of a checkpoint; refuses a directory that has none."""
    p = Path(ckpt_dir)
    if not p.is_dir():
        raise ValueError(f"checkpoint directory {str(p)!r} does not exist")
    m = p / MARKER
    if not m.is_file():
        raise ValueError(
            f"checkpoint {str(p)!r} has no {MARKER}: it is incomplete (still being written, or its writer "
            "stopped) or was not written by holderpo_megatron"
        )
    marker = read_json(m)
    if marker.get("format") != FORMAT or marker.get("version") != FORMAT_VERSION:
        raise ValueError(f"{m}: format {marker.get('format')!r} version {marker.get('version')!r} is not "
                         f"{FORMAT!r} version {FORMAT_VERSION}")
    return marker


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _sharded_state_dict(model) -> dict:
    chunks = _chunks(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    # Virtual pipeline: ShardedTensor keys are global, the outer keys only keep the chunks apart.
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _model_dtype(model) -> torch.dtype:
    count: Counter = Counter()
    for c in _chunks(model):
        for p in c.parameters():
            count[p.dtype] += p.numel()
    return count.most_common(1)[0][0]


def save_megatron_checkpoint(model, save_dir: str | os.PathLike, arch: ModelArch, *,
                             hf_dir: str | os.PathLike | None = None, overwrite: bool = False,
                             extra: dict | None = None) -> Path:
    """Save ``model`` (this rank's stage; all ranks call this) as a self-describing checkpoint.

    Written into a temporary sibling directory and renamed into place once complete; ``hf_dir``
    supplies the config/tokenizer files copied beside the weights (``config.json`` is required
    there, or already in ``save_dir``'s source). ``extra`` is stored in the marker.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    save_dir = Path(save_dir).absolute()

    def prepare():
        check_output_dir(save_dir, overwrite)
        if hf_dir is None or not (Path(hf_dir) / "config.json").is_file():
            raise ValueError(f"no config.json in hf_dir={str(hf_dir)!r}: a checkpoint must describe its model")
        return str(staging_dir(save_dir))

    tmp = Path(_on_rank0(prepare))
    _barrier()
    dist_checkpointing.save(_sharded_state_dict(model), str(tmp))
    _barrier()

    dtype = _dtype_str(_model_dtype(model))

    def finish():
        copy_side_files(hf_dir, tmp, config_dtype=dtype)
        layout = {
            "tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        }
        marker = {
            "format": FORMAT, "version": FORMAT_VERSION, "architecture": arch.architecture,
            "dtype": dtype, "saved_layout": layout,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(extra or {}),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        publish(tmp, save_dir, overwrite)

    _on_rank0(finish)
    _barrier()
    return save_dir


def load_megatron_checkpoint(model, ckpt_dir: str | os.PathLike, arch: ModelArch | None = None) -> dict:
    """Load a checkpoint into ``model`` built at the current layout (any TP/PP; list = virtual PP).

    Refuses an incomplete directory, and (when ``arch`` is given) one whose config.json describes a
    different model. Rows of a larger padded vocab than the checkpoint's are zero. Returns the marker.
    """
    from megatron.core import dist_checkpointing

    marker = read_marker(ckpt_dir)
    if arch is not None:
        saved = ModelArch.from_pretrained_dir(ckpt_dir)
        diff = {k: (v, getattr(arch, k)) for k, v in saved.to_dict().items() if getattr(arch, k) != v}
        if diff:
            k, (a, b) = next(iter(diff.items()))
            raise ValueError(f"checkpoint {str(ckpt_dir)!r} is for a different model: config field {k}={a!r}, "
                             f"model has {b!r}")
    with _quiet_dcp():
        state = dist_checkpointing.load(_sharded_state_dict(model), str(ckpt_dir))
    chunks = _chunks(model)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state, strict=True)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"model{i}"], strict=True)
    return marker


def _model_key(key: str) -> bool:
    return key.startswith(("embedding.", "decoder.", "output_layer."))


class MegatronCheckpointReader:
    """Streams the full tensors of a checkpoint without building a model: one layer at a time.

    ``arch`` comes from the checkpoint's own config.json; construction refuses a checkpoint that
    is incomplete or whose tensors disagree with that config (missing, extra, shape).
    """

    def __init__(self, ckpt_dir: str | os.PathLike):
        from megatron.core import dist_checkpointing

        self.dir = Path(ckpt_dir)
        self.marker = read_marker(self.dir)
        self.arch = ModelArch.from_pretrained_dir(self.dir)
        self.meta = {k: v for k, v in dist_checkpointing.load_tensors_metadata(str(self.dir)).items()}
        self.mappings = [m for m in mappings_for(self.arch) if m.export]
        self._check()

    def _check(self) -> None:
        a = self.arch
        saved_tp = int(self.marker.get("saved_layout", {}).get("tensor_parallel", 1))
        expected = {}
        for m in self.mappings:
            hf = [torch.empty(hf_shape(a, syms), device="meta") for syms in m.hf_shapes]
            key = m.checkpoint_key
            if key not in self.meta:
                raise ValueError(f"checkpoint {str(self.dir)!r}: tensor {key!r} is missing (needed by "
                                 f"{a.architecture}, tie_word_embeddings={a.tie_word_embeddings})")
            got = tuple(self.meta[key].global_shape)
            full_shape = got[1:] if m.per_layer else got
            if isinstance(m, VocabMapping):  # Megatron padded the vocab for the TP it was saved at
                full_shape = (padded_vocab_size(a.vocab_size, saved_tp),) + tuple(full_shape[1:])
            shape = tuple(m.fuse(hf, a, torch.Size(full_shape)).shape)
            expected[key] = ((a.num_layers,) + shape) if m.per_layer else shape
            if got != expected[key]:
                raise ValueError(f"checkpoint {str(self.dir)!r}: tensor {key!r} has shape {got} but config.json "
                                 f"implies {expected[key]} (saved at tensor_parallel={saved_tp}; num_hidden_layers={a.num_layers}, vocab_size={a.vocab_size}, "
                                 f"hidden_size={a.hidden_size}, num_attention_heads={a.num_heads}, "
                                 f"num_key_value_heads={a.num_kv_heads}, head_dim={a.head_dim}, "
                                 f"intermediate_size={a.intermediate_size})")
        extra = sorted(k for k in self.meta if _model_key(k) and k not in expected)
        if extra:
            raise ValueError(f"checkpoint {str(self.dir)!r}: unexpected tensor {extra[0]!r} for {a.architecture} "
                             f"(qkv_bias={a.qkv_bias}, qk_norm={a.qk_norm}, tie_word_embeddings={a.tie_word_embeddings})")

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.marker["dtype"])

    def nbytes(self) -> int:
        total = 0
        for m in self.mappings:
            sh = self.meta[m.checkpoint_key]
            total += sh.dtype.itemsize * int(torch.Size(sh.global_shape).numel())
        return total

    def read(self, mappings: Sequence[ParamMapping], layer: int | None) -> dict[str, torch.Tensor]:
        """Full tensors (TP1 layout, checkpoint dtype) of ``mappings`` at ``layer`` (None: non-layer)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        request = {}
        for m in mappings:
            md = self.meta[m.checkpoint_key]
            shape = tuple(md.global_shape)
            if m.per_layer:
                data = torch.empty((1,) + shape[1:], dtype=md.dtype)
                request[m.checkpoint_key] = ShardedTensor.from_rank_offsets(
                    m.checkpoint_key, data, (0, layer, shape[0]), replica_id=0)
            else:
                request[m.checkpoint_key] = ShardedTensor.from_rank_offsets(
                    m.checkpoint_key, torch.empty(shape, dtype=md.dtype), replica_id=0)
        # A partial read (one layer) is not a full access pattern: skip that validation.
        with _quiet_dcp():
            got = dist_checkpointing.load(request, str(self.dir), validate_access_integrity=False)
        return {m.checkpoint_key: got[m.checkpoint_key][0] if m.per_layer else got[m.checkpoint_key]
                for m in mappings}

    def iter_hf(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) in HF order: embedding, layer 0..L-1, final norm, lm_head."""
        first = [m for m in self.mappings if not m.per_layer and m.is_embedding]
        last = [m for m in self.mappings if not m.per_layer and not m.is_embedding]
        layer_maps = [m for m in self.mappings if m.per_layer]
        groups = [(first, None)] + [(layer_maps, i) for i in range(self.arch.num_layers)] + [(last, None)]
        for maps, layer in groups:
            if not maps:
                continue
            full = self.read(maps, layer)
            for m in maps:
                t = full.pop(m.checkpoint_key)
                for n, h in zip(m.hf_names(layer), m.split(t, self.arch)):
                    yield n, (h if dtype is None else h.to(dtype)).contiguous()
                del t

