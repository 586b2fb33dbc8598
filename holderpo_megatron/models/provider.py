"""Build the Megatron ``GPTModel`` for the local pipeline stage from a :class:`ModelArch`."""

from __future__ import annotations

import torch

from .config import ModelArch, padded_vocab_size

__all__ = ["build_gpt_model", "layer_spec", "output_hidden_states", "output_weight", "te_available"]


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE raises various errors where CUDA or its libraries are missing
        return False
    return True


def layer_spec(arch: ModelArch, use_te: bool | None = None, core_attention=None):
    """Transformer Engine spec on GPU when TE imports, else Megatron's local spec with
    :class:`~holderpo_megatron.models.attention.SegmentCausalAttention` as its core attention (packed
    rows as THD and context parallelism without S x S; Megatron's own local attention does neither).
    ``core_attention`` replaces it (the memory bench passes Megatron's ``DotProductAttention``)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te is None:
        use_te = te_available()
    if use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    from .attention import SegmentCausalAttention

    spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=arch.qk_norm)
    spec.submodules.self_attention.submodules.core_attention = core_attention or SegmentCausalAttention
    return spec


def build_gpt_model(arch: ModelArch, config, *, pre_process: bool | None = None, post_process: bool | None = None,
                    use_te: bool | None = None, vp_stage: int | None = None,
                    make_vocab_size_divisible_by: int = 128, core_attention=None):
    """GPTModel for this rank's pipeline stage. ``config`` comes from :func:`to_transformer_config`.

    ``pre_process``/``post_process`` default to whether this rank holds the first/last stage;
    ``core_attention``: see :func:`layer_spec`.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    vocab = padded_vocab_size(arch.vocab_size, config.tensor_model_parallel_size, make_vocab_size_divisible_by)
    rope = dict(position_embedding_type="rope", rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta)
    if arch.rope_scaling == "llama3":
        rope.update(rope_scaling=True, rope_scaling_factor=arch.rope_scaling_factor)
    elif arch.rope_scaling == "linear":
        rope.update(seq_len_interpolation_factor=arch.rope_scaling_factor)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, use_te, core_attention),
        vocab_size=vocab,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        vp_stage=vp_stage,
        **rope,
    )


_HIDDEN_STATES_LAYERS: dict[type, type] = {}


def _hidden_states_forward(self, input_, weight=None, runtime_gather_output=None):
    return input_, None


def output_hidden_states(gpt) -> None:
    """Make ``gpt`` (a last-stage ``GPTModel``) return its final hidden states instead of logits:
    ``[b, s, H]`` (``[b, s / TP, H]`` under sequence parallelism), for a caller that applies the
    output layer itself to the positions it needs (``parallel.logprobs.output_layer_logprobs``).

    The output layer keeps its class's parameters, names and checkpoint layout (its class becomes a
    subclass whose forward passes the input through), so weights load, save and sync as before;
    :func:`output_weight` gives the weight to use."""
    layer = gpt.output_layer
    if layer.bias is not None:
        raise ValueError("output_hidden_states: the output layer has a bias, which the fused log-probs do not add")
    cls = type(layer)
    if cls not in _HIDDEN_STATES_LAYERS.values():
        if cls not in _HIDDEN_STATES_LAYERS:
            _HIDDEN_STATES_LAYERS[cls] = type(f"HiddenStates{cls.__name__}", (cls,), {"forward": _hidden_states_forward})
        layer.__class__ = _HIDDEN_STATES_LAYERS[cls]


def output_weight(gpt):
    """The ``[vocab / TP, H]`` weight the last stage's output layer multiplies by: the word
    embedding's when tied on this stage (Megatron's ``shared_embedding_or_output_weight``), so its
    gradient reaches the parameter DDP and the embedding-group all-reduce see."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight
