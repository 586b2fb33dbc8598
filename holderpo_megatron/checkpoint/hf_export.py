"""Write a live (possibly TP/PP-sharded) Megatron model as an HF directory, every stage in parallel.

The output layout (which tensor goes to which byte range of which shard) is planned from the
architecture alone, so no tensor travels to a single writer: the first TP/DP rank of each pipeline
stage writes the tensors its stage exports (``export_hf_weights``: TP all-gather per parameter)
straight into their places in the shared files. Rank 0 creates the files and, once every stage
is done, writes the index, the config/tokenizer files and renames the directory into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..models import ModelArch
from .dist_ckpt import _barrier, _dtype_str, _model_dtype, _on_rank0, parse_dtype
from .mapping import expected_hf_shapes, export_hf_weights
from .output_dir import check_output_dir, copy_side_files, publish, staging_dir
from .safetensors_io import ShardedSafetensorsWriter

__all__ = ["export_hf_checkpoint"]


def export_hf_checkpoint(model, arch: ModelArch, hf_dir: str | os.PathLike | None, save_dir: str | os.PathLike, *,
                         dtype: str | torch.dtype | None = None, overwrite: bool = False,
                         max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Save ``model`` (this rank's stage; one chunk or a list for virtual pipeline) as HF
    safetensors in ``save_dir``, with the config/tokenizer files of ``hf_dir`` beside them.

    Every rank calls it (TP ranks take part in the all-gathers; data-parallel replicas only wait).
    ``dtype`` defaults to the model's; config.json's dtype is rewritten to match.
    """
    from megatron.core import parallel_state as ps

    save_dir = Path(save_dir).absolute()
    out_dtype = parse_dtype(dtype) or _model_dtype(model)
    entries = [(n, s, out_dtype) for n, s in expected_hf_shapes(arch).items()]

    def prepare():
        check_output_dir(save_dir, overwrite)
        if hf_dir is None or not (Path(hf_dir) / "config.json").is_file():
            raise ValueError(f"no config.json in hf_dir={str(hf_dir)!r}: an HF checkpoint needs its config")
        tmp = staging_dir(save_dir)
        ShardedSafetensorsWriter(tmp, entries, max_shard_bytes).close_files()  # create every shard file
        return str(tmp)

    tmp = Path(_on_rank0(prepare))
    _barrier()
    writer = ShardedSafetensorsWriter(tmp, entries, max_shard_bytes, create=False)
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
        writes = ps.get_tensor_model_parallel_rank() == 0
        for name, tensor in export_hf_weights(model, arch, dtype=out_dtype):
            if writes:
                writer.write(name, tensor)
    writer.close_files()
    count = torch.tensor([writer.written], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(count)

    def finish():
        if int(count) != len(entries):
            raise ValueError(f"HF export wrote {int(count)} tensors, the architecture has {len(entries)}")
        writer.write_index()
        copy_side_files(hf_dir, tmp, config_dtype=_dtype_str(out_dtype))
        publish(tmp, save_dir, overwrite)

    _on_rank0(finish)
    _barrier()
    return save_dir
