"""HF safetensors <-> Megatron ``torch_dist`` checkpoint conversion (the tools/ scripts call these).

HF -> Megatron builds this rank's stage of the GPTModel (TP1PP1 in one process; under torchrun,
``pp = world_size / tp`` so each rank holds and reads only its stage), fills it through the
mapping engine from a lazy safetensors reader and saves ``model.sharded_state_dict()``; the result
loads at any layout. Megatron -> HF builds no model: it reads the checkpoint one layer at a time
and writes each tensor straight into its planned place in the output shards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist

from ..models import ModelArch, build_gpt_model, to_transformer_config
from .dist_ckpt import parse_dtype, save_megatron_checkpoint
from .mapping import check_hf_tensors, expected_hf_shapes, hf_names_for_stage, load_hf_weights_into_model
from .output_dir import check_output_location, copy_side_files, publish, read_json, staging_dir
from .progress import ConversionSummary, ProgressBar
from .safetensors_io import SafetensorsReader, ShardedSafetensorsWriter
from .torch_dist_reader import MegatronCheckpointReader

__all__ = ["convert_hf_to_megatron", "convert_megatron_to_hf", "megatron_process_group", "parse_size", "main"]

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@contextlib.contextmanager
def megatron_process_group(tp: int = 1, pp: int | None = None):
    """A gloo process group and Megatron's parallel state for a conversion.

    Reuses what the caller set up; otherwise initialises from torchrun's environment, or a
    single-process group (no network port: a file store). ``pp`` defaults to world_size / tp.
    Tears down only what it created.
    """
    from megatron.core import parallel_state as ps

    if not torch.cuda.is_available():
        from ..parallel.cpu_compat import enable_cpu_megatron

        enable_cpu_megatron()
    own_pg = not dist.is_initialized()
    tmp = None
    if own_pg:
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group("gloo")
        else:
            tmp = tempfile.mkdtemp(prefix="holderpo_pg_")
            dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
    own_ps = not ps.model_parallel_is_initialized()
    try:
        if own_ps:
            world = dist.get_world_size()
            if pp is None:
                if world % tp:
                    raise ValueError(f"world size {world} is not divisible by tensor_parallel={tp}")
                pp = world // tp
            ps.initialize_model_parallel(tp, pp)
        yield
    finally:
        if own_ps:
            ps.destroy_model_parallel()
        if own_pg:
            dist.destroy_process_group()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


class _CountingReader(Mapping[str, torch.Tensor]):
    """Passes reads through, counting tensors and bytes for the progress bar and summary."""

    def __init__(self, inner: SafetensorsReader, bar: ProgressBar):
        self.inner, self.bar, self.tensors, self.bytes = inner, bar, 0, 0

    def __getitem__(self, name):
        t = self.inner[name]
        self.tensors += 1
        self.bytes += t.nbytes
        self.bar.update(t.nbytes)
        return t

    def __contains__(self, name):
        return name in self.inner

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


def _hf_dtype(hf_path: Path, reader: SafetensorsReader) -> torch.dtype:
    cfg = read_json(hf_path / "config.json")
    for key in ("dtype", "torch_dtype"):
        if isinstance(cfg.get(key), str) and cfg[key] in ("float32", "bfloat16", "float16"):
            return parse_dtype(cfg[key])
    return reader.dtype("model.embed_tokens.weight")


def convert_hf_to_megatron(hf_path: str | os.PathLike, save: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                           overwrite: bool = False, tp: int = 1, progress: bool = True) -> ConversionSummary:
    """HF directory (config.json + safetensors) -> self-describing Megatron torch_dist checkpoint.

    ``dtype`` defaults to the HF config's. Refuses unsupported architectures, tensors that disagree
    with the config, and an existing non-empty ``save`` unless ``overwrite``. All ranks call it.
    """
    from megatron.core import parallel_state as ps

    start = time.perf_counter()
    hf_path = Path(hf_path)
    check_output_location(save, {"--hf-path": hf_path}, overwrite)  # before anything is read
    arch = ModelArch.from_pretrained_dir(hf_path)
    reader = SafetensorsReader(hf_path)
    check_hf_tensors(arch, reader.shapes(), source=f"HF checkpoint {str(hf_path)!r}")
    dtype = parse_dtype(dtype) or _hf_dtype(hf_path, reader)

    with megatron_process_group(tp=tp):
        rank0 = dist.get_rank() == 0
        config = to_transformer_config(arch, ps.get_tensor_model_parallel_world_size(),
                                       ps.get_pipeline_model_parallel_world_size(), params_dtype=dtype,
                                       use_cpu_initialization=True, perform_initialization=False)
        # Local spec on every machine: checkpoint keys are the same for both specs.
        model = build_gpt_model(arch, config, use_te=False)
        for p in model.parameters():  # the local spec keeps norms in fp32 whatever params_dtype says
            p.data = p.data.to(dtype)
        layers = sorted({layer.layer_number - 1 for layer in model.decoder.layers})
        names = hf_names_for_stage(arch, layers, pre_process=model.pre_process, post_process=model.post_process)
        shapes = reader.shapes()
        total = sum(reader.dtype(n).itemsize * int(torch.Size(shapes[n]).numel()) for n in names)
        bar = ProgressBar(total, "HF -> Megatron: reading", enabled=progress and rank0)
        counting = _CountingReader(reader, bar)
        load_hf_weights_into_model(model, arch, counting)
        bar.close()
        if progress and rank0:
            print("HF -> Megatron: writing torch_dist checkpoint ...", file=sys.stderr, flush=True)
        # totals over ranks (pipeline stages; TP/DP replicas read the same tensors: count one)
        first_of_stage = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) if first_of_stage else 0
        save_megatron_checkpoint(model, save, arch, hf_dir=hf_path, overwrite=overwrite,
                                 extra={"converted_from": str(hf_path.absolute())}, consume_model=True)
        totals = torch.tensor([counting.tensors if first_of_stage else 0, nbytes], dtype=torch.float64)
        dist.all_reduce(totals)
        del model
    return ConversionSummary("HF -> Megatron", str(Path(save).absolute()), int(totals[0]), int(totals[1]),
                             time.perf_counter() - start, str(dtype).removeprefix("torch."))


def convert_megatron_to_hf(load: str | os.PathLike, save: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                           overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                           progress: bool = True) -> ConversionSummary:
    """Megatron torch_dist checkpoint (any saved layout) -> HF directory loadable by transformers.

    Streams: one Megatron tensor in memory at a time, each HF tensor written straight into its
    planned place in its shard. ``dtype`` defaults to the checkpoint's. One process, no Megatron
    import, no process group.
    """
    start = time.perf_counter()
    check_output_location(save, {"--load": load}, overwrite)  # before anything is read
    reader = MegatronCheckpointReader(load)  # refusals next: incomplete, config vs tensors, files
    out_dtype = parse_dtype(dtype) or reader.dtype
    entries = [(n, s, out_dtype) for n, s in expected_hf_shapes(reader.arch).items()]
    tmp = staging_dir(save)
    writer = ShardedSafetensorsWriter(tmp, entries, max_shard_bytes)
    bar = ProgressBar(writer.total_bytes, "Megatron -> HF", enabled=progress)
    count = 0
    try:
        for name, tensor in reader.iter_hf(out_dtype):
            writer.write(name, tensor)
            bar.update(tensor.nbytes)
            count += 1
            del tensor
        writer.close()
        bar.close()
        copy_side_files(load, tmp, config_dtype=str(out_dtype).removeprefix("torch."))
        publish(tmp, save, overwrite)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionSummary("Megatron -> HF", str(Path(save).absolute()), count, writer.total_bytes,
                             time.perf_counter() - start, str(out_dtype).removeprefix("torch."))


def parse_size(text: str) -> int:
    """'5GB' | '500MB' | '1024' -> bytes (powers of 1024)."""
    t = text.strip().upper().removesuffix("B")
    for suffix, mult in (("K", 1024), ("M", 1024**2), ("G", 1024**3), ("T", 1024**4)):
        if t.endswith(suffix):
            t, factor = t[:-1], mult
            break
    else:
        factor = 1
    try:
        value = float(t) * factor
    except ValueError:
        raise ValueError(f"size {text!r} is not understood; use e.g. 5GB, 500MB") from None
    if value < 1:
        raise ValueError(f"size {text!r} must be positive")
    return int(value)


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="holderpo convert", description="convert checkpoints between Hugging Face "
                                "safetensors and Megatron torch_dist (loadable at any TP/PP layout)")
    sub = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    a = sub.add_parser("hf-to-megatron", help="HF directory -> Megatron torch_dist checkpoint",
                       description="Under torchrun with N ranks, each rank holds and reads one pipeline stage "
                                   "(pp = N / tp); the checkpoint holds the same weights either way.")
    a.add_argument("--hf-path", required=True, help="HF model directory (config.json + *.safetensors)")
    a.add_argument("--save", required=True, help="output checkpoint directory")
    a.add_argument("--tp", type=int, default=1, help="tensor parallel size under torchrun (default 1)")
    b = sub.add_parser("megatron-to-hf", help="Megatron torch_dist checkpoint -> HF directory")
    b.add_argument("--load", required=True, help="Megatron checkpoint directory (written by holderpo)")
    b.add_argument("--save", required=True, help="output HF directory")
    b.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 2GB, 500MB (default 5GB)")
    for q in (a, b):
        q.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                       help="output dtype (default: the source's)")
        q.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save directory")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    """``holderpo convert hf-to-megatron|megatron-to-hf ...`` and the tools/ scripts. Refusals
    print ``error: ...`` and return 2; the summary goes to stderr (rank 0 only under torchrun)."""
    args = _parser().parse_args(argv)
    try:
        if args.direction == "hf-to-megatron":
            summary = convert_hf_to_megatron(args.hf_path, args.save, dtype=args.dtype, overwrite=args.overwrite,
                                             tp=args.tp, progress=not args.quiet)
        else:
            summary = convert_megatron_to_hf(args.load, args.save, dtype=args.dtype, overwrite=args.overwrite,
                                             max_shard_bytes=parse_size(args.max_shard_size), progress=not args.quiet)
    except (ValueError, OSError) as e:  # one line: the file and the problem
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(summary, file=sys.stderr)
    return 0
