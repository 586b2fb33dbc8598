"""Hugging Face config -> one typed description of the model -> Megatron ``TransformerConfig``.

This is the single mapping shared by the Megatron policy, checkpoint conversion and weight sync.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .families import FAMILIES, Family, supported_architectures

__all__ = ["ModelArch", "padded_vocab_size", "check_layout", "to_transformer_config", "RECOMPUTE_MODES",
           "check_recompute"]

_SUPPORTED_ROPE = ("default", "linear", "llama3")
# Activation recompute (YAML ``train.recompute``): "none" keeps every layer's activations for backward;
# "full" keeps only each decoder layer's input [tokens, hidden] and reruns the layer's forward in
# backward (Megatron: granularity full, uniform, 1 layer per checkpoint): about one layer's activations
# at a time instead of all of them, for ~1/3 more compute.
RECOMPUTE_MODES = ("none", "full")
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class ModelArch:
    """Everything about a decoder that fixes its parameter shapes and forward pass."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: str  # "default" | "linear" | "llama3"
    rope_scaling_factor: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf_config(cls, cfg: dict | object) -> "ModelArch":
        """From a ``config.json`` dict (or a transformers ``PretrainedConfig``)."""
        if not isinstance(cfg, dict):
            cfg = cfg.to_dict()
        archs = cfg.get("architectures") or []
        if len(archs) != 1 or archs[0] not in FAMILIES:
            raise ValueError(
                f"unsupported architectures {archs!r}; supported: {', '.join(supported_architectures())}"
            )
        arch = archs[0]
        fam: Family = FAMILIES[arch]

        def need(key):
            if cfg.get(key) is None:
                raise ValueError(f"config field {key!r} is missing (architecture {arch})")
            return cfg[key]

        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config field hidden_act={act!r} is not supported; supported: 'silu' (SwiGLU)")
        if cfg.get("mlp_bias"):
            raise ValueError("config field mlp_bias=True is not supported; supported: false")
        if cfg.get("use_sliding_window") or (arch == "MistralForCausalLM" and cfg.get("sliding_window")):
            raise ValueError(
                f"config field sliding_window={cfg.get('sliding_window')!r} is not supported "
                "(set use_sliding_window=false / sliding_window=null for full attention)"
            )
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if heads % kv:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        qkv_bias = fam.qkv_bias if isinstance(fam.qkv_bias, bool) else bool(cfg.get(fam.qkv_bias, False))
        # transformers >= 5 writes rope settings under "rope_parameters" (theta included); 4.x wrote
        # top-level "rope_theta" and "rope_scaling".
        rope_params = cfg.get("rope_parameters") or {}
        rope_kind, rope_factor = _rope_scaling(cfg.get("rope_scaling") or rope_params)
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        return cls(
            architecture=arch,
            family=fam.name,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_kind,
            rope_scaling_factor=rope_factor,
            max_position_embeddings=int(need("max_position_embeddings")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=fam.qk_norm,
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> "ModelArch":
        p = Path(path) / "config.json"
        if not p.is_file():
            raise ValueError(f"no config.json in {str(path)!r}")
        try:
            cfg = json.loads(p.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{p}: expected a JSON object, got {type(cfg).__name__}")
        try:
            return cls.from_hf_config(cfg)
        except (ValueError, TypeError) as e:  # a field missing, of the wrong type, or unsupported
            raise ValueError(f"{p}: {e}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def kv_channels(self) -> int:
        return self.head_dim


def _rope_scaling(rs: dict | None) -> tuple[str, float]:
    if not rs:
        return "default", 1.0
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in _SUPPORTED_ROPE:
        raise ValueError(f"config field rope_scaling type {kind!r} is not supported; supported: {_SUPPORTED_ROPE}")
    factor = float(rs.get("factor", 1.0))
    if kind == "llama3":
        for k, v in _LLAMA3_ROPE.items():
            if k in rs and float(rs[k]) != v:
                raise ValueError(f"config field rope_scaling.{k}={rs[k]!r} is not supported; supported: {v}")
    return kind, factor


def check_recompute(mode) -> None:
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={mode!r} is not supported; supported: {', '.join(RECOMPUTE_MODES)}")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocab to a multiple of ``divisible_by * tp`` so it splits evenly."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def check_layout(arch: ModelArch, tp: int = 1, pp: int = 1, cp: int = 1, world_size: int | None = None,
                 seq_length: int | None = None) -> None:
    """Refuse, before any work starts, a layout the model cannot be split into."""
    for name, v in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("context_parallel", cp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} size must be an int >= 1, got {v!r}")
    if arch.num_heads % tp:
        raise ValueError(f"num_attention_heads={arch.num_heads} is not divisible by tensor_parallel={tp}")
    if arch.num_kv_heads % tp:
        raise ValueError(f"num_key_value_heads={arch.num_kv_heads} is not divisible by tensor_parallel={tp}")
    if arch.intermediate_size % tp:
        raise ValueError(f"intermediate_size={arch.intermediate_size} is not divisible by tensor_parallel={tp}")
    if arch.num_layers % pp:
        raise ValueError(f"num_hidden_layers={arch.num_layers} is not divisible by pipeline_parallel={pp}")
    if world_size is not None and world_size % (tp * pp * cp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_parallel*pipeline_parallel*context_parallel "
            f"= {tp}*{pp}*{cp} = {tp * pp * cp}"
        )
    if seq_length is not None and seq_length > arch.max_position_embeddings:
        raise ValueError(
            f"sequence length {seq_length} exceeds the model's max_position_embeddings={arch.max_position_embeddings}"
        )


def to_transformer_config(arch: ModelArch, tp: int = 1, pp: int = 1, cp: int = 1, *,
                          params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                          use_cpu_initialization: bool = False, recompute: str = "none", **overrides):
    """Megatron ``TransformerConfig`` for ``arch`` at this layout (tp/pp/cp must be carried there);
    ``recompute``: one of :data:`RECOMPUTE_MODES`."""
    from megatron.core.transformer import TransformerConfig

    check_layout(arch, tp, pp, cp)
    check_recompute(recompute)
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tensor_parallel > 1 (it splits activations over the TP group)")
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,  # required by Megatron when pipeline_parallel > 1
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
    )
    if recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
