#!/usr/bin/env python3
"""GPU smoke check of the Megatron policy (run by tools/gpu_smoke.sh on a one-GPU machine).

Builds a random Qwen2 of Qwen2.5-0.5B's shape in bf16 (Transformer Engine layer spec when TE
imports, else Megatron's local spec), loads the same weights into transformers and into Megatron,
compares token log-probs, times a training step (forward+backward+optimizer, HölderPO loss),
and measures the peak GPU memory of our vocab-parallel log-probs vs the float32 log_softmax way.
``--tiny`` runs a small model on CPU (to check the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def qwen2_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       architectures=["Qwen2ForCausalLM"])


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def logprob_memory(dev, tokens=8192, vocab=152064):
    """Peak extra GPU memory (x the logits' size) of ours vs log_softmax(float32).gather."""
    from holderpo_megatron.parallel.logprobs import vocab_parallel_logprobs

    out = {}
    logits = torch.randn(tokens, vocab, device=dev, dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (tokens,), device=dev)
    size = logits.numel() * logits.element_size()
    for name, fn in (
        ("ours", lambda: vocab_parallel_logprobs(logits, target, entropy=True).logprobs),
        ("baseline", lambda: torch.log_softmax(logits.float(), -1).gather(-1, target[:, None]).squeeze(-1)),
    ):
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.no_grad():
            r = fn()
        sync()
        out[name] = (torch.cuda.max_memory_allocated() - base) / size
        del r
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

        enable_cpu_megatron()
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29531"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    from transformers import AutoModelForCausalLM

    from holderpo_megatron.checkpoint.mapping import load_hf_weights_into_model
    from holderpo_megatron.models import ModelArch, te_available
    from holderpo_megatron.parallel.layout import ParallelLayout, init_distributed, initialize_model_parallel
    from holderpo_megatron.trainer.actor import ActorSettings, MegatronActor, OptimizerSettings
    from holderpo_megatron.trainer.batch import RolloutBatch

    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    init_distributed()
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "te_spec": te_available(),
              "torch": torch.__version__}
    cfg = qwen2_config(args.tiny)
    torch.manual_seed(0)
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    report["params_b"] = sum(p.numel() for p in hf.parameters()) / 1e9
    arch = ModelArch.from_hf_config(cfg)
    layout = ParallelLayout()
    initialize_model_parallel(layout)
    actor = MegatronActor(arch, layout, params_dtype=dtype, optimizer=OptimizerSettings(lr=1e-6, clip_grad=1.0))
    load_hf_weights_into_model(actor.unwrapped(), arch, hf.state_dict())
    report["build_load_s"] = time.perf_counter() - t

    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.length // 2, args.length + 1, (args.seqs,), generator=g).tolist()
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    ref = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s], device=dev)
            lg = hf(input_ids=ids).logits[0, :-1].float()
            ref.append(torch.log_softmax(lg, -1).gather(-1, ids[0, 1:, None]).squeeze(-1).cpu())
    budget = 2 * args.length
    actor.settings = ActorSettings(token_budget=budget)
    actor.score(seqs[:1])  # warm-up
    sync()
    t = time.perf_counter()
    ours = actor.score(seqs)
    sync()
    report["score_s"] = time.perf_counter() - t
    diff = torch.cat([(a - b).abs() for a, b in zip(ours, ref)])
    report["logprob_max_abs_diff"] = diff.max().item()
    report["logprob_mean_abs_diff"] = diff.mean().item()
    report["logprob_mean_abs"] = torch.cat(ref).abs().mean().item()

    g2 = torch.Generator().manual_seed(2)
    batch = RolloutBatch(seqs, [n // 2 for n in lengths], [lp.clone() for lp in ours], torch.randn(len(seqs), generator=g2))
    kw = dict(p=1.0)
    actor.train_step(batch, **kw)  # warm-up (allocates optimizer state)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    metrics = actor.train_step(batch, **kw)
    sync()
    step = time.perf_counter() - t
    report["train_step_s"] = step
    report["train_tokens_per_s"] = sum(lengths) / step
    report["grad_norm"] = metrics["grad_norm"]
    report["rho_mean"] = metrics.get("rho_mean")
    if cuda:
        report["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        report["logprob_peak_x_logits"] = logprob_memory(dev)
    # The colocated memory handover: optimizer state and grad buffers leave the GPU during rollout and
    # come back for training. Memory freed, and the step after onload equals one without offload.
    before = {n: p.detach().clone() for m in actor.unwrapped() for n, p in m.named_parameters()}
    opt_before = actor.optimizer.state_dict()
    sync()
    held = torch.cuda.memory_allocated() if cuda else 0
    actor.offload()
    sync()
    report["offload_freed_gib"] = (held - (torch.cuda.memory_allocated() if cuda else 0)) / 2**30
    actor.onload()
    with_offload = actor.train_step(batch, **kw)
    after_offload = {n: p.detach().clone() for m in actor.unwrapped() for n, p in m.named_parameters()}
    for m in actor.unwrapped():  # the same step again from the same state, without the handover
        for n, p in m.named_parameters():
            p.data.copy_(before[n])
    actor.optimizer.load_state_dict(opt_before)
    without = actor.train_step(batch, **kw)
    same = all(torch.equal(p.detach(), after_offload[n]) for m in actor.unwrapped() for n, p in m.named_parameters())
    report["offload_step_identical"] = bool(same) and with_offload["grad_norm"] == without["grad_norm"]
    print(json.dumps(report, indent=2))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_smoke.json"), "w") as f:
        json.dump(report, f, indent=2)
    # bf16 parity: kernels differ (sdpa vs Megatron's attention), so a bf16-sized tolerance
    ok = report["logprob_mean_abs_diff"] <= (0.05 if cuda else 1e-4) and report["offload_step_identical"]
    print("PARITY", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
