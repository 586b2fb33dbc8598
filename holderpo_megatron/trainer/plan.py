"""`holderpo plan`: the parallel layout of a recipe and a per-GPU memory estimate, refusing what cannot fit.

The estimate is deliberately simple and says how it counts (bytes per parameter of this rank's
largest pipeline stage):
  weights    2 (bf16) or 4 (fp32)
  grads      4 (Megatron's fp32 main_grad buffer)
  optimizer  12 = fp32 master + Adam m, v (only master+m+v of the fp32 case: 8), divided by the
             data-parallel size with the distributed optimizer (the default on GPU)
  activations  34 * tokens * hidden / tp bytes per layer (flash attention, no recomputation),
             for the layers of a stage times the pp microbatches in flight in 1F1B; with
             train.recompute=full 2 * tokens * hidden / tp per layer (its bf16 input) plus one layer's 34
  logits     tokens * vocab / tp * 2 bytes, twice (logits and their gradient), plus our 64 MiB chunk
  SGLang     mem_fraction_static of a GPU it runs on (unset: 0.7 on GPU, 0.3 on CPU, as the engine does).
             colocated with rollout.release_memory_during_train on a GPU: the engines release weights and
             KV while Megatron trains, so the peak is max(training, rollout); otherwise (handover off, or
             CPU, where engines cannot release) both stay resident and the peak is their sum. Separate
             engines take GPUs of their own: the trainer's peak is training alone.
The placement of the engines (parallel/placement.py) is printed above the estimate.

CPU runs (model.dtype fp32): host RAM of the node, per process (:func:`plan_host`), against the node's
RAM (``parallel.host_memory_gb``, else this machine's ``psutil.virtual_memory().total``). Every term is
resident at once (nothing is released between rollout and training on CPU). How each was measured
(2-core, 24 GB VM, SmolLM2-135M, fp32; ``bench/plan_calibration.py`` and ``bench/host_memory_sampler.py``):
  rank base    a rank's process after importing torch + megatron-core, gloo and the model-parallel
               state, no model: RANK_BASE_GIB (plan_calibration ``base``), plus RANK_RUN_EXTRA_GIB and
               ("slack") RANK_SLACK_PER_ACTIVATION x activations: what rank 0's measured peaks in the
               tiny-cpu and alfworld-tiny-cpu runs (per-step records) hold beyond the modelled terms at
               those steps' real token counts (allocator slack, the scoring pass, pipeline buffers),
               fitted on the two (rank 0: rank 1 then still made full logits); the re-measure with the
               fused output layer (bench/results/host_memory_cpu.log) puts rank 1 within 5% without a refit
  driver       rank 0 only: SGLang's tokenizer manager (embedded engine), the tokenizer, the env/reward
               clients: DRIVER_GIB, rank 0's start-up record minus rank 1's
  weights, grads, optimizer   4 + 4 (Megatron's fp32 main_grad) + 8 (Adam m, v; fp32 weights are their
               own master) bytes per parameter of the rank's stage (plan_calibration: 17.5 measured)
  activations  ACT_BYTES_PER_TOKEN_PER_HIDDEN x hidden per token per decoder layer (fp32, segment
               attention: no S x S term), counted by torch.autograd.graph.saved_tensors_hooks on the
               real Actor's train_step (plan_calibration: 4 layers minus 2 layers), times the tokens
               of a microbatch, the stage's layers, and the microbatches stage s holds in 1F1B
               (min(microbatches, pp - s)); a microbatch is train.token_budget tokens or, if fewer,
               every token of a minibatch (samples x the longest sequence). train.recompute=full:
               RECOMPUTE_BYTES_PER_TOKEN_PER_HIDDEN (a layer's fp32 input) in place of the per-layer
               bytes, plus one layer's full activations for one microbatch (rerun in backward)
  logits       last stage: the chunked, response-only output layer (parallel/logprobs
               output_layer_logprobs): 2 x 64 MiB float32 working buffers plus LOGIT_VECTOR_BYTES per
               token (response-token-sized vectors). Measured alone (fp32, vocab 49152, hidden 576,
               forward + backward at 1024 and 4096 tokens): 236 / 239 MiB over the resident size = the
               two buffers + the output weight's transient float32 gradient (108 MiB, freed once DDP
               adds it into main_grad; left in the fitted run extra, as the embedding's is on rank 0)
               + ~1.2 KB per token (3.6 MiB from 1024 to 4096 tokens: the per-token vectors and the
               hidden states' gradient; 32 B/token undercounts it by < 5 MiB). alfworld-tiny-cpu's rank 1 fell from 6.84-7.06 GiB (full logits)
               to 6.03 with it; this plan counts 5.77
  engine       per CPU SGLang engine on the node (scheduler + detokenizer processes): ENGINE_FIXED_GIB
               (weights, CPU kernels, Python) plus its KV cache, which SGLang sizes on CPU as
               mem_fraction_static x the RAM free when it starts (here: RAM less the OS and the ranks'
               weights and grads then resident; an otherwise idle node, i.e. the largest cache)
  workers      ALFWorld environment workers (agent.num_workers x ENV_WORKER_GIB), math-verify workers
               (2 x REWARD_WORKER_GIB, kind math, non-agent runs) and a small child of each rank
               (RANK_HELPER_GIB), each its measured peak RSS
  launcher     ``holderpo train`` and torchrun's agent: LAUNCHER_GIB
A CPU plan fits when the node's sum is at most HOST_HEADROOM of its RAM (page cache, the OS).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from holderpo_megatron.models import ModelArch
from holderpo_megatron.models.known import KNOWN_CONFIGS
from holderpo_megatron.parallel.placement import Placement, rank_coords

from .config import ConfigError, RunConfig, run_placement, validate_run

__all__ = ["MemoryPlan", "plan_run", "arch_for_plan", "format_plan", "HostRankPlan", "HostMemoryPlan", "plan_host",
           "format_host_plan", "check_host_memory", "is_cpu_run", "smallest_fitting_ram_gib",
           "host_activation_bytes"]

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
    per_layer = 34 * tokens * arch.hidden_size / p.tp
    if cfg.train.recompute == "full":  # each layer's bf16 input, plus one layer rerun in backward
        act = 2 * tokens * arch.hidden_size / p.tp * (arch.num_layers / p.pp) * p.pp + per_layer
    else:
        act = per_layer * (arch.num_layers / p.pp) * p.pp
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


def plan_main(cfg: RunConfig, ram_gib: float | None = None) -> int:
    """Print the plan; 1 (refused) when it does not fit. CPU runs: host RAM of the node (``ram_gib``:
    the node's RAM, default ``parallel.host_memory_gb`` or this machine's); GPU runs: per GPU."""
    arch = arch_for_plan(cfg)
    validate_run(cfg, arch, check_paths=False)
    mp = plan_run(cfg, arch, on_gpu=not is_cpu_run(cfg))
    if is_cpu_run(cfg):
        hp = plan_host(cfg, arch, ram_gib)
        head = format_plan(cfg, arch, mp, run_placement(cfg)).split("\nper-GPU memory estimate")[0]
        least = smallest_fitting_ram_gib(cfg, arch)
        print(head + "\n" + format_host_plan(hp) + "\n  smallest node RAM this plan accepts: "
              + (f"{least:.1f} GiB" if least is not None else "none up to 4 TiB"))
        if not hp.fits:
            print("refused: " + host_refusal(cfg, hp))
            return 1
        return 0
    print(format_plan(cfg, arch, mp, run_placement(cfg)))
    if not mp.fits:
        hint = "raise tp/pp, lower train.token_budget or rollout.mem_fraction_static"
        if mp.colocated and not mp.handover and max(mp.training_gib, mp.rollout_gib) <= HEADROOM * mp.gpu_gib:
            hint = "set rollout.release_memory_during_train=true on GPU (peak = max), or " + hint
        print(f"refused: the estimated peak {mp.peak_gib:.1f} GiB exceeds {HEADROOM:.0%} of {mp.gpu_gib:.0f} GiB; "
              + hint)
        return 1
    return 0


# ---------------------------------------------------------------- host memory of CPU runs
# Constants measured as the module docstring says (GiB unless named otherwise), 2026-11-30.
RANK_BASE_GIB = 0.42  # plan_calibration `base`: imports + gloo + model-parallel state
# what a rank's measured peak holds beyond the modelled terms (allocator slack, the scoring pass, pipeline
# buffers) = RANK_RUN_EXTRA_GIB + RANK_SLACK_PER_ACTIVATION x its activations, fitted to rank 0's peaks:
# tiny-cpu 3.12 (0.82 of activations: 2 x 512 tokens in flight) and alfworld-tiny-cpu 7.67 (4.91: its
# 6153 tokens, both microbatches in flight), each less base, driver and 1.21 of parameters
RANK_RUN_EXTRA_GIB = 0.38
RANK_SLACK_PER_ACTIVATION = 0.112
DRIVER_GIB = 0.20  # start-up records (<run_dir>/ranks) of alfworld-tiny-cpu: rank 0 1.33, rank 1 1.13
ACT_BYTES_PER_TOKEN_PER_HIDDEN = 99.2  # plan_calibration: 57,132 bytes per token per layer at hidden 576
RECOMPUTE_BYTES_PER_TOKEN_PER_HIDDEN = 4  # train.recompute=full: a layer's fp32 input is all it keeps
LOGIT_CHUNK_BYTES = 2 * 64 * 2**20  # H1's chunked output layer: two float32 working buffers
LOGIT_VECTOR_BYTES = 32  # per token: log-probs, entropy, targets, masks, their grads (float32/int64)
# scheduler + detokenizer peaks less fraction x the RAM free at the engine's start (host_memory_sampler
# series): alfworld-tiny-cpu 3.69 - 0.1 x 20.0 = 1.69, tiny-cpu 7.62 - 0.3 x 20.2 = 1.56
ENGINE_FIXED_GIB = 1.65
RANK_HELPER_GIB = 0.10  # each rank has a small child process (0.10 GiB peak in both runs)
ENV_WORKER_GIB = 0.13  # alfworld-tiny-cpu: rank 0's non-SGLang children 0.36 = 2 env workers + its helper
REWARD_WORKER_GIB = 0.20  # not measured (no CPU recipe verifies math): taken as an env worker's size
LAUNCHER_GIB = 0.45  # `holderpo train` 0.22 + torchrun's agent 0.22 (host_memory_sampler)
OS_RESERVE_GIB = 1.0  # kernel, page tables, what else runs: not free when the engine sizes its cache
HOST_HEADROOM = 0.90


def is_cpu_run(cfg: RunConfig) -> bool:
    """A CPU recipe: fp32 weights (the Actor and SGLang run on CPU in fp32; GPU recipes use bf16/auto)."""
    return cfg.model.dtype == "fp32"


@dataclass
class HostRankPlan:
    """One rank's planned RSS (GiB) by term."""

    rank: int
    stage: int
    base_gib: float
    driver_gib: float
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    slack_gib: float  # the allocator's share that grows with activations
    logits_gib: float

    @property
    def total_gib(self) -> float:
        return (self.base_gib + self.driver_gib + self.weights_gib + self.grads_gib + self.optimizer_gib
                + self.activations_gib + self.slack_gib + self.logits_gib)


