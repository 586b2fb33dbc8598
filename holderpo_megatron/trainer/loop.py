"""The RL loop, as a recipe. Every torchrun worker runs :func:`run_training`.

One step:
    prompts --(rank 0 drives every engine of the fleet)--> samples --> rewards --> group advantages
                                                                    (rank 0, broadcast to every rank)
    --> engines release their memory (colocated, GPU)
    --> old (and reference) log-probs: Megatron forward-only on every DP rank, for the samples of
        minibatches 2..k only (minibatch 1's are its own training forward's: :func:`old_logprobs`)
    --> minibatch updates with the registered loss at p = schedule(step); the drift guard checks
        |logp_train - logp_rollout| after the first forward-backward, before any update
    --> engines resume their weights; weight sync Megatron -> every engine (version = step + 1,
        declared once every engine has it); engines resume their KV cache
    --> metrics; evaluation and checkpoints every N steps

With ``rollout.overlap`` (trainer/overlap.py) rank 0 submits step t+1's prompts as soon as step t's
samples arrive, and the sync waits for that batch: step t+1 trains on samples one version old.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from typing import Literal

import torch
import torch.distributed as dist

from holderpo_megatron.algorithms import LossMetrics, group_advantages
from holderpo_megatron.parallel.loss_scaling import all_reduce_loss_metrics
from holderpo_megatron.rollout.interface import SamplingParams, step_seed

from .agent_loop import agent_samples
from .batch import RolloutBatch, StepSamples
from .config import RolloutSection, RunConfig
from .faults import KILL_AFTER_STEP, kill_if_asked, kill_rank_if_asked
from .setup import TrainContext, setup_training

__all__ = ["run_training", "rollout_phase", "train_phase", "train_minibatches", "minibatch_parts",
           "old_logprob_source", "old_logprobs"]

log = logging.getLogger("holderpo")
OldLogprobSource = Literal["score", "reuse", "rollout"]


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
        # whole samples, trajectories, or (train.share_prompts) prompt groups: unless dynamic sampling
        # left fewer groups than ranks x minibatches
        k = cfg.train.minibatches_per_step
        by_prompt = cfg.train.share_prompts and len(samples.units(by_prompt=True)) >= ctx.dp_size * k
        mine, units = samples.share_units(ctx.dp_rank, ctx.dp_size, by_prompt)
        parts = minibatch_parts(units, k, cfg.train.seed, step)
        source = old_logprob_source(cfg, samples)
        with timer("score"):
            old, drift = old_logprobs(ctx.actor, mine, parts, source)
            # response tokens only: the prompt's log-probs are never read (loss, KL, drift)
            ref = ctx.ref.score(mine.sequences, mine.response_start) if ctx.ref is not None else None
        with timer("train"):
            # unscored samples: minibatch 1's forward measures its drift from the engine instead
            batch = mine.to_batch(old, ref, measure_drift=source != "score")
            metrics.update(train_phase(ctx, batch, parts, p, step, drift))
    else:  # dynamic sampling dropped every group; the engines still get their weights back
        metrics["skipped_update"] = 1.0
    ctx.handover.after_train()
    if ctx.prefetch is not None:  # this update's weights land after the engines finished the next batch
        with timer("rollout_wait"):
            ctx.prefetch.wait()
    ctx.handover.before_sync()  # the engines' weights come back, then the new ones go in
    with timer("sync"):
        metrics.update(ctx.sync_weights(version=step + 1))
    ctx.handover.after_sync(step + 1)  # and their KV cache
    return metrics


def rollout_phase(ctx: TrainContext, step: int) -> StepSamples:
    """Rank 0 generates and scores; every rank receives the same samples. With overlap, this step's
    batch was submitted during the previous step (or is generated now: the first step, a resumed one),
    and the next step's is submitted before this one is shared."""
    prefetch = ctx.prefetch
    held = prefetch is not None and prefetch.holds(step)
    # every rank advances its iterator, so all save the same position
    items = None if held else ctx.data.next_batch()
    payload: list = [None]
    if held and ctx.rank != 0:
        prefetch.take(step)  # no thread here: frees the slot for the next step
    if ctx.rank == 0:
        try:
            if held:
                samples = prefetch.take(step)
            elif ctx.cfg.agent.enabled:
                samples = agent_samples(ctx, items, step)
            else:
                samples = _prompt_samples(ctx, items, step, train_version=ctx.weight_version)
            payload = [samples]
        except Exception as e:  # every rank ends with rank 0's reason instead of waiting in the broadcast
            payload = [f"rank 0: the rollout of step {step + 1} failed: {type(e).__name__}: {e}"]
            dist.broadcast_object_list(payload, src=0)
            raise
    if prefetch is not None and step + 1 < ctx.cfg.train.steps:
        _submit_next(ctx, step + 1)
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise RuntimeError(payload[0])
    samples: StepSamples = payload[0]
    ctx.last_examples = samples.examples
    return samples


