"""Tiny random Hugging Face models and references shared by the Megatron distributed tests."""

from __future__ import annotations

import torch

FAMILY_CONFIGS = {
    # GQA, untied, vocab not a multiple of 128
    "llama": dict(cls="LlamaConfig", vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False, rope_theta=10000.0, architectures=["LlamaForCausalLM"]),
    # qkv bias, tied embeddings
    "qwen2": dict(cls="Qwen2Config", vocab_size=333, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=True, rope_theta=1000000.0, architectures=["Qwen2ForCausalLM"]),
}


def make_hf_model(family: str, seed: int = 0):
    import transformers

    spec = dict(FAMILY_CONFIGS[family])
    cfg = getattr(transformers, spec.pop("cls"))(**spec)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so log-probs are far from uniform
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(3.0)
    if hasattr(model, "qkv_bias_hint"):
        pass
    return model.eval()


def ragged_sequences(vocab: int, n: int, seed: int = 0, lo: int = 5, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def hf_logprobs(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """log p(x_t | x_<t), t = 1..n-1, one sequence at a time (no padding involved)."""
    out = []
    for s in sequences:
        ids = torch.tensor([s])
        logits = model(input_ids=ids).logits[0, :-1].double()
        out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1))
    return out


def make_rollout(sequences, ref_logprobs, seed: int = 0, noise: float = 0.3):
    """Response starts, behaviour log-probs (reference + noise, so ratios spread) and advantages."""
    g = torch.Generator().manual_seed(seed)
    starts = [int(torch.randint(1, len(s), (1,), generator=g)) for s in sequences]
    old = [(lp + noise * torch.randn(lp.shape, generator=g, dtype=lp.dtype)).float() for lp in ref_logprobs]
    adv = torch.randn(len(sequences), generator=g)
    return starts, old, adv


def actor_settings(name: str = "holder", options: dict | None = None, **run):
    """ActorSettings for loss ``name`` with ``options`` (its option values) and run constants
    (token_budget, pack, temperature, max_sequences_per_microbatch, ...)."""
    from holderpo_megatron.algorithms import make_loss_options
    from holderpo_megatron.trainer.actor import ActorSettings

    return ActorSettings(loss=name, loss_options=make_loss_options(name, **(options or {})), **run)


def hf_reference_grads(model, sequences, starts, old, adv, loss_name: str, loss_kwargs: dict) -> dict:
    """Gradients of the full-batch loss w.r.t. the HF parameters, computed with transformers."""
    from holderpo_megatron.algorithms import compute_policy_loss

    model.zero_grad()
    b, t = len(sequences), max(len(s) for s in sequences) - 1
    logp = torch.zeros(b, t)
    old_p = torch.zeros(b, t)
    mask = torch.zeros(b, t, dtype=torch.bool)
    rows = []
    for i, s in enumerate(sequences):
        ids = torch.tensor([s])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
        rows.append(torch.nn.functional.pad(lp, (0, t - lp.numel())))
        old_p[i, : lp.numel()] = old[i]
        mask[i, starts[i] - 1: lp.numel()] = True
    logp = torch.stack(rows)
    compute_policy_loss(loss_name, logp, old_p, adv, mask, **loss_kwargs).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
