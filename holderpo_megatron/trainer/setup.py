"""Everything a training run holds, built once: distributed groups, the Actor (and reference),
the rollout engine and weight synchroniser (rank 0), data, reward, logger, checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from holderpo_megatron.checkpoint import SafetensorsReader, load_hf_weights_into_model, load_megatron_checkpoint
from holderpo_megatron.checkpoint.train_state import load_latest_train_state, save_train_state
from holderpo_megatron.data.datasets import BatchIterator, generate_arithmetic_problems, load_math_dataset
from holderpo_megatron.data.templates import get_prompt_template
from holderpo_megatron.models import ModelArch
from holderpo_megatron.models.builtin import resolve_model_path
from holderpo_megatron.observability import MetricsLogger
from holderpo_megatron.parallel.layout import ParallelLayout, init_distributed, initialize_model_parallel
from holderpo_megatron.rewards.math import RewardConfig, build_reward

from .actor import MegatronActor
from .config import RunConfig, engine_config, validate_run
from .faults import KILL_DURING_SAVE, kill_if_asked

__all__ = ["TrainContext", "setup_training"]

log = logging.getLogger("holderpo")


class TrainContext:
    """What one worker holds during a run. Rank 0 also holds the engine, tokenizer and reward."""

    def __init__(self, cfg: RunConfig):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.rank = dist.get_rank()
        self.hf_dir = resolve_model_path(cfg.model.hf_path)
        self.arch = ModelArch.from_pretrained_dir(self.hf_dir)
        validate_run(cfg, self.arch)
        p = cfg.parallel
        self.layout = ParallelLayout(tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp, sequence_parallel=p.sequence_parallel)
        initialize_model_parallel(self.layout, seed=cfg.train.seed)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.dp_group = ps.get_data_parallel_group()
        cuda = torch.cuda.is_available()
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.model.dtype, torch.bfloat16 if cuda else torch.float32)
        settings = cfg.actor_settings()
        self.actor = MegatronActor(self.arch, self.layout, settings, params_dtype=dtype,
                                   max_seq_length=cfg.max_sequence_length, optimizer=cfg.train.optimizer)
        self._load_initial_weights(self.actor)
        self.ref = None
        if settings.regularizers.kl_coef > 0:
            self.ref = MegatronActor(self.arch, self.layout, settings, params_dtype=dtype,
                                     max_seq_length=cfg.max_sequence_length)
            self._load_initial_weights(self.ref)
        self.schedule = cfg.algorithm.p_schedule
        self.data = BatchIterator(self._train_items(), cfg.train.prompts_per_step, seed=cfg.train.seed,
                                  shuffle=cfg.data.shuffle)
        self.template = get_prompt_template(cfg.data.prompt_template)
        self.engine = self.tokenizer = self.reward = self.synchronizer = self.env_pool = None
        self.weight_version = 0
        self.last_examples: list[str] = []
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else cfg.run_dir / "checkpoints"
        self.start_step = 0
        self._maybe_resume()
        self.logger = MetricsLogger(
            cfg.run_dir, cfg.logging,
            # resuming (even before a first checkpoint) drops records after the restart step
            resume_step=self.start_step if cfg.checkpoint.resume else None, total_steps=cfg.train.steps,
            run_config=asdict(cfg))
        self._start_rollout_side()
        if self.start_step > 0:
            self.sync_weights(version=self.start_step)

    # ------------------------------------------------------------------ pieces
    def _load_initial_weights(self, actor: MegatronActor) -> None:
        if self.cfg.model.megatron_load:
            load_megatron_checkpoint(actor.unwrapped(), self.cfg.model.megatron_load, self.arch)
        else:
            load_hf_weights_into_model(actor.unwrapped(), self.arch, SafetensorsReader(self.hf_dir))

    def _train_items(self):
        d = self.cfg.data
        if self.cfg.agent.enabled:  # games (EpisodeSpec) instead of prompts
            from .agent_loop import agent_games

            return agent_games(self.cfg, self.cfg.agent.train_split, self.cfg.agent.games_limit)
        if d.train == "arithmetic":
            return generate_arithmetic_problems(50_000, seed=self.cfg.train.seed, max_operand=d.arithmetic_max_operand,
                                               direct=d.arithmetic_direct).items
        return load_math_dataset(d.train, root=d.resolved_data_dir()).items

    def _start_rollout_side(self) -> None:
        """Rank 0: tokenizer, reward and engine; every rank: its part of the weight synchroniser."""
        from holderpo_megatron.weight_sync import MegatronWeightSource, make_weight_synchronizer

        engine_cfg = engine_config(self.cfg, self.hf_dir)  # validated on every rank; the engine starts on rank 0
        if self.rank == 0:
            from transformers import AutoTokenizer

            from holderpo_megatron.rollout.sglang_engine import SGLangEngine

            self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
            self.reward = build_reward(RewardConfig(
                kind=self.cfg.data.reward, template=self.cfg.data.answer_template,
                timeout_s=self.cfg.data.reward_timeout_s, truncated_reward=self.cfg.algorithm.truncated_reward))
            with _without_torchrun_env():
                self.engine = SGLangEngine(engine_cfg)
                if self.cfg.agent.enabled:
                    from .agent_loop import build_env_pool

                    self.env_pool = build_env_pool(self.cfg)
        self.synchronizer = make_weight_synchronizer(
            MegatronWeightSource(self.actor.unwrapped(), self.arch), self.engine, dtype=engine_cfg.torch_dtype,
            transport=self.cfg.rollout.weight_sync, bucket_bytes=self.cfg.rollout.bucket_mb << 20)

    def prompt_ids(self, problem: str) -> list[int]:
        if self.template.chat:
            return self.tokenizer.apply_chat_template(self.template.messages(problem), add_generation_prompt=True,
                                                      tokenize=True, return_dict=False)
        return self.tokenizer(self.template.render(problem))["input_ids"]

    # ------------------------------------------------------------------ weights, eval, checkpoints
    def sync_weights(self, version: int) -> dict[str, float]:
        """Weights into the engine as ``version``; returns the sync's metrics (seconds, GB/s, bytes)."""
        report = self.synchronizer.sync(version)
        self.weight_version = version
        return report.to_dict()

    def evaluate(self, step: int) -> None:
        if self.rank == 0:
            from .evaluate import agent_eval_with_engine, evaluate_with_engine

            out = self.cfg.run_dir / "eval" / f"step_{step:06d}"
            if self.cfg.agent.enabled:
                summary = agent_eval_with_engine(self.cfg, self.engine, self.tokenizer, self.env_pool, out)
            else:
                summary = evaluate_with_engine(self.cfg, self.engine, self.tokenizer, out)
            self.logger.log_extra(step, {f"eval/{k}": v for k, v in summary.items()})
        dist.barrier()

    def save(self, step: int) -> None:
        with self.logger.timer("checkpoint"):
            self._save(step)

    def _save(self, step: int) -> None:
        save_train_state(self.ckpt_root, step, model=self.actor.model, optimizer=self.actor.optimizer,
                         extra={"data": self.data.state_dict(), "schedule": self.schedule.to_dict()},
                         keep_last=self.cfg.checkpoint.keep_last,
                         before_commit=lambda _tmp: kill_if_asked(KILL_DURING_SAVE, step))

    def _maybe_resume(self) -> None:
        """Model, optimizer, RNG states and the data position from the last committed state; the p
        schedule and the minibatch order are functions of the step, so they follow."""
        if not self.cfg.checkpoint.resume:
            return
        info = load_latest_train_state(self.ckpt_root, model=self.actor.model, optimizer=self.actor.optimizer)
        if info is None:
            return
        self.start_step = info.step
        self.data.load_state_dict(info.extra["data"])
        if self.rank == 0:
            log.warning("resumed from %s at step %d", self.ckpt_root, info.step)

    def finish(self) -> None:
        if self.cfg.checkpoint.export_hf_at_end:
            from holderpo_megatron.checkpoint import export_hf_checkpoint

            export_hf_checkpoint(self.actor.unwrapped(), self.arch, self.hf_dir, self.cfg.run_dir / "hf")

    def close(self) -> None:
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        if self.synchronizer is not None:
            self.synchronizer.close()
        if self.env_pool is not None:
            self.env_pool.close()
        if self.engine is not None:
            self.engine.shutdown()
        if self.reward is not None:
            self.reward.close()


@contextlib.contextmanager
def _without_torchrun_env():
    """SGLang's scheduler processes inherit our environment; torchrun's variables (RANK, WORLD_SIZE,
    TORCHELASTIC_USE_AGENT_STORE, ...) make their own torch.distributed join ours and die."""
    keys = [k for k in os.environ if k.startswith(("TORCHELASTIC_", "TORCH_ELASTIC", "ROLE_", "GROUP_"))
            or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")]
    saved = {k: os.environ.pop(k) for k in keys}
    try:
        yield
    finally:
        os.environ.update(saved)


def setup_training(cfg: RunConfig) -> TrainContext:
    if not torch.cuda.is_available():
        from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

        enable_cpu_megatron()
    init_distributed()
    ctx = TrainContext(cfg)
    if ctx.rank == 0:
        (cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    return ctx
