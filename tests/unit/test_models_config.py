import pytest
import torch

from holderpo_megatron.models import ModelArch, check_layout, padded_vocab_size, supported_architectures
from holderpo_megatron.parallel.layout import ParallelLayout

BASE = dict(architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=896, intermediate_size=4864,
            num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
            rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, hidden_act="silu")


def arch(**kw):
    return ModelArch.from_hf_config({**BASE, **kw})


def test_families_are_read_from_the_config():
    a = arch()
    assert (a.family, a.qkv_bias, a.qk_norm, a.head_dim, a.tie_word_embeddings) == ("qwen2", True, False, 64, True)
    q3 = arch(architectures=["Qwen3ForCausalLM"], head_dim=128, attention_bias=False)
    assert (q3.family, q3.qkv_bias, q3.qk_norm, q3.head_dim) == ("qwen3", False, True, 128)
    ll = arch(architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert (ll.family, ll.qkv_bias, ll.rope_scaling, ll.rope_scaling_factor) == ("llama", False, "llama3", 8.0)
    # DeepSeek-R1-Distill-Qwen is a Qwen2ForCausalLM
    assert "Qwen2ForCausalLM" in supported_architectures()


@pytest.mark.parametrize("kw,match", [
    (dict(architectures=["GPT2LMHeadModel"]), "unsupported architectures .*supported: LlamaForCausalLM"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0}), "high_freq_factor"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads=3"),
    (dict(use_sliding_window=True, sliding_window=4096), "sliding_window"),
    (dict(vocab_size=None), "'vocab_size' is missing"),
])
def test_unsupported_configs_are_refused_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        arch(**kw)


@pytest.mark.parametrize("layout,match", [
    (dict(tp=4), "num_attention_heads=14 is not divisible by tensor_parallel=4"),
    (dict(tp=7), "num_key_value_heads=2 is not divisible by tensor_parallel=7"),
    (dict(pp=5), "num_hidden_layers=24 is not divisible by pipeline_parallel=5"),
    (dict(tp=2, pp=2, world_size=6), "world size 6 is not divisible by .* = 4"),
    (dict(seq_length=40000), "sequence length 40000 exceeds .* max_position_embeddings=32768"),
    (dict(tp=0), "tensor_parallel size must be an int >= 1"),
])
def test_layouts_that_do_not_divide_are_refused(layout, match):
    with pytest.raises(ValueError, match=match):
        check_layout(arch(), **layout)


def test_layout_dataclass():
    assert ParallelLayout(tp=2, pp=2).data_parallel_size(8) == 2
    with pytest.raises(ValueError, match="world size 6 is not divisible by tp\\*pp\\*cp"):
        ParallelLayout(tp=2, pp=2).data_parallel_size(6)
    with pytest.raises(ValueError, match="parallel.vpp"):
        ParallelLayout(pp=1, vpp=2)
    with pytest.raises(ValueError, match="sequence_parallel needs tp > 1"):
        ParallelLayout(sequence_parallel=True)


def test_padded_vocab():
    assert padded_vocab_size(301, 1) == 384 and padded_vocab_size(301, 2) == 512
    assert padded_vocab_size(151936, 8) == 152576


def test_transformer_config_carries_layout_and_family():
    pytest.importorskip("megatron.core")
    from holderpo_megatron.models import to_transformer_config

    cfg = to_transformer_config(arch(), tp=2, pp=4, params_dtype=torch.bfloat16)
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 4)
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.add_qkv_bias, cfg.bf16) == (2, 64, True, True)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit
    # sequence parallelism reaches Megatron (it used to be dropped), and needs TP
    assert to_transformer_config(arch(), tp=2, sequence_parallel=True).sequence_parallel
    with pytest.raises(ValueError, match="sequence_parallel needs tensor_parallel > 1"):
        to_transformer_config(arch(), tp=1, sequence_parallel=True)
