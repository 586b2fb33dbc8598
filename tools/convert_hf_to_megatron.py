"""HF safetensors -> Megatron torch_dist checkpoint (loads at any TP/PP layout).

    python tools/convert_hf_to_megatron.py --hf-path DIR --save DIR [--dtype bf16|fp16|fp32] [--overwrite]
    torchrun --nproc-per-node N tools/convert_hf_to_megatron.py ...   # split memory over N ranks (pp = N / tp)
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--save", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default: the HF config's dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save directory")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size under torchrun (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    from holderpo_megatron.checkpoint import convert_hf_to_megatron

    try:
        summary = convert_hf_to_megatron(args.hf_path, args.save, dtype=args.dtype, overwrite=args.overwrite,
                                         tp=args.tp, progress=not args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
