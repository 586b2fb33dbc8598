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

import torch
import torch.distributed as dist

from ..models import ModelArch
from .output_dir import check_output_dir, copy_side_files, publish, read_json, staging_dir
from .safe_metadata import safe_dcp_metadata_reads

__all__ = [
    "MARKER", "FORMAT", "save_megatron_checkpoint", "load_megatron_checkpoint", "read_marker",
    "DTYPE_NAMES", "parse_dtype",
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


def _sharded_state_dict_consuming(model) -> dict:
    """The sharded state dict with every tensor in storage of its own, the model's parameters
    released as they are copied.

    torch_dist clones, all at once before writing, every tensor that is a view into a larger
    storage: the gate and up halves of each ``linear_fc1`` (a third of a Llama's weights). Doing
    those copies here, one parameter at a time and freeing each parameter after, keeps the peak
    at the model's size. The model is unusable afterwards (its parameters are empty).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = _sharded_state_dict(model)
    apply_factories(sd)
    params = {p.untyped_storage().data_ptr(): p for c in _chunks(model) for p in c.parameters()}
    views: dict[int, list] = {}
    for sh in nested_values(sd):
        if isinstance(sh, ShardedTensor) and sh.data is not None:
            t = sh.data
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                views.setdefault(t.untyped_storage().data_ptr(), []).append(sh)
    for ptr, shs in views.items():
        for sh in shs:
            sh.data = sh.data.detach().clone()
        if ptr in params:
            params[ptr].data = torch.empty(0, dtype=params[ptr].dtype)
    return sd


def save_megatron_checkpoint(model, save_dir: str | os.PathLike, arch: ModelArch, *,
                             hf_dir: str | os.PathLike | None = None, overwrite: bool = False,
                             extra: dict | None = None, consume_model: bool = False) -> Path:
    """Save ``model`` (this rank's stage; all ranks call this) as a self-describing checkpoint.

    Written into a temporary sibling directory and renamed into place once complete; ``hf_dir``
    supplies the config/tokenizer files copied beside the weights (its ``config.json`` is
    required). ``extra`` is stored in the marker. ``consume_model=True`` (conversion) lowers the
    peak memory by releasing parameters during the save; the model is unusable afterwards.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    save_dir = Path(save_dir).absolute()

    def prepare():
        check_output_dir(save_dir, overwrite)
        if hf_dir is None or not (Path(hf_dir) / "config.json").is_file():
            raise ValueError(f"no config.json in hf_dir={str(hf_dir)!r}: a checkpoint must describe its model")
        return str(staging_dir(save_dir))

    dtype = _dtype_str(_model_dtype(model))
    tmp = Path(_on_rank0(prepare))
    _barrier()
    sd = _sharded_state_dict_consuming(model) if consume_model else _sharded_state_dict(model)
    dist_checkpointing.save(sd, str(tmp))
    del sd
    _barrier()

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
    with _quiet_dcp(), safe_dcp_metadata_reads():
        state = dist_checkpointing.load(_sharded_state_dict(model), str(ckpt_dir))
    chunks = _chunks(model)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state, strict=True)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"model{i}"], strict=True)
    return marker
