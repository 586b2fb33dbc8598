"""Megatron torch_dist checkpoint (any saved layout) -> HF sharded safetensors + config + tokenizer.

    python tools/convert_megatron_to_hf.py --load DIR --save DIR [--dtype bf16|fp16|fp32] [--overwrite]
                                           [--max-shard-size 5GB]

Same as ``holderpo convert megatron-to-hf ...``; the work is in holderpo_megatron.checkpoint.convert.
"""

import sys

if __name__ == "__main__":
    from holderpo_megatron.checkpoint.convert import main

    sys.exit(main(["megatron-to-hf", *sys.argv[1:]]))
