"""Score token log-probs of sequences with a Megatron checkpoint (the engine of tools/score_logprobs.py).

    torchrun --nproc-per-node 4 tools/score_logprobs.py --load CKPT --tp 2 --pp 2 \
        --input in.jsonl --output out.jsonl

Each input line ``{"input_ids": [...]}``; each output line ``{"logprobs": [...]}`` with
log p(x_t | x_<t) for t = 1..n-1, in input order. Sequences are spread over data-parallel ranks.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["main", "read_sequences"]


def read_sequences(path: str | Path) -> list[list[int]]:
    seqs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ids = json.loads(line)["input_ids"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with 'input_ids', got {line[:80]!r}") from e
            if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise ValueError(f"{path}:{lineno}: input_ids must be a list of >= 2 non-negative ints")
            seqs.append(ids)
    return seqs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Score token log-probs with a Megatron checkpoint.")
    ap.add_argument("--load", required=True, help="Megatron torch_dist checkpoint dir (with config.json beside it)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--token-budget", type=int, default=8192, help="tokens per microbatch")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

        enable_cpu_megatron()
    from holderpo_megatron.checkpoint import load_megatron_checkpoint
    from holderpo_megatron.models import ModelArch, check_layout
    from holderpo_megatron.parallel.layout import ParallelLayout, init_distributed, initialize_model_parallel
    from holderpo_megatron.trainer.actor import ActorSettings, MegatronActor

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    arch = ModelArch.from_pretrained_dir(args.load)
    sequences = read_sequences(args.input)
    longest = max((len(s) for s in sequences), default=0)
    init_distributed()
    world = dist.get_world_size()
    check_layout(arch, args.tp, args.pp, 1, world_size=world, seq_length=longest)
    layout = ParallelLayout(tp=args.tp, pp=args.pp)
    initialize_model_parallel(layout)
    from megatron.core import parallel_state as ps

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype or ("bf16" if torch.cuda.is_available() else "fp32"))
    actor = MegatronActor(arch, layout, ActorSettings(token_budget=args.token_budget, temperature=args.temperature),
                          params_dtype=dtype)
    load_megatron_checkpoint(actor.unwrapped(), args.load)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, len(sequences), dp_size))
    lps = actor.score([sequences[i] for i in mine])
    gathered: list = [None] * dp_size
    dist.all_gather_object(gathered, [(i, lp.tolist()) for i, lp in zip(mine, lps)], group=ps.get_data_parallel_group())
    if dist.get_rank() == 0:
        by_index = dict(pair for part in gathered for pair in part)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.output).with_suffix(".tmp")
        with open(tmp, "w") as f:
            for i in range(len(sequences)):
                f.write(json.dumps({"logprobs": by_index[i]}) + "\n")
        os.replace(tmp, args.output)
    dist.barrier()
    dist.destroy_process_group()
    return 0
