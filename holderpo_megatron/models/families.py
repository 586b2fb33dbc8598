"""Per-family descriptions of the Hugging Face decoder architectures we support, as data.

A family says which HF ``architectures`` entry it covers and how its attention differs from plain
Llama; everything else (sizes, eps, rope) is read from the config itself. DeepSeek-R1-Distill-Qwen
checkpoints are ``Qwen2ForCausalLM``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    qkv_bias: bool | str  # True/False, or the name of the HF config field that says
    qk_norm: bool
    # HF config fields we accept and ignore because they do not change the forward pass in fp32
    # at inference/training time (or are bookkeeping).


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", qkv_bias="attention_bias", qk_norm=False),
    "MistralForCausalLM": Family("mistral", qkv_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": Family("qwen2", qkv_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": Family("qwen3", qkv_bias="attention_bias", qk_norm=True),
}


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)
