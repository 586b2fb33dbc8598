"""HF config -> Megatron config and model, per family (families are data)."""

from .config import ModelArch, check_layout, padded_vocab_size, to_transformer_config
from .families import FAMILIES, supported_architectures
from .provider import build_gpt_model, layer_spec, output_hidden_states, output_weight, te_available

__all__ = [
    "FAMILIES", "ModelArch", "build_gpt_model", "check_layout", "layer_spec", "output_hidden_states",
    "output_weight", "padded_vocab_size",
    "supported_architectures", "te_available", "to_transformer_config",
]
