"""HF safetensors -> Megatron torch_dist checkpoint (loads at any TP/PP layout).

    python tools/convert_hf_to_megatron.py --hf-path DIR --save DIR [--dtype bf16|fp16|fp32] [--overwrite]
    torchrun --standalone --nproc-per-node N tools/convert_hf_to_megatron.py ...   # pp = N / tp: memory split

Same as ``holderpo convert hf-to-megatron ...``; the work is in holderpo_megatron.checkpoint.convert.
"""

import sys

if __name__ == "__main__":
    from holderpo_megatron.checkpoint.convert import main

    sys.exit(main(["hf-to-megatron", *sys.argv[1:]]))
