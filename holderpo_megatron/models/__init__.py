"""HF config -> Megatron config and model, per family (families are data)."""

from .config import RECOMPUTE_MODES, ModelArch, check_layout, check_recompute, padded_vocab_size, to_transformer_config
from .families import FAMILIES, supported_architectures
from .provider import build_gpt_model, layer_spec, output_hidden_states, output_weight, te_available

__all__ = [
    "FAMILIES", "ModelArch", "RECOMPUTE_MODES", "build_gpt_model", "check_layout", "check_recompute", "layer_spec", "output_hidden_states",
    "output_weight", "padded_vocab_size",
    "supported_architectures", "te_available", "to_transformer_config",
]
