"""Tiny random Hugging Face decoders, one per supported family, built at test time.

Hidden 64, GQA (4 query heads, 2 KV heads), vocab 301 (not a multiple of 128, so Megatron pads it),
tied and untied embeddings. Weights are drawn wide enough (std 0.1, norms around 1, random biases)
that a wrongly placed tensor changes the logits visibly.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 301

# name -> (config class, model class, config kwargs, dtype)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(num_hidden_layers=4, tie_word_embeddings=False, rope_theta=500000.0), torch.float32),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_hidden_layers=2, tie_word_embeddings=True, sliding_window=None), torch.float32),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_hidden_layers=2, tie_word_embeddings=True, rope_theta=1e6), torch.float32),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(num_hidden_layers=2, tie_word_embeddings=False, head_dim=32, rope_theta=1e6), torch.float32),
    "llama_bf16": ("LlamaConfig", "LlamaForCausalLM",
                   dict(num_hidden_layers=2, tie_word_embeddings=True), torch.bfloat16),
}


def hf_config(name: str, **overrides):
    import transformers

    cfg_cls, model_cls, kw, _ = CASES[name]
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, rms_norm_eps=1e-6, architectures=[model_cls])
    base.update(kw)
    base.update(overrides)
    return getattr(transformers, cfg_cls)(**base)


def build_hf_model(name: str, seed: int = 0, **overrides):
    import transformers

    cfg = hf_config(name, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, CASES[name][1])(cfg)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model.to(CASES[name][3]).eval()


def save_hf_model(name: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny model (config.json, generation_config.json, model.safetensors) and a small
    tokenizer_config.json so the side-file copying is exercised."""
    model = build_hf_model(name, seed, **overrides)
    model.save_pretrained(directory)
    (Path(directory) / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    return Path(directory)


def input_ids(batch: int = 2, seq: int = 11, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    ids[0, 0], ids[1, -1] = VOCAB - 1, 0  # the last real vocab row is read
    return ids


def convert_in_subprocess(jobs, timeout: float = 300) -> None:
    """Run conversions in one fresh interpreter (Megatron's globals and the CPU layer stay out of
    the test process). ``jobs``: ``("hf2meg" | "meg2hf", src, dst[, dtype])`` tuples."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from holderpo_megatron.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf\n"
        "if __name__ == '__main__':\n"
        "    for job in json.loads(sys.argv[1]):\n"
        "        kind, src, dst = job[:3]\n"
        "        dtype = job[3] if len(job) > 3 else None\n"
        "        fn = convert_hf_to_megatron if kind == 'hf2meg' else convert_megatron_to_hf\n"
        "        fn(src, dst, dtype=dtype, progress=False)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([list(j) for j in jobs])], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"conversion failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