@dataclass
class HostMemoryPlan:
    """Node 0's planned host memory (GiB): its ranks, engines, worker processes and the launcher."""

    ranks: list[HostRankPlan]
    engines: int
    engine_gib: float  # each
    engine_kv_gib: float  # of which the KV cache
    env_workers: int
    reward_workers: int
    workers_gib: float  # all of them
    launcher_gib: float
    ram_gib: float
    ram_source: str  # "parallel.host_memory_gb" or "this machine"
    microbatch_tokens: int
    microbatches: int
    notes: list[str] = field(default_factory=list)

    @property
    def ranks_gib(self) -> float:
        return sum(r.total_gib for r in self.ranks)

    @property
    def node_gib(self) -> float:
        return self.ranks_gib + self.engines * self.engine_gib + self.workers_gib + self.launcher_gib

    @property
    def usable_gib(self) -> float:
        return HOST_HEADROOM * self.ram_gib

    @property
    def fits(self) -> bool:
        return self.node_gib <= self.usable_gib


def _machine_ram_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / GIB


def _samples_per_minibatch(cfg: RunConfig) -> int:
    """Training sequences one DP rank takes into one optimizer step (an agent turn is one sequence)."""
    turns = cfg.agent.play.max_turns if cfg.agent.enabled else 1
    per_step = cfg.train.prompts_per_step * cfg.rollout.group_size * turns
    return math.ceil(per_step / (cfg.parallel.dp * cfg.train.minibatches_per_step))


