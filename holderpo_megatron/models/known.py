"""Public configs of the models our recipes name, as data, so `holderpo plan` can size a run on a
machine that does not hold the weights. A local ``config.json`` always wins over this table."""

from __future__ import annotations

_QWEN2_7B = dict(architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, hidden_act="silu")

KNOWN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-Math-7B": dict(_QWEN2_7B, max_position_embeddings=4096, rope_theta=10000.0),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": dict(_QWEN2_7B, max_position_embeddings=131072, rope_theta=10000.0),
    "Qwen/Qwen2.5-32B": dict(architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=5120,
                             intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                             num_key_value_heads=8, max_position_embeddings=32768, rope_theta=1000000.0,
                             rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu"),
    "meta-llama/Llama-3.1-70B-Instruct": dict(
        architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=1536,
                                       intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                       num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
                                       rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                                                intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                                num_key_value_heads=3, max_position_embeddings=8192,
                                                rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                                hidden_act="silu"),
}
