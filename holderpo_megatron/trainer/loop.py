"""The RL loop, as a recipe. Every torchrun worker runs :func:`run_training`.

One step:
    prompts --(rank 0 drives every engine of the fleet)--> samples --> rewards --> group advantages
                                                                    (rank 0, broadcast to every rank)
    --> engines release their memory (colocated, GPU)
    --> old (and reference) log-probs: Megatron forward-only on every DP rank
    --> minibatch updates with the registered loss at p = schedule(step)
    --> engines resume their weights; weight sync Megatron -> every engine (version = step + 1,
        declared once every engine has it); engines resume their KV cache
    --> metrics; evaluation and checkpoints every N steps
"""

from __future__ import annotations

import math
import random
from collections import Counter

import torch
import torch.distributed as dist

from holderpo_megatron.algorithms import LossMetrics, group_advantages
from holderpo_megatron.parallel.loss_scaling import all_reduce_loss_metrics
from holderpo_megatron.rollout.interface import SamplingParams

from .agent_loop import agent_samples
from .batch import RolloutBatch, StepSamples
from .config import RunConfig
from .faults import KILL_AFTER_STEP, kill_if_asked, kill_rank_if_asked
from .setup import TrainContext, setup_training

__all__ = ["run_training", "rollout_phase", "train_phase"]


def run_training(cfg: RunConfig) -> None:
    ctx = setup_training(cfg)
    try:
        for step in range(ctx.start_step, cfg.train.steps):
            metrics = one_step(ctx, step)
            metrics.update(ctx.host_memory.end_step(step + 1))  # every rank's RSS and peak RSS of the step
            ctx.logger.log(step + 1, metrics, tokens=int(metrics.get("tokens", 0)))
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0:
                ctx.evaluate(step + 1)
            if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or step + 1 == cfg.train.steps:
                ctx.save(step + 1)
            kill_if_asked(KILL_AFTER_STEP, step + 1)
        ctx.finish()
        ctx.close(orderly=True)
    except Exception as e:
        # a collective that failed because another node died: name that node on this one
        why = ctx.heartbeat.explain(e) if ctx.heartbeat is not None else ""
        if why:
            raise RuntimeError(f"{why}; rank {ctx.rank} ends ({type(e).__name__}: {e})") from e
        raise
    finally:
        ctx.close()


def one_step(ctx: TrainContext, step: int) -> dict:
    cfg, timer = ctx.cfg, ctx.logger.timer
    p = ctx.schedule.value(step)
    ctx.handover.start_step()
    with timer("rollout"):
        samples = rollout_phase(ctx, step)
    ctx.handover.after_rollout()  # colocated: the engines' memory goes to training
    kill_rank_if_asked(step + 1)
    metrics = dict(samples.metrics)
    metrics.update(ctx.schedule.metrics(step))
    if len(samples):
        mine = samples.share(ctx.dp_rank, ctx.dp_size)  # whole samples, or whole trajectories
        with timer("score"):
            # response tokens only: the prompt's log-probs are never read (loss, KL, drift)
            old = ctx.actor.score(mine.sequences, mine.response_start)
            ref = ctx.ref.score(mine.sequences, mine.response_start) if ctx.ref is not None else None
        metrics.update(_drift(ctx, old, mine.rollout_logprobs, mine.response_start))
        if cfg.rollout.use_rollout_logprobs:
            old = mine.rollout_logprobs_full()
        with timer("train"):
            metrics.update(train_phase(ctx, mine.to_batch(old, ref), p, step))
    else:  # dynamic sampling dropped every group; the engines still get their weights back
        metrics["skipped_update"] = 1.0
    ctx.handover.after_train()
    ctx.handover.before_sync()  # the engines' weights come back, then the new ones go in
    with timer("sync"):
        metrics.update(ctx.sync_weights(version=step + 1))
    ctx.handover.after_sync(step + 1)  # and their KV cache
    return metrics


def rollout_phase(ctx: TrainContext, step: int) -> StepSamples:
    """Rank 0 generates and scores; every rank receives the same samples."""
    items = ctx.data.next_batch()  # every rank advances its iterator, so all save the same position
    payload = [None]
    if ctx.rank == 0:
        payload = [agent_samples(ctx, items, step) if ctx.cfg.agent.enabled else _prompt_samples(ctx, items, step)]
    dist.broadcast_object_list(payload, src=0)
    samples: StepSamples = payload[0]
    ctx.last_examples = samples.examples
    return samples


