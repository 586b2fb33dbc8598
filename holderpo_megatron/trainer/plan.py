"""`holderpo plan`: the parallel layout of a recipe and a per-GPU memory estimate, refusing what cannot fit.

The estimate is deliberately simple and says how it counts (bytes per parameter of this rank's
largest pipeline stage):
  weights    2 (bf16) or 4 (fp32)
  grads      4 (Megatron's fp32 main_grad buffer)
  optimizer  12 = fp32 master + Adam m, v (only master+m+v of the fp32 case: 8), divided by the
             data-parallel size with the distributed optimizer (the default on GPU)
  activations  34 * tokens * hidden / tp bytes per layer (flash attention, no recomputation),
             for the layers of a stage times the pp microbatches in flight in 1F1B
  logits     tokens * vocab / tp * 2 bytes, twice (logits and their gradient), plus our 64 MiB chunk
  SGLang     mem_fraction_static of a GPU it runs on (unset: 0.7 on GPU, 0.3 on CPU, as the engine does).
             colocated with rollout.release_memory_during_train on a GPU: the engines release weights and
             KV while Megatron trains, so the peak is max(training, rollout); otherwise (handover off, or
             CPU, where engines cannot release) both stay resident and the peak is their sum. Separate
             engines take GPUs of their own: the trainer's peak is training alone.
The placement of the engines (parallel/placement.py) is printed above the estimate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from holderpo_megatron.models import ModelArch
from holderpo_megatron.models.known import KNOWN_CONFIGS
from holderpo_megatron.parallel.placement import Placement

from .config import ConfigError, RunConfig, run_placement, validate_run

__all__ = ["MemoryPlan", "plan_run", "arch_for_plan", "format_plan"]

GIB = 2**30
HEADROOM = 0.92  # fraction of the GPU a plan may use (allocator fragmentation, NCCL, CUDA context)


def arch_for_plan(cfg: RunConfig) -> ModelArch:
    from holderpo_megatron.models.hub import cached_hub_file, is_hub_id

    hf = cfg.model.hf_path
    if hf and not hf.startswith("builtin:") and (Path(hf) / "config.json").is_file():
        return ModelArch.from_hf_config(json.loads((Path(hf) / "config.json").read_text()))
    hub = is_hub_id(hf)
    cached = cached_hub_file(hf, "config.json", cfg.model.revision) if hub else None
    if cached is not None:  # a Hub id already in the cache (plan never downloads)
        return ModelArch.from_hf_config(json.loads(cached.read_text()))
    name = cfg.model.name or ("HuggingFaceTB/SmolLM2-135M-Instruct" if hf == "builtin:smollm2-135m-instruct" else "")
    if not name and hub:
        name = hf
    if name in KNOWN_CONFIGS:
        return ModelArch.from_hf_config(KNOWN_CONFIGS[name])
    where = (f"the Hub id model.hf_path={hf!r} is not in the Hugging Face cache (plan and --dry-run never "
             "download)" if hub else f"no config.json under model.hf_path={hf!r}")
    raise ConfigError(
        f"model: {where} and model.name={cfg.model.name!r} is not one of {', '.join(sorted(KNOWN_CONFIGS))}"
    )


@dataclass
class MemoryPlan:
    params_total: float
    params_per_gpu: float
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    training_gib: float
    rollout_gib: float
    peak_gib: float
    gpu_gib: float
    colocated: bool = True  # engines share the trainer's GPUs
    handover: bool = True  # colocated engines release their memory while Megatron trains

    @property
    def fits(self) -> bool:
        return self.peak_gib <= HEADROOM * self.gpu_gib


def _params(arch: ModelArch) -> tuple[float, float, float]:
    """(per-layer params, embedding params, total params)."""
    h, f = arch.hidden_size, arch.intermediate_size
    q = arch.num_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if arch.qkv_bias else 0) + (2 * arch.head_dim if arch.qk_norm else 0)
    mlp = 3 * h * f
    layer = attn + mlp + 2 * h
    emb = arch.vocab_size * h
    total = arch.num_layers * layer + emb * (1 if arch.tie_word_embeddings else 2) + h
    return layer, emb, total


def plan_run(cfg: RunConfig, arch: ModelArch, on_gpu: bool = True) -> MemoryPlan:
    p = cfg.parallel
    layer, emb, total = _params(arch)
    # the largest stage: a pipeline end holds the embedding or the output layer (both when pp = 1)
    ends = emb * (1 if arch.tie_word_embeddings or p.pp > 1 else 2)
    per_gpu = (arch.num_layers / p.pp * layer + ends) / p.tp
    bf16 = cfg.model.dtype == "bf16" or (cfg.model.dtype == "auto" and on_gpu)
    weights = per_gpu * (2 if bf16 else 4)
    grads = per_gpu * 4
    opt = per_gpu * (12 if bf16 else 8) / (p.dp * p.cp if on_gpu else 1)
    tokens = cfg.train.token_budget / p.cp
    act = 34 * tokens * arch.hidden_size / p.tp * (arch.num_layers / p.pp) * p.pp
    logits = 2 * tokens * arch.vocab_size / p.tp * 2 + 64 * 2**20
    training = weights + grads + opt + act + logits
    r = cfg.rollout
    rollout = (r.mem_fraction_static or (0.7 if on_gpu else 0.3)) * p.gpu_memory_gb * GIB
    colocated = r.placement == "colocated"
    handover = colocated and r.release_memory_during_train and on_gpu
    if not colocated:
        peak = training
    else:
        peak = max(training, rollout) if handover else training + rollout
    g = GIB
    return MemoryPlan(total, per_gpu, weights / g, grads / g, opt / g, act / g, logits / g, training / g,
                      rollout / g, peak / g, p.gpu_memory_gb, colocated, handover)


def _rollout_line(mp: MemoryPlan) -> str:
    if not mp.colocated:
        return f"SGLang (separate GPUs, not counted here) {mp.rollout_gib:8.2f}"
    if mp.handover:
        return f"SGLang (colocated, released in training: peak = max) {mp.rollout_gib:8.2f}"
    return f"SGLang (colocated, resident in training: peak = sum) {mp.rollout_gib:8.2f}"


def format_plan(cfg: RunConfig, arch: ModelArch, mp: MemoryPlan, placement: Placement | None = None) -> str:
    p = cfg.parallel
    lines = [
        f"run {cfg.name}: {arch.architecture} ({mp.params_total / 1e9:.2f}B params), {cfg.hardware or 'hardware unstated'}",
        f"layout: {p.nnodes} node(s) x {p.nproc_per_node} GPU = {p.world_size} ranks; "
        f"TP{p.tp} x PP{p.pp}{f' (vpp {p.vpp})' if p.vpp else ''} x CP{p.cp} x DP{p.dp}",
        f"per step: {cfg.train.prompts_per_step} prompts x {cfg.rollout.group_size} samples, "
        f"{cfg.train.minibatches_per_step} optimizer step(s), microbatch budget {cfg.train.token_budget} tokens",
        "per-GPU memory estimate (GiB):",
        f"  weights {mp.weights_gib:8.2f}   grads {mp.grads_gib:8.2f}   optimizer {mp.optimizer_gib:8.2f}",
        f"  activations {mp.activations_gib:8.2f}   logits {mp.logits_gib:8.2f}",
        f"  training total {mp.training_gib:8.2f}   {_rollout_line(mp)}",
        f"  peak {mp.peak_gib:8.2f} of {mp.gpu_gib:.0f} ({HEADROOM:.0%} usable): {'fits' if mp.fits else 'DOES NOT FIT'}",
    ]
    if placement is not None:
        lines[2:2] = placement.describe().splitlines()
    return "\n".join(lines)


def plan_main(cfg: RunConfig) -> int:
    arch = arch_for_plan(cfg)
    validate_run(cfg, arch, check_paths=False)
    mp = plan_run(cfg, arch, on_gpu=cfg.model.dtype != "fp32")
    print(format_plan(cfg, arch, mp, run_placement(cfg)))
    if not mp.fits:
        hint = "raise tp/pp, lower train.token_budget or rollout.mem_fraction_static"
        if mp.colocated and not mp.handover and max(mp.training_gib, mp.rollout_gib) <= HEADROOM * mp.gpu_gib:
            hint = "set rollout.release_memory_during_train=true on GPU (peak = max), or " + hint
        print(f"refused: the estimated peak {mp.peak_gib:.1f} GiB exceeds {HEADROOM:.0%} of {mp.gpu_gib:.0f} GiB; "
              + hint)
        return 1
    return 0
