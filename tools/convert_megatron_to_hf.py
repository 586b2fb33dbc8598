"""Megatron torch_dist checkpoint (any saved layout) -> HF sharded safetensors + config + tokenizer.

    python tools/convert_megatron_to_hf.py --load DIR --save DIR [--dtype bf16|fp16|fp32] [--overwrite]
"""

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint directory (written by holderpo)")
    p.add_argument("--save", required=True, help="output HF directory")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: the checkpoint's dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save directory")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from holderpo_megatron.checkpoint import convert_megatron_to_hf
    from holderpo_megatron.checkpoint.convert import parse_size

    try:
        summary = convert_megatron_to_hf(args.load, args.save, dtype=args.dtype, overwrite=args.overwrite,
                                         max_shard_bytes=parse_size(args.max_shard_size), progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