def _prompt_samples(ctx: TrainContext, items: list, step: int) -> StepSamples:
    """Rank 0, single-turn prompts: generate a group per prompt, score, advantages."""
    cfg = ctx.cfg
    prompts = [ctx.prompt_ids(item.prompt) for item in items]
    params = SamplingParams(n=cfg.rollout.group_size, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                            max_new_tokens=cfg.rollout.max_new_tokens, ignore_eos=cfg.rollout.ignore_eos,
                            seed=cfg.train.seed * 100_003 + step)
    groups = ctx.engine.generate(prompts, params)
    samples = [s for g in groups for s in g]
    texts = [ctx.tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in samples]
    scored = ctx.reward.score_items(texts, [items[s.prompt_index] for s in samples], [s.finish_reason for s in samples])
    rewards = torch.tensor(scored.rewards, dtype=torch.float32)
    adv = group_advantages(rewards, cfg.rollout.group_size, cfg.algorithm.advantage)
    keep = list(range(len(samples)))
    if cfg.algorithm.dynamic_sampling:  # drop groups whose rewards are all equal (no signal)
        g = cfg.rollout.group_size
        keep = [i for i in keep if rewards[i - i % g: i - i % g + g].unique().numel() > 1]
        keep = keep[: len(keep) - len(keep) % ctx.dp_size]
    lengths = torch.tensor([len(s.output_ids) for s in samples], dtype=torch.float32)
    metrics = {
        "reward_mean": rewards.mean().item(),
        "accuracy": (rewards > 0).float().mean().item(),
        "response_length_mean": lengths.mean().item(),
        "response_length_max": lengths.max().item(),
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "kept_samples": float(len(keep)),
        "tokens": float(sum(len(s.prompt_ids) + len(s.output_ids) for s in samples)),
        "reward_timeouts": float(scored.stats.get("timeout", 0)),
        "reward_errors": float(scored.stats.get("error", 0)),
        # what each response came to (correct/wrong/..., or a custom reward's labels), as fractions
        **{f"reward_label/{label}": n / len(samples) for label, n in sorted(Counter(scored.outcomes).items())},
        "stale_samples": float(sum(s.is_stale(ctx.weight_version) for s in samples)),
        **engine_metrics(samples, ctx.engine.engine_names),
    }
    return StepSamples(
        sequences=[samples[i].prompt_ids + samples[i].output_ids for i in keep],
        response_start=[len(samples[i].prompt_ids) for i in keep],
        rollout_logprobs=[samples[i].logprobs.float() for i in keep],
        advantages=[float(adv[i]) for i in keep],
        metrics=metrics,
        examples=[texts[i] for i in range(min(2, len(texts)))],
    )


def train_phase(ctx: TrainContext, batch: RolloutBatch, p: float, step: int) -> dict:
    """``minibatches_per_step`` optimizer steps over this rank's share; metrics merged over DP."""
    cfg = ctx.cfg
    units = batch.units()
    n = len(units)
    random.Random(cfg.train.seed * 1_000_003 + step).shuffle(units)  # a function of the step: resumable
    k = cfg.train.minibatches_per_step
    merged, grad_norms = LossMetrics(), []
    for part in range(k):
        merged = merged.merge(ctx.actor.forward_backward(batch.select(units[part * n // k: (part + 1) * n // k]), p))
        grad_norms.append(ctx.actor.optimizer_step()["grad_norm"])
    merged = all_reduce_loss_metrics(merged, ctx.dp_group)
    out = merged.to_dict()
    if ctx.layout.pp > 1:  # loss metrics exist on the last pipeline stage: share them with the stage
        from megatron.core import parallel_state as ps

        box = [out]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        out = box[0]
    out["grad_norm"] = max(grad_norms) if grad_norms else math.nan
    out["lr"] = ctx.actor.applied_lr()
    return out


def engine_metrics(samples, engine_names: list[str]) -> dict[str, float]:
    """Per engine of the fleet (``rollout/engine{k}/...``, k its placement index): how many samples it
    made and when its last one finished (seconds from the start of generation)."""
    out = {}
    for k, name in enumerate(engine_names):
        mine = [s for s in samples if s.engine == name]
        out[f"rollout/engine{k}/samples"] = float(len(mine))
        out[f"rollout/engine{k}/seconds"] = max((s.timing.get("done_s", 0.0) for s in mine), default=0.0)
    return out


def _drift(ctx: TrainContext, train_lp, rollout_lp, starts) -> dict:
    """|logp_train - logp_rollout| over response tokens, mean and max over the global batch."""
    from holderpo_megatron.rollout.drift import logprob_drift

    d = logprob_drift(train_lp, rollout_lp, response_starts=starts, threshold=ctx.cfg.rollout.drift_warn)
    sums = torch.tensor([d.mean_abs * d.num_tokens, float(d.num_tokens)], dtype=torch.float64)
    mx = torch.tensor([d.max_abs], dtype=torch.float64)
    if ctx.dp_size > 1:
        dist.all_reduce(sums, group=ctx.dp_group)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=ctx.dp_group)
    return {"logprob_drift_mean": float(sums[0] / sums[1].clamp_min(1)), "logprob_drift_max": float(mx[0])}
