"""The run configuration: typed sections, loaded from YAML, validated once before any worker starts.

    cfg = load_run_config("examples/recipes/tiny-cpu.yaml", ["train.steps=5"])

Each section checks its own ranges in ``__post_init__``; :func:`validate_run` checks what needs
several sections or the model's own config (layout vs heads/layers, batch divisibility, paths).

A component's own config is nested as it is, not mirrored: ``train.optimizer`` is the Actor's
:class:`OptimizerSettings`, ``algorithm.p_schedule`` a :class:`PSchedule`, ``algorithm.options`` the
registered loss's options dataclass, ``algorithm.regularizers`` the Actor's :class:`Regularizers`,
``logging`` the :class:`ObservabilityConfig`, ``agent.play`` the :class:`AgentConfig`. Two
functions derive what needs several sections: :meth:`RunConfig.actor_settings` and
:func:`engine_config` (the one place the SGLang engine config is built, for training and eval).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from holderpo_megatron.algorithms import LossOptions, PSchedule, make_loss_options, policy_loss_names, policy_loss_options
from holderpo_megatron.observability import ObservabilityConfig
from holderpo_megatron.rollout.agent import AgentConfig
from holderpo_megatron.data.datasets import RowFields
from holderpo_megatron.data.templates import PROMPT_TEMPLATES
from holderpo_megatron.models import RECOMPUTE_MODES
from holderpo_megatron.rewards.extract import ANSWER_TEMPLATES
from holderpo_megatron.rewards.registry import resolve_reward

from .actor import ActorSettings, OptimizerSettings, Regularizers
from .config_loader import ConfigError, apply_overrides, from_dict, load_yaml_with_defaults

__all__ = [
    "RunConfig", "ModelSection", "ParallelSection", "RolloutSection", "AlgorithmSection", "TrainSection",
    "DataSection", "EvalSection", "CheckpointSection", "AgentSection", "load_run_config", "validate_run",
    "run_placement", "engine_config", "ConfigError",
]


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class ModelSection:
    # HF directory (config.json, tokenizer, safetensors), a Hugging Face Hub id ("Qwen/Qwen2.5-7B-Instruct",
    # through its cache: HF_HOME, HF_HUB_OFFLINE), or "builtin:smollm2-135m-instruct"
    hf_path: str = ""
    revision: str | None = None  # a Hub id's branch, tag or commit hash (None: its default branch)
    name: str = ""  # public model id, used by `holderpo plan` when hf_path is not on this machine
    megatron_load: str | None = None  # a converted torch_dist checkpoint; None: convert hf_path once (cached)
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU

    def __post_init__(self):
        _need(bool(self.hf_path or self.name), "model.hf_path (or model.name for planning) must be set")
        _need(self.revision is None or (isinstance(self.revision, str) and self.revision.strip() != ""),
              f"model.revision must be a branch, tag or commit hash (or null), got {self.revision!r}")
        _need(self.revision is None or not self.hf_path.startswith("builtin:"),
              f"model.revision {self.revision!r} applies to a Hugging Face Hub id, not to {self.hf_path!r}")


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None
    nnodes: int = 1
    nproc_per_node: int = 1
    gpu_memory_gb: float = 80.0  # per GPU, for `holderpo plan`
    # RAM of one node, for the host-memory plan of CPU runs (trainer/plan.py); None: this machine's
    host_memory_gb: float | None = None
    # a collective that a dead rank never answers fails after this (every node then ends, naming it)
    collective_timeout_s: int = 1800
    sequence_parallel: bool = False

    def __post_init__(self):
        for k in ("tp", "pp", "cp", "nnodes", "nproc_per_node"):
            _need(getattr(self, k) >= 1, f"parallel.{k} must be >= 1, got {getattr(self, k)}")
        _need(self.vpp is None or (self.vpp >= 2 and self.pp >= 2),
              f"parallel.vpp must be null or >= 2 with pp >= 2, got vpp={self.vpp}, pp={self.pp}")
        _need(self.world_size % (self.tp * self.pp * self.cp) == 0,
              f"parallel: world size nnodes*nproc_per_node = {self.world_size} is not divisible by "
              f"tp*pp*cp = {self.tp}*{self.pp}*{self.cp} = {self.tp * self.pp * self.cp}")
        _need(self.gpu_memory_gb > 0, f"parallel.gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")
        _need(self.host_memory_gb is None or self.host_memory_gb > 0,
              f"parallel.host_memory_gb must be null (this machine's RAM) or > 0, got {self.host_memory_gb}")
        _need(self.collective_timeout_s >= 10, f"parallel.collective_timeout_s must be >= 10, got {self.collective_timeout_s}")
        _need(not self.sequence_parallel or self.tp > 1,
              "parallel.sequence_parallel needs tp > 1 (it splits activations over the TP group); got tp=1")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)


@dataclass
class RolloutSection:
    # sglang; or transformers: the HF model on rank 0 in place of SGLang, sampled by our decode loop
    # (rollout/transformers_backend.py; for parity checks, bench/learning_vs_trl.py, and small CPU runs: on CPU
    # faster than SGLang for a 135M model; mode embedded, engine_tp 1, weight_sync not distributed)
    backend: Literal["sglang", "transformers"] = "sglang"
    mode: Literal["embedded", "servers"] = "embedded"  # embedded: one in-process sglang.Engine on rank 0
    server_urls: list[str] = field(default_factory=list)  # mode=servers: given URLs; empty = we launch them
    engine_tp: int = 1
    # Where engines run (parallel/placement.py; `holderpo plan` prints it). colocated: on the trainer's
    # GPUs, nproc_per_node / engine_tp per node. separate: on GPUs the trainer does not use, given as
    # engine_gpus_per_node (extra GPUs on each trainer node, or on each of engine_nodes dedicated nodes)
    # or as server_urls (placement separate, mode servers) that someone else runs.
    placement: Literal["colocated", "separate"] = "colocated"
    # null: one engine with mode=embedded (in-process, rank 0), every slot with mode=servers (a fleet);
    # fewer than every slot leaves GPUs without an engine
    engines_per_node: int | None = None
    engine_gpus_per_node: int = 0
    engine_nodes: int = 0
    # colocated on GPU: engines release weights and KV while Megatron trains (SGLang's memory saver), so
    # `holderpo plan` counts max(training, rollout) per GPU; off (or on CPU, where engines cannot release):
    # the sum
    release_memory_during_train: bool = True
    mem_fraction_static: float | None = None  # None: the engine's per-device default
    # a fixed KV-cache size per engine in tokens (SGLang's max_total_tokens), instead of the share of free
    # memory; on CPU the share counts RAM taken by other processes while the engine loads (two runs side
    # by side, `holderpo sweep --parallel 2`), a cap does not. null: the share alone
    kv_cache_tokens: int | None = None
    group_size: int = 8  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 1024
    stop: list[str] = field(default_factory=list)
    # generate exactly max_new_tokens per sample (an end-of-sequence token does not stop it): fixed-cost
    # steps for throughput benchmarks (bench/e2e_vs_trl.py --fixed-length); every sample is truncated
    ignore_eos: bool = False
    # threads of a CPU engine's scheduler process (the trainer ranks wait while it generates); null: a
    # rank's own cores / nproc_per_node. Ignored on GPU. Not measured quiet yet (README, CPU and GPU).
    engine_cpu_threads: int | None = None
    # old log-probs from the engine: no scoring pass at all; guarded by drift_max (required with it)
    use_rollout_logprobs: bool = False
    # generate step t+1 while step t trains (trainer/overlap.py): one step off-policy, needs engines on
    # hardware of their own (placement separate, mode servers); old log-probs then come from the engine
    overlap: bool = False
    weight_sync: Literal["auto", "tensor", "distributed", "disk"] = "auto"
    bucket_mb: int = 512
    # after each sync, read every tensor back from every engine and compare it with Megatron's (slow:
    # for checking a new model mapping, transport or cluster layout)
    verify_sync: bool = False
    drift_warn: float = 0.1  # warn when max |logp_train - logp_rollout| exceeds this (nats)
    # refuse (drift_action: error) or warn about a step whose mean |logp_train - logp_rollout| (nats,
    # the logprob_drift_mean metric) exceeds this, before its first optimizer update; null: no guard
    drift_max: float | None = None
    drift_action: Literal["warn", "error"] = "error"
    timeout_s: float = 600.0
    # SGLang's deterministic inference: per-request sampling seeds, batch-invariant kernels, so a
    # resumed run samples exactly what an uninterrupted one would. Needs a GPU attention backend
    # (triton, fa3, flashinfer); SGLang on CPU refuses it.
    deterministic: bool = False
    # Bearer key for user-given servers (server_urls); unset: $HOLDERPO_SGLANG_API_KEY, else none.
    # Servers we launch always get a fresh random key of their own.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self):
        _need(self.group_size >= 2, f"rollout.group_size must be >= 2 (group advantages), got {self.group_size}")
        _need(self.temperature > 0, f"rollout.temperature must be > 0 for RL sampling, got {self.temperature}")
        _need(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _need(self.top_k == -1 or self.top_k >= 1, f"rollout.top_k must be -1 or >= 1, got {self.top_k}")
        _need(self.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _need(self.max_prompt_tokens >= 1, f"rollout.max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        _need(self.mem_fraction_static is None or 0 < self.mem_fraction_static < 1,
              f"rollout.mem_fraction_static must be null or in (0, 1), got {self.mem_fraction_static}")
        _need(self.engine_tp >= 1, f"rollout.engine_tp must be >= 1, got {self.engine_tp}")
        _need(self.kv_cache_tokens is None or (isinstance(self.kv_cache_tokens, int) and self.kv_cache_tokens >= 1),
              f"rollout.kv_cache_tokens must be null or an int >= 1, got {self.kv_cache_tokens!r}")
        _need(self.engine_cpu_threads is None or self.engine_cpu_threads >= 1,
              f"rollout.engine_cpu_threads must be null or >= 1, got {self.engine_cpu_threads}")
        _need(self.bucket_mb >= 1, f"rollout.bucket_mb must be >= 1, got {self.bucket_mb}")
        _need(self.timeout_s > 0, f"rollout.timeout_s must be > 0, got {self.timeout_s}")
        _need(self.drift_warn > 0, f"rollout.drift_warn must be > 0, got {self.drift_warn}")
        _need(self.drift_max is None or (self.drift_max > 0 and math.isfinite(self.drift_max)),
              f"rollout.drift_max must be null or a finite number of nats > 0, got {self.drift_max}")
        _need(self.drift_action in ("warn", "error"),
              f"rollout.drift_action must be warn or error, got {self.drift_action!r}")
        _need(not self.use_rollout_logprobs or self.drift_max is not None,
              "rollout.use_rollout_logprobs=true trains on the engine's log-probs unchecked: set rollout.drift_max "
              "(nats, mean |logp_train - logp_rollout|, e.g. 0.05) to guard it")
        _need(self.backend == "sglang" or (self.mode == "embedded" and self.engine_tp == 1
                                           and self.weight_sync != "distributed"),
              f"rollout.backend={self.backend} runs in rank 0's process: it needs rollout.mode=embedded, "
              f"rollout.engine_tp=1 and rollout.weight_sync tensor, disk or auto, got mode={self.mode}, "
              f"engine_tp={self.engine_tp}, weight_sync={self.weight_sync}")
        _need(self.mode == "servers" or not self.server_urls,
              "rollout.server_urls is only used with rollout.mode=servers")
        _need(self.engines_per_node is None or self.engines_per_node >= 1,
              f"rollout.engines_per_node must be null or >= 1, got {self.engines_per_node}")
        _need(self.engine_gpus_per_node >= 0 and self.engine_nodes >= 0,
              f"rollout.engine_gpus_per_node and rollout.engine_nodes must be >= 0, got {self.engine_gpus_per_node}, "
              f"{self.engine_nodes}")
        _need(not self.engine_nodes or self.mode == "servers",
              f"rollout.engine_nodes={self.engine_nodes}: no trainer process runs on an engine node, so its engines "
              f"are servers: set rollout.mode=servers, got mode={self.mode}")
        for i, u in enumerate(self.server_urls):
            _need(_is_server_url(u), f"rollout.server_urls[{i}] {u!r} is not a server URL; "
                                     "expected http(s)://host[:port] (e.g. http://10.0.0.5:30000)")
        _need(self.api_key is None or (self.api_key.strip() != "" and self.api_key == self.api_key.strip()),
              "rollout.api_key must be null or a non-empty key without surrounding spaces")
        _need(not self.overlap or self.placement == "separate",
              f"rollout.overlap=true needs rollout.placement=separate (engines on hardware the trainer does not "
              f"use, so generation runs beside training); got placement={self.placement}")
        _need(not self.overlap or self.mode == "servers",
              f"rollout.overlap=true needs rollout.mode=servers (the next batch is requested from a background "
              f"thread over HTTP); got mode={self.mode}")

    @property
    def old_logprobs_from_engine(self) -> bool:
        """The loss's old log-probs are the engine's: asked for, or forced by overlap (the samples come
        from the previous weights, which the trainer no longer holds)."""
        return self.use_rollout_logprobs or self.overlap



@dataclass
class AlgorithmSection:
    """``loss``: a registered policy loss; ``options``: that loss's options (its options dataclass,
    e.g. ``HolderOptions``: variant, clip_low, clip_high, dual_clip); ``p`` comes from ``p_schedule``."""

    loss: str = "holder"
    options: dict[str, Any] = field(default_factory=dict)
    p_schedule: PSchedule = field(default_factory=PSchedule)
    regularizers: Regularizers = field(default_factory=Regularizers)
    advantage: Literal["grpo", "dr_grpo"] = "grpo"
    dynamic_sampling: bool = False
    truncated_reward: float = 0.0
    loss_options: LossOptions = field(init=False, repr=False)  # ``options``, built and validated

    def __post_init__(self):
        _need(self.loss in policy_loss_names(), f"algorithm.loss {self.loss!r} is not one of {policy_loss_names()}")
        scheduled = [k for k in policy_loss_options(self.loss).scheduled if k in self.options]
        _need(not scheduled, f"algorithm.options.{', '.join(scheduled)} is set per step by algorithm.p_schedule; "
                             f"remove it from algorithm.options")
        try:
            self.loss_options = make_loss_options(self.loss, **self.options)
        except ValueError as e:
            raise ConfigError(f"algorithm.options: {e}") from e


@dataclass
class TrainSection:
    steps: int = 100
    prompts_per_step: int = 32
    minibatches_per_step: int = 1  # optimizer steps per rollout batch
    # minibatch 1's old log-probs are its own training forward's, detached (before update 1 the policy is
    # the rollout's): only minibatches 2..k are scored, none when minibatches_per_step = 1. false: score all
    reuse_training_logprobs: bool = True
    token_budget: int = 8192  # tokens per microbatch
    pack: bool = True
    # a prompt's samples train together (one DP rank, one minibatch, as verl's minibatches of whole
    # groups; single samples when a step has fewer groups than dp * minibatches_per_step) and each
    # packed row holds a group's prompt once (data.batching): the training and scoring forwards skip
    # group_size - 1 copies of every prompt. Exact; needs pack, cp = 1, single-turn prompts and the
    # local attention (not Transformer Engine's)
    share_prompts: bool = False
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    seed: int = 1234
    # Megatron's optimizer state and grad buffers leave the GPU while the engines generate (colocated),
    # and come back for training
    offload_during_rollout: bool = False
    # activation recompute (models.config.RECOMPUTE_MODES): "full" keeps each layer's input only and
    # reruns its forward in backward: far less activation memory for ~1/3 more step compute
    recompute: str = "none"

    def __post_init__(self):
        for k in ("steps", "prompts_per_step", "minibatches_per_step", "token_budget"):
            _need(getattr(self, k) >= 1, f"train.{k} must be >= 1, got {getattr(self, k)}")
        _need(self.recompute in RECOMPUTE_MODES,
              f"train.recompute={self.recompute!r} is not supported; supported: {', '.join(RECOMPUTE_MODES)}")


@dataclass
class DataSection:
    # a set under data_dir/math, a .jsonl or .parquet file, a `datasets` folder, or "arithmetic"
    train: str = "math_lvl3to5_8k"
    data_dir: str | None = None  # default: $HOLDERPO_DATA or <repo>/../shared/data
    prompt_key: str = "problem"  # the prompt's field: text, or chat messages (used as the prompt as is)
    answer_key: str | None = "answer"  # the gold answer's field; null: the rows have none (custom rewards)
    split: str = "train"  # the split of a saved DatasetDict or a folder of data files
    prompt_template: str = "qwen_math"
    # a registered reward (math, exact_int, ...) or your function: my_pkg.my_module:score or
    # path/to/file.py:score (rewards/custom.py: its signature; run in reward_workers processes)
    reward: str = "math"
    answer_template: str = "qwen_math"
    reward_timeout_s: float = 5.0  # per response (math-verify, or your function)
    reward_workers: int = 2
    row_fields: RowFields = field(init=False, repr=False)  # prompt_key, answer_key, split, validated
    # wall-clock seconds for scoring one step's responses; when spent, the answers not yet verified
    # score as timeouts (counted in reward_timeouts, logged). null: no budget.
    reward_batch_timeout_s: float | None = 300.0
    # training prompts longer than rollout.max_prompt_tokens (recipe's tokenizer and template) are
    # dropped when the set loads (count logged); more than this fraction of them is an error
    max_dropped_prompt_fraction: float = 0.01
    shuffle: bool = True
    arithmetic_max_operand: int = 99  # train: arithmetic only: operands in 1..this
    arithmetic_direct: bool = False  # train: arithmetic only: "What is a plus b?" phrasings only

    def __post_init__(self):
        _need(self.reward_timeout_s > 0, f"data.reward_timeout_s must be > 0, got {self.reward_timeout_s}")
        _need(self.reward_batch_timeout_s is None or self.reward_batch_timeout_s > 0,
              f"data.reward_batch_timeout_s must be null or > 0, got {self.reward_batch_timeout_s}")
        _need(0 <= self.max_dropped_prompt_fraction < 1,
              f"data.max_dropped_prompt_fraction must be in [0, 1), got {self.max_dropped_prompt_fraction}")
        _need(self.prompt_template in PROMPT_TEMPLATES,
              f"data.prompt_template {self.prompt_template!r} is not one of {sorted(PROMPT_TEMPLATES)}")
        _need(self.answer_template in ANSWER_TEMPLATES,
              f"data.answer_template {self.answer_template!r} is not one of {sorted(ANSWER_TEMPLATES)}")
        _need(self.arithmetic_max_operand >= 1, f"data.arithmetic_max_operand must be >= 1, got {self.arithmetic_max_operand}")
        _need(self.reward_workers >= 1, f"data.reward_workers must be >= 1, got {self.reward_workers}")
        try:
            self.row_fields = RowFields(prompt=self.prompt_key, answer=self.answer_key, split=self.split)
        except ValueError as e:
            raise ConfigError(f"data.prompt_key/answer_key/split: {e}") from None
        try:
            spec = resolve_reward(self.reward)  # imports a custom reward now: a bad path fails before launch
        except ValueError as e:
            raise ConfigError(f"data.reward: {e}") from None
        _need(self.answer_key is not None or not spec.needs_answers,
              f"data.answer_key is null (rows without answers), but data.reward {self.reward!r} grades against "
              f"answers; name the answer field, or use a reward of your own")

    def resolved_data_dir(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir)
        env = os.environ.get("HOLDERPO_DATA")
        if env:
            return Path(env)
        return Path(__file__).resolve().parents[2].parent / "shared" / "data"


ENV_KINDS = ("none", "alfworld")
ALFWORLD_SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")


@dataclass
class AgentSection:
    """Multi-turn agent training (``env: alfworld``); ``none`` trains on single-turn prompts (data:).

    In an agent run a training step plays ``train.prompts_per_step`` games, each ``rollout.group_size``
    times; ``rollout.max_prompt_tokens`` / ``max_new_tokens`` bound one turn's prompt / response.
    ``play`` is how the agent plays (turns, history, rewards: :class:`AgentConfig`).
    """

    env: str = "none"
    train_split: str = "train"
    games_limit: int | None = None  # train on the first N games of the split (tiny runs)
    eval_splits: list[str] = field(default_factory=lambda: ["valid_seen", "valid_unseen"])
    eval_limit: int | None = None  # first N games per eval split
    num_workers: int = 8  # environment worker processes
    step_timeout_s: float = 60.0
    episode_timeout_s: float = 1800.0
    save_transcripts: bool = True  # run_dir/transcripts/step_N.jsonl
    play: AgentConfig = field(default_factory=AgentConfig)

    def __post_init__(self):
        _need(self.env in ENV_KINDS, f"agent.env {self.env!r} is not one of {ENV_KINDS}")
        _need(self.train_split in ALFWORLD_SPLITS, f"agent.train_split {self.train_split!r} is not one of {ALFWORLD_SPLITS}")
        for s in self.eval_splits:
            _need(s in ALFWORLD_SPLITS, f"agent.eval_splits entry {s!r} is not one of {ALFWORLD_SPLITS}")
        for k in ("games_limit", "eval_limit"):
            v = getattr(self, k)
            _need(v is None or v >= 1, f"agent.{k} must be null or >= 1, got {v}")
        _need(self.num_workers >= 1, f"agent.num_workers must be >= 1, got {self.num_workers}")
        _need(self.step_timeout_s > 0 and self.episode_timeout_s > 0,
              f"agent.step_timeout_s and agent.episode_timeout_s must be > 0, got {self.step_timeout_s}, "
              f"{self.episode_timeout_s}")

    @property
    def enabled(self) -> bool:
        return self.env != "none"


@dataclass
class EvalSection:
    every: int = 0  # steps between evaluations; 0 = off
    benchmarks: list[str] = field(default_factory=list)  # greedy pass@1
    sampled_benchmarks: list[str] = field(default_factory=list)  # pass@k with sampling
    sampled_n: int = 8
    sampled_temperature: float = 0.7
    max_new_tokens: int = 4096
    limit: int | None = None  # first N items per benchmark
    at_start: bool = False  # also evaluate the initial policy (step 0) before training (not on resume)

    def __post_init__(self):
        _need(self.every >= 0, f"eval.every must be >= 0, got {self.every}")
        _need(self.sampled_n >= 1, f"eval.sampled_n must be >= 1, got {self.sampled_n}")
        _need(self.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _need(self.limit is None or self.limit >= 1, f"eval.limit must be null or >= 1, got {self.limit}")


@dataclass
class CheckpointSection:
    dir: str | None = None  # default: <run dir>/checkpoints
    every: int = 50  # 0 = only at the end
    keep_last: int = 2
    resume: bool = True
    export_hf_at_end: bool = True

    def __post_init__(self):
        _need(self.every >= 0, f"checkpoint.every must be >= 0, got {self.every}")
        _need(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    hardware: str = ""  # what the recipe needs, in words (documentation; `holderpo plan` checks memory)
    model: ModelSection = field(default_factory=lambda: ModelSection(hf_path="builtin:smollm2-135m-instruct"))
    parallel: ParallelSection = field(default_factory=ParallelSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    agent: AgentSection = field(default_factory=AgentSection)

    def __post_init__(self):
        samples = self.train.prompts_per_step * self.rollout.group_size
        per = self.parallel.dp * self.train.minibatches_per_step
        _need(samples % per == 0,
              f"train.prompts_per_step*rollout.group_size = {samples} samples per step must be divisible by "
              f"data-parallel size * train.minibatches_per_step = {self.parallel.dp}*{self.train.minibatches_per_step}")
        t = self.train
        if t.share_prompts:
            _need(t.pack, "train.share_prompts=true needs train.pack=true (a group's prompt is shared within a packed row)")
            _need(self.parallel.cp == 1, f"train.share_prompts=true does not combine with parallel.cp={self.parallel.cp}; "
                  "allowed: cp 1")
            _need(not self.agent.enabled, f"train.share_prompts=true is for single-turn prompts; agent.env="
                  f"{self.agent.env} trains trajectories (set train.share_prompts=false)")
        longest = self.max_sequence_length
        _need(longest <= self.train.token_budget,
              f"train.token_budget={self.train.token_budget} must hold one full sequence "
              f"(rollout.max_prompt_tokens + rollout.max_new_tokens = {longest})")
        _need(not (self.rollout.overlap and self.agent.enabled),
              f"rollout.overlap=true generates single-turn prompt batches; agent.env={self.agent.env} is not "
              f"supported with it (set rollout.overlap=false or agent.env=none)")
        e = self.eval
        _need(self.agent.enabled or not (e.every or e.at_start) or bool(e.benchmarks or e.sampled_benchmarks),
              f"eval.every={e.every}, eval.at_start={e.at_start} but eval.benchmarks and eval.sampled_benchmarks "
              "are empty: list the benchmarks to run (e.g. [math500]) or set eval.every: 0")

    def public_dict(self) -> dict:
        """The configuration as a JSON-able dict for run records (config.json, wandb): secrets redacted."""
        from dataclasses import asdict

        d = asdict(self)
        if d["rollout"].get("api_key") is not None:
            d["rollout"]["api_key"] = "<redacted>"
        return d

    @property
    def evaluates(self) -> bool:
        """Whether training runs evaluations (every N steps or at the start)."""
        return bool(self.eval.every or self.eval.at_start)

    @property
    def engine_context_length(self) -> int:
        """Tokens the rollout engine must hold for its longest request: a prompt of up to
        rollout.max_prompt_tokens and the longer of the training and evaluation responses."""
        new = self.rollout.max_new_tokens
        if self.evaluates and not self.agent.enabled:
            new = max(new, self.eval.max_new_tokens)
        return self.rollout.max_prompt_tokens + new

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def max_sequence_length(self) -> int:
        """Prompt + response: the longest sequence the engine serves and the Actor scores."""
        return self.rollout.max_prompt_tokens + self.rollout.max_new_tokens

    def actor_settings(self) -> ActorSettings:
        """The Actor's run constants; its scoring temperature is the rollout's sampling temperature."""
        return ActorSettings(token_budget=self.train.token_budget, pack=self.train.pack, loss=self.algorithm.loss,
                             loss_options=self.algorithm.loss_options, regularizers=self.algorithm.regularizers,
                             temperature=self.rollout.temperature, generation_budget=self.rollout.max_new_tokens,
                             recompute=self.train.recompute, share_prompts=self.train.share_prompts)


def engine_config(cfg: RunConfig, model_path: str | os.PathLike):
    """The SGLang engine config of a run: the one builder, for training and for ``holderpo eval``."""
    from holderpo_megatron.rollout.config import SGLangEngineConfig

    r = cfg.rollout
    return SGLangEngineConfig(
        model_path=str(model_path), mode=r.mode, backend=r.backend, tp_size=r.engine_tp, mem_fraction_static=r.mem_fraction_static,
        server_urls=tuple(r.server_urls), request_timeout_s=r.timeout_s, random_seed=cfg.train.seed,
        cpu_threads=r.engine_cpu_threads,
        context_length=cfg.engine_context_length, log_dir=str(cfg.run_dir / "sglang_logs"),
        # a key for servers someone else runs; servers we launch get the run's own random key (trainer/fleet.py)
        api_key=(r.api_key or os.environ.get("HOLDERPO_SGLANG_API_KEY")) if r.server_urls else None,
        # colocated engines hand their GPU memory to training (trainer/fleet.py MemoryHandover)
        enable_memory_saver=r.placement == "colocated" and r.release_memory_during_train,
        server_args=({"enable_deterministic_inference": True} if r.deterministic else {})
        | ({"max_total_tokens": r.kv_cache_tokens} if r.kv_cache_tokens else {}))


def _is_server_url(url) -> bool:
    from urllib.parse import urlparse

    if not isinstance(url, str):
        return False
    try:
        p = urlparse(url)
        port = p.port
    except ValueError:  # a port that is not a number or out of range
        return False
    return p.scheme in ("http", "https") and bool(p.hostname) and p.path in ("", "/") and not p.query \
        and not p.fragment and (port is None or port > 0)


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    data = apply_overrides(load_yaml_with_defaults(path), list(overrides or []))
    return from_dict(RunConfig, data)


def run_placement(cfg: RunConfig):
    """The run's engines (parallel.placement.Placement); a ConfigError when the layout cannot hold them."""
    from holderpo_megatron.parallel.placement import plan_placement

    p, r = cfg.parallel, cfg.rollout
    try:
        return plan_placement(nnodes=p.nnodes, gpus_per_node=p.nproc_per_node, tp=p.tp, pp=p.pp, cp=p.cp,
                              engine_tp=r.engine_tp, placement=r.placement,
                              engines_per_node=r.engines_per_node or (1 if r.mode == "embedded" else None),
                              engine_gpus_per_node=r.engine_gpus_per_node, engine_nodes=r.engine_nodes,
                              server_urls=r.server_urls)
    except ValueError as e:
        raise ConfigError(f"rollout placement: {e}") from e