def _submit_next(ctx: TrainContext, step: int) -> None:
    """Every rank draws ``step``'s items (after saving the position a checkpoint keeps); rank 0 starts
    generating them. Trained after the sync of version ``step``, they are one version behind it."""
    state = ctx.data.state_dict()
    items = ctx.data.next_batch()
    produce = (lambda: _prompt_samples(ctx, items, step, train_version=step)) if ctx.rank == 0 else None
    ctx.prefetch.submit(step, state, produce)


def _prompt_samples(ctx: TrainContext, items: list, step: int, *, train_version: int) -> StepSamples:
    """Rank 0, single-turn prompts: generate a group per prompt, score, advantages. ``train_version``:
    the weight version the trainer holds when it trains on them (staleness is measured against it)."""
    cfg = ctx.cfg
    prompts = [ctx.prompt_ids(item.prompt) for item in items]
    params = SamplingParams(n=cfg.rollout.group_size, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                            max_new_tokens=cfg.rollout.max_new_tokens, ignore_eos=cfg.rollout.ignore_eos,
                            seed=step_seed(cfg.train.seed, step))
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
        "stale_samples": float(sum(s.is_stale(train_version) for s in samples)),
        **staleness_metrics(samples, train_version),
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


def minibatch_parts(units: list[list[int]], k: int, seed: int, step: int) -> list[list[list[int]]]:
    """This rank's units (lists of sample indices) shuffled, a function of (seed, step) so a resumed
    run cuts the same minibatches, and cut into ``k`` minibatches of (nearly) equal unit counts."""
    units = list(units)
    random.Random(seed * 1_000_003 + step).shuffle(units)
    n = len(units)
    return [units[i * n // k: (i + 1) * n // k] for i in range(k)]


def old_logprob_source(cfg: RunConfig, samples: StepSamples) -> OldLogprobSource:
    """Where this step's old (behaviour-policy) log-probs come from: ``rollout`` the engine's
    (``rollout.use_rollout_logprobs``); ``reuse`` minibatch 1's own training forward, the others scored
    (``train.reuse_training_logprobs``); ``score`` every sample scored. Samples generated with older
    weights than the trainer's (``stale_samples`` > 0) are never reused: their policy is not this one."""
    if cfg.rollout.old_logprobs_from_engine:  # use_rollout_logprobs, or overlap (one step off-policy)
        return "rollout"
    if cfg.train.reuse_training_logprobs and not samples.metrics.get("stale_samples", 0.0):
        return "reuse"
    return "score"


def old_logprobs(actor, samples: StepSamples, parts: list[list[list[int]]],
                 source: OldLogprobSource) -> tuple[list[torch.Tensor | None], LossMetrics]:
    """This rank's old log-probs per sample (``[n-1]``; None: minibatch 1's own forward gives them)
    and the drift of the scored ones from the engine's (``logprob_drift_*`` as loss metrics, this
    rank's, to merge with the training forward's). ``parts``: :func:`minibatch_parts`.

    Before the first update the policy is the one that generated the samples (weights synced every
    step), so a forward-only pass is redundant for minibatch 1: ``reuse`` scores minibatches 2..k only.
    """
    drift = LossMetrics()
    if source == "rollout":
        return samples.rollout_logprobs_full(), drift
    todo = list(range(len(samples))) if source == "score" else [i for part in parts[1:] for u in part for i in u]
    old: list[torch.Tensor | None] = [None] * len(samples)
    scored = actor.score([samples.sequences[i] for i in todo], [samples.response_start[i] for i in todo]) if todo else []
    for i, lp in zip(todo, scored):
        old[i] = lp
    from holderpo_megatron.rollout.drift import logprob_drift

    # the step's drift is judged once, over every rank (train_minibatches): no per-rank warning here
    d = logprob_drift(scored, [samples.rollout_logprobs[i] for i in todo],
                      response_starts=[samples.response_start[i] for i in todo], threshold=None)
    dev = actor.device
    drift.add_mean("logprob_drift_mean", torch.tensor(d.mean_abs * d.num_tokens, device=dev),
                   torch.tensor(d.num_tokens, device=dev))
    drift.add_max("logprob_drift_max", torch.tensor([d.max_abs], device=dev), torch.tensor([d.num_tokens > 0], device=dev))
    return old, drift


def train_phase(ctx: TrainContext, batch: RolloutBatch, parts: list[list[list[int]]], p: float, step: int,
                drift: LossMetrics) -> dict:
    """``minibatches_per_step`` optimizer steps over this rank's share (:func:`train_minibatches`)."""
    return train_minibatches(ctx.actor, batch, parts, p, step=step, drift=drift, rollout=ctx.cfg.rollout,
                             dp_group=ctx.dp_group)


def train_minibatches(actor, batch: RolloutBatch, parts: list[list[list[int]]], p: float, *, step: int,
                      drift: LossMetrics, rollout: RolloutSection, dp_group) -> dict:
    """One optimizer update per part of ``batch`` (lists of units); metrics merged over DP and shared
    over the pipeline. Only the first part may hold samples whose old log-probs are None (its own
    forward's), and only it measures drift against ``batch.rollout_logprobs``. After its
    forward-backward, before any update, the step's drift (``drift``: the scored samples'; plus the
    first part's forward) is judged against ``rollout.drift_warn`` and ``rollout.drift_max``."""
    merged, grad_norms, judged = drift, [], {}
    for i, part in enumerate(parts):
        sub = batch.select(part, measure_drift=i == 0)
        if i and any(o is None for o in sub.old_logprobs):
            raise RuntimeError(f"minibatch {i + 1} of {len(parts)} has samples without old log-probs: only "
                               "minibatch 1 (before any update) may take them from its own forward")
        merged = merged.merge(actor.forward_backward(sub, p))
        if i == 0:
            judged = judge_drift(actor, merged, rollout, dp_group, step)
        grad_norms.append(actor.optimizer_step()["grad_norm"])
    merged = all_reduce_loss_metrics(merged, dp_group)
    out = merged.to_dict()
    if actor.layout.pp > 1:  # loss metrics exist on the last pipeline stage: share them with the stage
        from megatron.core import parallel_state as ps

        box = [out]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())
        out = box[0]
    out.update(judged)
    out["grad_norm"] = max(grad_norms) if grad_norms else math.nan
    out["lr"] = actor.applied_lr()
    return out


def staleness_metrics(samples, train_version: int) -> dict[str, float]:
    """How many weight versions each sample is behind the weights it trains (its oldest token's
    version: a sample whose weights changed mid-way counts from its first span), and the versions seen."""
    versions = [min((v for v, _, _ in s.weight_versions), default=s.weight_version) for s in samples]
    behind = [train_version - v for v in versions]
    return {"rollout/staleness_mean": sum(behind) / len(behind), "rollout/staleness_max": float(max(behind)),
            "rollout/weight_version_min": float(min(versions)), "rollout/weight_version_max": float(max(versions))}


def engine_metrics(samples, engine_names: list[str]) -> dict[str, float]:
    """Per engine of the fleet (``rollout/engine{k}/...``, k its placement index): how many samples it
    made and when its last one finished (seconds from the start of generation)."""
    out = {}
    for k, name in enumerate(engine_names):
        mine = [s for s in samples if s.engine == name]
        out[f"rollout/engine{k}/samples"] = float(len(mine))
        out[f"rollout/engine{k}/seconds"] = max((s.timing.get("done_s", 0.0) for s in mine), default=0.0)
    return out


def judge_drift(actor, metrics: LossMetrics, rollout: RolloutSection, dp_group, step: int) -> dict[str, float]:
    """The step's |logp_train - logp_rollout| over every response token measured so far (this rank's
    ``logprob_drift_*`` in ``metrics``, summed over DP, from the last pipeline stage), the same on every
    rank. Warns (rank 0) when its max exceeds ``rollout.drift_warn``; when its mean exceeds
    ``rollout.drift_max``, raises on every rank (``drift_action: error``, before any update) or warns."""
    dev = actor.device
    n = metrics.counts.get("logprob_drift_mean")
    sums = torch.tensor([float(metrics.sums["logprob_drift_mean"]) if n is not None else 0.0,
                         float(n) if n is not None else 0.0], dtype=torch.float64, device=dev)
    mx = torch.tensor([float(metrics.maxs.get("logprob_drift_max", -math.inf))], dtype=torch.float64, device=dev)
    if dist.get_world_size(dp_group) > 1:
        dist.all_reduce(sums, group=dp_group)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=dp_group)
    both = torch.cat([sums, mx])
    if actor.layout.pp > 1:  # the training forward's drift exists on the last stage only
        from megatron.core import parallel_state as ps

        dist.broadcast(both, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    total, tokens, worst = (float(v) for v in both.cpu())
    mean, worst = (total / tokens, worst) if tokens > 0 else (0.0, 0.0)
    rank0 = dist.get_rank() == 0
    if rank0 and worst > rollout.drift_warn:
        log.warning("train/rollout log-prob drift: max |logp_train - logp_rollout| = %.4g nats > rollout.drift_warn=%g "
                    "(mean %.4g over %d response tokens)", worst, rollout.drift_warn, mean, int(tokens))
    if rollout.drift_max is not None and mean > rollout.drift_max:
        msg = (f"step {step + 1}: train/rollout log-prob drift, mean |logp_train - logp_rollout| = {mean:.4g} nats "
               f"over {int(tokens)} response tokens (max {worst:.4g}), exceeds rollout.drift_max={rollout.drift_max:g}")
        if rollout.drift_action == "error":
            raise RuntimeError(f"{msg}; the step is refused before any update (rollout.drift_action=error)")
        if rank0:
            log.warning("%s; training on (rollout.drift_action=warn)", msg)
    return {"logprob_drift_mean": mean, "logprob_drift_max": worst, "logprob_drift_tokens": tokens}
