#!/usr/bin/env python3
"""GPU check of multi-turn (agent) training: one Actor step on ALFWorld-shaped trajectories.

A random model of Qwen2.5-1.5B-Instruct's shape (the ALFWorld recipe's) in bf16, local layer spec,
one GPU. The batch mimics an ALFWorld step's share: episodes of several turns (prompt ~700 tokens:
task, history, observation, admissible actions; response ~100 tokens), each episode one
trajectory sharing an advantage, reduced as one sequence by the HölderPO loss. Reports the time
and peak memory of a training step and checks that grouping by trajectory changes the loss
(it is not silently per turn). Run through tools/gpu_smoke.sh's environment (see gpu_agent_step.sh).
``--tiny`` runs a small model on CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=700)
    ap.add_argument("--response", type=int, default=100)
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:
        from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

        enable_cpu_megatron()
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29533"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                 ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    from transformers import Qwen2Config

    from holderpo_megatron.models import ModelArch
    from holderpo_megatron.models.known import KNOWN_CONFIGS
    from holderpo_megatron.parallel.layout import ParallelLayout, init_distributed, initialize_model_parallel
    from holderpo_megatron.trainer.actor import ActorSettings, MegatronActor, OptimizerSettings
    from holderpo_megatron.trainer.batch import RolloutBatch

    init_distributed()
    if args.tiny:
        hf = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
        args.prompt, args.response, args.episodes, args.turns = 60, 12, 4, 3
    else:
        hf = Qwen2Config(**KNOWN_CONFIGS["Qwen/Qwen2.5-1.5B-Instruct"])
    arch = ModelArch.from_hf_config(hf)
    initialize_model_parallel(ParallelLayout())
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    actor = MegatronActor(arch, ParallelLayout(), ActorSettings(token_budget=args.budget), params_dtype=dtype,
                          max_seq_length=4096,
                          optimizer=OptimizerSettings(lr=1e-6, clip_grad=1.0))
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "model": "random Qwen2.5-1.5B shape" if not args.tiny else "tiny", "build_s": time.perf_counter() - t0}

    g = torch.Generator().manual_seed(0)
    seqs, starts, traj, adv = [], [], [], []
    episode_adv = torch.randn(args.episodes, generator=g)
    for e in range(args.episodes):
        for _ in range(args.turns):
            p = int(args.prompt * (0.8 + 0.4 * torch.rand(1, generator=g)))
            r = int(args.response * (0.5 + torch.rand(1, generator=g)))
            seqs.append(torch.randint(0, arch.vocab_size, (p + r,), generator=g).tolist())
            starts.append(p)
            traj.append(e)
            adv.append(float(episode_adv[e]))
    old = actor.score(seqs)
    old = [lp - 0.05 * torch.randn(lp.shape, generator=g) for lp in old]  # off-policy: ratios != 1
    batch = RolloutBatch(seqs, starts, old, torch.tensor(adv), trajectory=traj)
    per_turn = RolloutBatch(seqs, starts, old, torch.tensor(adv))
    kw = dict(p=2.0)
    actor.train_step(batch, **kw)  # warm-up: optimizer state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    m = actor.train_step(batch, **kw)
    if cuda:
        torch.cuda.synchronize()
    report["step_s"] = time.perf_counter() - t
    report["tokens"] = sum(len(s) for s in seqs)
    report["tokens_per_s"] = report["tokens"] / report["step_s"]
    report["trajectories"], report["samples"] = args.episodes, len(seqs)
    report["num_seqs_in_loss"] = m.get("num_seqs")
    report["grad_norm"] = m["grad_norm"]
    if cuda:
        report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    m2 = actor.forward_backward(per_turn, **kw).to_dict()
    m1 = actor.forward_backward(batch, **kw).to_dict()
    report["rho_mean_trajectory"], report["rho_mean_per_turn"] = m1.get("rho_mean"), m2.get("rho_mean")
    print(json.dumps(report, indent=2))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_agent_step.json"), "w") as f:
        json.dump(report, f, indent=2)
    ok = (torch.isfinite(torch.tensor(report["grad_norm"])).item()
          and report["rho_mean_trajectory"] != report["rho_mean_per_turn"])
    print("AGENT STEP", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