def validate_run(cfg: RunConfig, arch=None, check_paths: bool = True) -> None:
    """Checks that need the model's config or the file system (run before any worker starts)."""
    from holderpo_megatron.models import check_layout

    p = cfg.parallel
    if arch is not None:
        try:
            check_layout(arch, p.tp, p.pp, p.cp, world_size=p.world_size,
                         seq_length=cfg.max_sequence_length)
        except ValueError as e:
            raise ConfigError(f"parallel/model: {e}") from e
        if p.vpp and (arch.num_layers // p.pp) % p.vpp:
            raise ConfigError(f"parallel.vpp={p.vpp}: {arch.num_layers // p.pp} layers per stage do not split into "
                              f"{p.vpp} chunks")
        ctx = cfg.engine_context_length
        if ctx > arch.max_position_embeddings:
            r = cfg.rollout
            raise ConfigError(
                f"eval.max_new_tokens={cfg.eval.max_new_tokens}: an evaluation request of rollout.max_prompt_tokens="
                f"{r.max_prompt_tokens} + {cfg.eval.max_new_tokens} new tokens = {ctx} exceeds the model's "
                f"max_position_embeddings={arch.max_position_embeddings}; lower eval.max_new_tokens to "
                f"{arch.max_position_embeddings - r.max_prompt_tokens}")
    placement = run_placement(cfg)
    if cfg.rollout.mode == "embedded" and len(placement.engines) != 1:
        raise ConfigError(f"rollout.mode=embedded runs one in-process engine, but the placement has "
                          f"{len(placement.engines)} engines: set rollout.mode=servers (one SGLang server per "
                          f"engine) or leave rollout.engines_per_node unset (one engine)")
    if check_paths:
        from holderpo_megatron.models.hub import is_hub_id

        hf = cfg.model.hf_path
        if hf and not hf.startswith("builtin:") and not Path(hf).is_dir() and not is_hub_id(hf):
            raise ConfigError(f"model.hf_path {hf!r} is neither a directory nor a Hugging Face Hub id (org/name)")
        if cfg.model.revision is not None and not is_hub_id(hf):
            raise ConfigError(f"model.revision {cfg.model.revision!r} applies to a Hugging Face Hub id; "
                              f"model.hf_path {hf!r} is a local directory")
        if cfg.model.megatron_load and not Path(cfg.model.megatron_load).is_dir():
            raise ConfigError(f"model.megatron_load {cfg.model.megatron_load!r} is not a directory")
        if cfg.model.megatron_load:  # complete, and its metadata safe to read (allow-listed unpickling)
            from holderpo_megatron.checkpoint.dist_ckpt import read_marker
            from holderpo_megatron.checkpoint.safe_metadata import read_dcp_metadata

            try:
                read_marker(cfg.model.megatron_load)
                read_dcp_metadata(cfg.model.megatron_load)
            except ValueError as e:
                raise ConfigError(f"model.megatron_load: {' '.join(str(e).split())}") from None
        if cfg.agent.enabled:
            pass  # the game files are unpacked (and their absence reported) by envs.alfworld on rank 0
        else:
            _check_data_sets(cfg)


def _check_data_sets(cfg: RunConfig) -> None:
    """The training set resolves without ambiguity and has items; every benchmark exists."""
    from holderpo_megatron.data.datasets import load_math_dataset, math_data_dir, resolve_math_path

    d = cfg.data
    if d.train != "arithmetic":
        try:
            ds = load_math_dataset(d.train, root=d.resolved_data_dir(), fields=d.row_fields)
        except FileNotFoundError as e:
            raise ConfigError(f"data.train {d.train!r} is neither a .jsonl or .parquet file, a datasets folder, nor "
                              f"a set under {math_data_dir(d.resolved_data_dir())} ({e})") from None
        except ValueError as e:
            raise ConfigError(f"data.train {d.train!r}: {e}") from None
        if not ds.items:
            raise ConfigError(f"data.train {d.train!r} ({ds.path}) has no usable items: {ds.describe_empty()}")
    root = math_data_dir(d.resolved_data_dir())
    for key in ("benchmarks", "sampled_benchmarks"):
        for name in getattr(cfg.eval, key):
            try:
                resolve_math_path(root / name)
            except (FileNotFoundError, ValueError):
                have = sorted(p.name for p in root.iterdir() if (p / "data.jsonl").is_file()) if root.is_dir() else []
                raise ConfigError(f"eval.{key} entry {name!r} is not a set under {root} "
                                  f"(there: {', '.join(have) or 'nothing'})") from None
