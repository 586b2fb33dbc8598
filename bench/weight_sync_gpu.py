"""GPU side of weight sync: Megatron gather + HF conversion + bucketing for a 7B-shaped model.

    python bench/weight_sync_gpu.py [--model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B] [--bucket-mb 512]

Builds a random bf16 GPTModel of the model's shape on one GPU (TP1), then times exporting every
HF tensor (un-fusing QKV / gate-up) and packing it into reusable GPU buckets, as the tensor and
distributed transports do before handing a bucket to the engine. Target: <= 2 s.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    ap.add_argument("--bucket-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    from holderpo_megatron.models import ModelArch, build_gpt_model, to_transformer_config
    from holderpo_megatron.models.known import KNOWN_CONFIGS
    from holderpo_megatron.parallel.layout import ParallelLayout, init_distributed, initialize_model_parallel
    from holderpo_megatron.weight_sync.buckets import BucketBuffer, group_into_buckets, pack_bucket
    from holderpo_megatron.weight_sync.source import MegatronWeightSource

    init_distributed()
    initialize_model_parallel(ParallelLayout())
    arch = ModelArch.from_hf_config(KNOWN_CONFIGS[args.model])
    t = time.perf_counter()
    model = build_gpt_model(arch, to_transformer_config(arch, params_dtype=torch.bfloat16))
    torch.cuda.synchronize()
    print(f"built {args.model} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params) in {time.perf_counter() - t:.1f} s")
    source = MegatronWeightSource([model], arch)
    buf = BucketBuffer(device="cuda")
    for r in range(args.repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        nbytes = ntensors = nbuckets = 0
        for group in group_into_buckets(source.named_tensors(torch.bfloat16), args.bucket_mb << 20):
            bucket = pack_bucket(group, buf)
            nbytes += bucket.nbytes
            ntensors += len(bucket.metas)
            nbuckets += 1
        torch.cuda.synchronize()
        s = time.perf_counter() - t
        print(f"repeat {r}: {ntensors} tensors, {nbuckets} buckets, {nbytes / 1e9:.2f} GB in {s:.3f} s "
              f"({nbytes / 1e9 / s:.1f} GB/s); target <= 2 s: {'met' if s <= 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
