"""Everything a training run holds, built once: distributed groups, the Actor (and reference),
the rollout fleet (engines per the placement, trainer/fleet.py) and the weight synchroniser, data,
reward (rank 0), logger, checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from holderpo_megatron.checkpoint import SafetensorsReader, load_hf_weights_into_model, load_megatron_checkpoint
from holderpo_megatron.checkpoint.train_state import load_latest_train_state, save_train_state
from holderpo_megatron.data.datasets import BatchIterator
from holderpo_megatron.data.templates import get_prompt_template, prompt_token_ids
from holderpo_megatron.models import ModelArch
from holderpo_megatron.models.builtin import resolve_model_path
from holderpo_megatron.observability import MetricsLogger
from holderpo_megatron.observability.host_memory import RankMemoryMonitor
from holderpo_megatron.parallel.cpu_compat import fuse_cpu_adam
from holderpo_megatron.parallel.layout import ParallelLayout, init_distributed, initialize_model_parallel
from holderpo_megatron.rewards import RewardConfig, build_reward

from .actor import MegatronActor
from .config import RunConfig, engine_config, run_placement, validate_run
from .data_checks import train_prompt_items
from .fleet import MemoryHandover, RolloutFleet, host_identity, sync_topology
from .liveness import PeerHeartbeat
from .overlap import RolloutPrefetch
from .run_guard import hold_run_lock
from .faults import KILL_DURING_SAVE, kill_if_asked

__all__ = ["TrainContext", "setup_training"]

log = logging.getLogger("holderpo")


class TrainContext:
    """What one worker holds during a run. Rank 0 also holds the driver (a client over every engine),
    tokenizer and reward; ``engine`` is the driver (None on other ranks)."""

    def __init__(self, cfg: RunConfig):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.rank = dist.get_rank()
        # a Hub id was downloaded by `holderpo train` on this node before the workers started
        self.hf_dir = resolve_model_path(cfg.model.hf_path, revision=cfg.model.revision, download=False)
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
        self.engine = self.tokenizer = self.reward = self.synchronizer = self.env_pool = self.fleet = None
        self.heartbeat = None
        # rollout.overlap: the next step's batch, generated while this step trains (trainer/overlap.py)
        self.prefetch = RolloutPrefetch() if cfg.rollout.overlap else None
        self.weight_version = 0
        self.last_examples: list[str] = []
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else cfg.run_dir / "checkpoints"
        self.start_step = 0
        self._maybe_resume()
        self.logger = MetricsLogger(
            cfg.run_dir, cfg.logging,
            # resuming (even before a first checkpoint) drops records after the restart step
            resume_step=self.start_step if cfg.checkpoint.resume else None, total_steps=cfg.train.steps,
            run_config=cfg.public_dict())
        self._start_rollout_side()
        # a resumed run's engines, and servers someone else runs, hold other weights than the trainer
        if self.start_step > 0 or any(e.url for e in self.placement.engines):
            self.sync_weights(version=self.start_step)

    # ------------------------------------------------------------------ pieces
    def _load_initial_weights(self, actor: MegatronActor) -> None:
        if self.cfg.model.megatron_load:
            load_megatron_checkpoint(actor.unwrapped(), self.cfg.model.megatron_load, self.arch)
        else:
            load_hf_weights_into_model(actor.unwrapped(), self.arch, SafetensorsReader(self.hf_dir))

    def _train_items(self):
        if self.cfg.agent.enabled:  # games (EpisodeSpec) instead of prompts
            from .agent_loop import agent_games

            return agent_games(self.cfg, self.cfg.agent.train_split, self.cfg.agent.games_limit)
        return train_prompt_items(self.cfg, self.hf_dir, announce=self.rank == 0)  # over-long prompts dropped

    def _start_rollout_side(self) -> None:
        """Every rank: its engines (placement), its part of the weight synchroniser and the memory
        handover; rank 0: tokenizer, reward (and environment workers)."""
        from holderpo_megatron.weight_sync import MegatronWeightSource, make_weight_synchronizer

        cfg, r = self.cfg, self.cfg.rollout
        engine_cfg = engine_config(cfg, self.hf_dir)  # validated on every rank
        self.placement = run_placement(cfg)
        hosts: list = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, host_identity())  # where each rank runs, as the launch names it
        self.heartbeat = PeerHeartbeat(self.rank, hosts, cfg.parallel.nproc_per_node)
        self.fleet = RolloutFleet(self.placement, engine_cfg, rank=self.rank, embedded=r.mode == "embedded")
        self.engine = self.fleet.driver
        if self.rank == 0:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
            self.reward = build_reward(RewardConfig(
                kind=cfg.data.reward, template=cfg.data.answer_template, workers=cfg.data.reward_workers,
                timeout_s=cfg.data.reward_timeout_s, truncated_reward=cfg.algorithm.truncated_reward,
                batch_timeout_s=cfg.data.reward_batch_timeout_s))
            if cfg.agent.enabled:
                from .agent_loop import build_env_pool

                self.env_pool = build_env_pool(cfg)
        source = MegatronWeightSource(self.actor.unwrapped(), self.arch, feeds=bool(self.fleet.fed), hosts=hosts)
        self.synchronizer = make_weight_synchronizer(
            source, self.fleet.feed if source.is_owner else None, dtype=engine_cfg.torch_dtype,
            transport=r.weight_sync, topology=sync_topology(self.fleet.fed, source.stage_senders, hosts, self.layout.tp),
            bucket_bytes=r.bucket_mb << 20)
        self.handover = MemoryHandover(
            self.fleet.feed, self.actor, release=self.placement.placement == "colocated" and r.release_memory_during_train,
            offload=cfg.train.offload_during_rollout, run_dir=cfg.run_dir if self.rank == 0 else None)

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        """``prompt``: an item's ``prompt`` (its problem text, or its own chat messages)."""
        return prompt_token_ids(self.template, self.tokenizer, prompt)

    # ------------------------------------------------------------------ weights, eval, checkpoints
    def sync_weights(self, version: int) -> dict[str, float]:
        """Weights into every engine as ``version``; returns this rank's sync metrics (seconds, GB/s,
        bytes). Every engine's ledger must be complete before the version is declared anywhere: a
        sync that fails on one engine fails the step on every rank, naming it, and no engine
        generates again (none from mixed weights)."""
        error, report = None, None
        try:
            report = self.synchronizer.sync(version, declare=False)
        except Exception as e:  # reported on every rank below; the collective must still happen
            names = self.fleet.feed.engine_names if self.fleet.feed is not None else []
            error = f"rank {self.rank} feeding {', '.join(names) or 'its engines'}: {type(e).__name__}: {e}"
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        failed = [e for e in errors if e]
        if failed:
            raise RuntimeError(f"weight sync of version {version} failed; no engine declares it: " + " | ".join(failed))
        self.synchronizer.declare(version)
        self.weight_version = version
        out = report.to_dict()
        if self.cfg.rollout.verify_sync:
            out["weight_sync/verified_tensors"] = float(self.fleet.verify(self.synchronizer.source,
                                                                          self.synchronizer.dtype))
        return out

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
        # with overlap the next step's items are drawn and in flight: the position before them is saved,
        # so a resumed run draws them again and regenerates them with the checkpoint's weights
        held = self.prefetch is not None and self.prefetch.holds(step)
        data = self.prefetch.data_state if held else self.data.state_dict()
        save_train_state(self.ckpt_root, step, model=self.actor.model, optimizer=self.actor.optimizer,
                         extra={"data": data, "schedule": self.schedule.to_dict()},
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
        fuse_cpu_adam(self.actor.optimizer)  # the loaded param groups carry the saving run's kernel choice
        self.start_step = info.step
        self.data.load_state_dict(info.extra["data"])
        if self.rank == 0:
            log.warning("resumed from %s at step %d", self.ckpt_root, info.step)

    def finish(self) -> None:
        if self.cfg.checkpoint.export_hf_at_end:
            from holderpo_megatron.checkpoint import export_hf_checkpoint

            out = self.cfg.run_dir / "hf"
            if self.start_step >= self.cfg.train.steps and (out / "config.json").is_file():
                if self.rank == 0:
                    log.warning("run %s is complete (step %d of %d) and exported to %s: nothing to do",
                                self.cfg.run_dir, self.start_step, self.cfg.train.steps, out)
                return
            # an export of an earlier attempt (a run resumed to train further) is replaced atomically
            export_hf_checkpoint(self.actor.unwrapped(), self.arch, self.hf_dir, out, overwrite=True)

    def close(self, orderly: bool = False) -> None:
        """Stop everything this rank holds (again: a no-op). ``orderly`` (a run that finished): every
        rank closes its weight synchroniser before any engine stops (closing a weights-update group
        talks to every engine in it, some started by other ranks or nodes)."""
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        if self.synchronizer is not None:
            try:
                self.synchronizer.close()
            except Exception as e:  # the run's work is done; an engine that is already gone is no error
                log.warning("closing the weight synchroniser: %s: %s", type(e).__name__, e)
            self.synchronizer = None
        if orderly:
            dist.barrier()
        # the fleet first: its servers gone, a background generation's requests fail fast
        for name in ("env_pool", "fleet", "prefetch", "heartbeat", "reward"):
            part = getattr(self, name)
            if part is not None:
                part.close()
                setattr(self, name, None)


def setup_training(cfg: RunConfig) -> TrainContext:
    if not torch.cuda.is_available():
        from holderpo_megatron.parallel.cpu_compat import enable_cpu_megatron

        enable_cpu_megatron()
    init_distributed()
    # rank 0 holds the run directory's lock (or checks that its launcher does) before it touches it
    run_lock = hold_run_lock(cfg.run_dir) if dist.get_rank() == 0 else None
    # every rank's RSS record, for a launcher that outlives a rank the OOM killer ends (step 0: starting)
    host_memory = RankMemoryMonitor(cfg.run_dir, dist.get_rank())
    host_memory.record(0)
    ctx = TrainContext(cfg)
    ctx.host_memory = host_memory
    host_memory.record(ctx.start_step)  # model, optimizer and engines in place
    ctx.run_lock = run_lock  # released when the process ends
    if ctx.rank == 0:
        (cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.json").write_text(json.dumps(cfg.public_dict(), indent=2, default=str))
    if cfg.eval.at_start and ctx.start_step == 0:
        ctx.evaluate(0)
    return ctx