def host_activation_bytes(mb_tokens: int, layers: float, in_flight: int, hidden: float, recompute: str) -> float:
    """Activations a CPU rank keeps for backward (fp32). ``recompute="full"``: each layer's input
    [tokens, hidden] for every microbatch in flight, plus one layer's full activations (the layer whose
    forward backward is rerunning); otherwise every layer's full activations."""
    per_layer = ACT_BYTES_PER_TOKEN_PER_HIDDEN * hidden
    if recompute == "full":
        return in_flight * mb_tokens * layers * RECOMPUTE_BYTES_PER_TOKEN_PER_HIDDEN * hidden + mb_tokens * per_layer
    return in_flight * mb_tokens * layers * per_layer


def plan_host(cfg: RunConfig, arch: ModelArch, ram_gib: float | None = None) -> HostMemoryPlan:
    """Host RAM of node 0 of a CPU run. ``ram_gib``: the node's RAM (default: ``parallel.host_memory_gb``,
    else this machine's)."""
    p, r = cfg.parallel, cfg.rollout
    if ram_gib is not None:
        source = "given"
    elif p.host_memory_gb is not None:
        ram_gib, source = p.host_memory_gb, "parallel.host_memory_gb"
    else:
        ram_gib, source = _machine_ram_gib(), "this machine"
    layer, emb, _ = _params(arch)
    minibatch_tokens = _samples_per_minibatch(cfg) * cfg.max_sequence_length // p.cp
    mb_tokens = min(cfg.train.token_budget // p.cp, minibatch_tokens)
    n_mb = max(1, math.ceil(minibatch_tokens / max(1, cfg.train.token_budget // p.cp)))
    layers = arch.num_layers / p.pp
    ranks = []
    for rank in range(p.nproc_per_node):  # node 0's ranks
        stage = rank_coords(rank, tp=p.tp, cp=p.cp, dp=p.dp, pp=p.pp).pp
        first, last = stage == 0, stage == p.pp - 1
        ends = (emb if first else 0) + (emb if last and (not arch.tie_word_embeddings or not first) else 0)
        params = (layers * layer + ends) / p.tp
        in_flight = min(n_mb, p.pp - stage)
        act = host_activation_bytes(mb_tokens, layers, in_flight, arch.hidden_size / p.tp, cfg.train.recompute)
        logits = (LOGIT_CHUNK_BYTES + mb_tokens * LOGIT_VECTOR_BYTES) if last else 0.0
        ranks.append(HostRankPlan(rank, stage, RANK_BASE_GIB + RANK_RUN_EXTRA_GIB, DRIVER_GIB if rank == 0 else 0.0,
                                  4 * params / GIB, 4 * params / GIB, 8 * params / GIB, act / GIB,
                                  RANK_SLACK_PER_ACTIVATION * act / GIB, logits / GIB))
    placement = run_placement(cfg)
    engines = sum(1 for e in placement.engines if e.node == 0 and e.url is None)
    # SGLang on CPU: KV = fraction x the RAM free when it starts (ranks hold weights and grads by then)
    at_start = sum(RANK_BASE_GIB + x.driver_gib + x.weights_gib + x.grads_gib for x in ranks)
    free = max(0.0, ram_gib - OS_RESERVE_GIB - at_start - LAUNCHER_GIB)
    kv = (r.mem_fraction_static or 0.3) * free if engines else 0.0
    env_workers = cfg.agent.num_workers if cfg.agent.enabled else 0
    reward_workers = 2 if (cfg.data.reward == "math" and not cfg.agent.enabled) else 0
    workers = env_workers * ENV_WORKER_GIB + reward_workers * REWARD_WORKER_GIB + len(ranks) * RANK_HELPER_GIB
    notes = []
    if p.nnodes > 1:
        notes.append("node 0 (rank 0's driver, the engines and workers); other nodes hold their ranks only")
    return HostMemoryPlan(ranks, engines, ENGINE_FIXED_GIB + kv, kv, env_workers, reward_workers, workers,
                          LAUNCHER_GIB, ram_gib, source, mb_tokens, n_mb, notes)


def smallest_fitting_ram_gib(cfg: RunConfig, arch: ModelArch) -> float | None:
    """The least node RAM (GiB, to 0.1) the CPU plan accepts; None above 4 TiB. Not a constant sum: the
    engine's KV cache grows with the RAM free at its start."""
    lo, hi = 0.5, 4096.0
    if not plan_host(cfg, arch, hi).fits:
        return None
    while hi - lo > 0.05:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if plan_host(cfg, arch, mid).fits else (mid, hi)
    return math.ceil(hi * 10) / 10


def _host_hint(cfg: RunConfig, hp: HostMemoryPlan) -> str:
    """What to lower, biggest term first."""
    act = max(x.activations_gib for x in hp.ranks)
    terms = [(act * len(hp.ranks), f"train.token_budget (now {cfg.train.token_budget})"),
             (hp.engines * hp.engine_kv_gib,
              f"rollout.mem_fraction_static (now {cfg.rollout.mem_fraction_static or 0.3}: SGLang's CPU KV cache)"),
             (hp.workers_gib, f"agent.num_workers (now {cfg.agent.num_workers})" if hp.env_workers else "the workers"),
             (sum(x.weights_gib + x.grads_gib + x.optimizer_gib for x in hp.ranks),
              f"the model's size per rank: raise parallel.pp (now {cfg.parallel.pp})")]
    terms.sort(key=lambda t: -t[0])
    return "lower " + ", or ".join(t[1] for t in terms[:2])


def host_refusal(cfg: RunConfig, hp: HostMemoryPlan) -> str:
    """The one-line refusal of a CPU run whose node does not fit ('' when it fits)."""
    if hp.fits:
        return ""
    per_rank = "+".join(f"{x.total_gib:.1f}" for x in hp.ranks)
    return (f"host memory: node 0 needs an estimated {hp.node_gib:.1f} GiB (ranks {per_rank}, "
            f"{hp.engines} SGLang engine(s) {hp.engines * hp.engine_gib:.1f}, workers {hp.workers_gib:.1f}, "
            f"launcher {hp.launcher_gib:.1f}) but {HOST_HEADROOM:.0%} of its {hp.ram_gib:.1f} GiB RAM "
            f"({hp.ram_source}) is {hp.usable_gib:.1f} GiB: {_host_hint(cfg, hp)}")


def check_host_memory(cfg: RunConfig, arch: ModelArch, ram_gib: float | None = None) -> None:
    """Refuse (ConfigError, one line) a CPU run whose node 0 cannot hold it; GPU runs pass."""
    if not is_cpu_run(cfg):
        return
    why = host_refusal(cfg, plan_host(cfg, arch, ram_gib))
    if why:
        raise ConfigError(why)


def format_host_plan(hp: HostMemoryPlan) -> str:
    lines = [f"host memory estimate of node 0 (GiB; CPU run: everything resident at once; microbatch "
             f"{hp.microbatch_tokens} tokens, {hp.microbatches} per minibatch):",
             "  rank stage   base driver weights grads  optim  activ  slack logits   total"]
    for x in hp.ranks:
        lines.append(f"  {x.rank:>4} {x.stage:>5} {x.base_gib:>6.2f} {x.driver_gib:>6.2f} {x.weights_gib:>7.2f} "
                     f"{x.grads_gib:>5.2f} {x.optimizer_gib:>6.2f} {x.activations_gib:>6.2f} {x.slack_gib:>6.2f} "
                     f"{x.logits_gib:>6.2f} "
                     f"{x.total_gib:>7.2f}")
    lines += [
        f"  ranks {hp.ranks_gib:.2f} + SGLang {hp.engines} x {hp.engine_gib:.2f} (KV cache {hp.engine_kv_gib:.2f}) "
        f"+ workers {hp.workers_gib:.2f} ({hp.env_workers} env, {hp.reward_workers} reward, a helper per rank) "
        f"+ launcher {hp.launcher_gib:.2f} = node {hp.node_gib:.2f}",
        f"  node {hp.node_gib:.2f} of {hp.ram_gib:.1f} RAM ({hp.ram_source}; {HOST_HEADROOM:.0%} usable = "
        f"{hp.usable_gib:.1f}): {'fits' if hp.fits else 'DOES NOT FIT'}",
    ]
    lines += [f"  note: {n}" for n in hp.notes]
    return "\n".join(lines)
