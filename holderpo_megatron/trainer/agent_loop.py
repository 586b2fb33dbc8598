"""The agent side of a training step (``agent.env`` set): games -> multi-turn episodes -> samples.

A step plays ``train.prompts_per_step`` games ``rollout.group_size`` times each (rank 0, SGLang +
environment workers). Each episode is one trajectory: its reward gives a group advantage among
the plays of the same game, and each of its turns becomes one training sample (prompt + response;
the prompt, observations included, is masked) tagged with the trajectory id, so the Actor reduces
the whole episode as one sequence.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from holderpo_megatron.algorithms import group_advantages
from holderpo_megatron.envs.interface import EpisodeSpec
from holderpo_megatron.rollout.agent import Episode, run_agent_episodes, write_transcripts
from holderpo_megatron.rollout.interface import SamplingParams, step_seed

from .batch import StepSamples
from .config import RunConfig

__all__ = ["agent_games", "build_env_pool", "agent_samples", "episodes_to_samples", "chat_tokenizer"]

def agent_games(cfg: RunConfig, split: str, limit: int | None) -> list[EpisodeSpec]:
    """The games of ``split`` (the first ``limit`` of them, or all)."""
    from holderpo_megatron.envs.alfworld import list_alfworld_games

    return list_alfworld_games(split, root=cfg.data.data_dir, limit=limit)


def build_env_pool(cfg: RunConfig):
    from holderpo_megatron.envs.alfworld import AlfworldEnv, AlfworldEnvConfig, prepare_alfworld_data
    from holderpo_megatron.envs.pool import EnvPool

    a = cfg.agent
    prepare_alfworld_data()
    factory = partial(AlfworldEnv, AlfworldEnvConfig(max_steps=a.play.max_turns))
    return EnvPool(factory, num_workers=a.num_workers, step_timeout_s=a.step_timeout_s,
                   episode_timeout_s=a.episode_timeout_s)


def chat_tokenizer(tokenizer):
    """(tokenize, detokenize) for agent prompts: one user message through the chat template."""

    def tokenize(text: str) -> list[int]:
        if getattr(tokenizer, "chat_template", None):
            return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                      tokenize=True, return_dict=False))
        return list(tokenizer(text)["input_ids"])

    def detokenize(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return tokenize, detokenize


def episodes_to_samples(episodes: list[Episode], group_size: int, estimator: str,
                        token_budget: int) -> tuple[StepSamples, int]:
    """Episodes (``group_size`` plays of each game, adjacent) -> the training samples, and how many
    turns were dropped.

    Advantages are computed per game among the plays whose environment did not fail (a failed
    episode is not the policy's doing: it is counted, not trained on). A trajectory longer than
    ``token_budget`` keeps its most recent turns that fit (the loss needs a trajectory in one
    microbatch); how many turns were dropped is reported.
    """
    sequences, starts, logprobs, advantages, trajectory = [], [], [], [], []
    dropped = 0
    for g in range(0, len(episodes), group_size):
        ok = [(k, e) for k, e in enumerate(episodes[g:g + group_size], start=g) if not e.failed and e.turns]
        if not ok:
            continue
        rewards = torch.tensor([e.reward for _, e in ok], dtype=torch.float32)
        adv = group_advantages(rewards, len(ok), estimator)
        for (k, e), a in zip(ok, adv.tolist()):
            generated = [t for t in e.turns if t.output_ids]
            turns, used = [], 0
            for t in reversed(generated):
                n = len(t.prompt_ids) + len(t.output_ids)
                if used + n > token_budget:  # this turn and every earlier one stay out of the loss
                    dropped += len(generated) - len(turns)
                    break
                turns.append(t)
                used += n
            for t in reversed(turns):
                sequences.append(t.prompt_ids + t.output_ids)
                starts.append(len(t.prompt_ids))
                logprobs.append(t.logprobs.float())
                advantages.append(float(a))
                trajectory.append(k)
    return StepSamples(sequences, starts, logprobs, advantages, trajectory), dropped


def episode_metrics(episodes: list[Episode]) -> dict:
    n = max(1, len(episodes))
    turns = [len(e.turns) for e in episodes]
    responses = [len(t.output_ids) for e in episodes for t in e.turns]
    return {
        "reward_mean": sum(e.reward for e in episodes) / n,
        "accuracy": sum(e.won for e in episodes) / n,  # the success rate
        "agent/success_rate": sum(e.won for e in episodes) / n,
        "agent/turns_mean": sum(turns) / n,
        "agent/invalid_actions_mean": sum(e.invalid_actions for e in episodes) / n,
        "agent/env_failures": float(sum(e.failed for e in episodes)),
        "response_length_mean": sum(responses) / max(1, len(responses)),
        "response_length_max": float(max(responses, default=0)),
        "truncated_frac": sum(t.finish_reason == "length" for e in episodes for t in e.turns) / max(1, len(responses)),
    }


def agent_samples(ctx, items: list[EpisodeSpec], step: int) -> StepSamples:
    """Rank 0: play the step's games; the samples every rank receives (see loop.rollout_phase)."""
    cfg = ctx.cfg
    r = cfg.rollout
    specs = [spec for spec in items for _ in range(r.group_size)]
    params = SamplingParams(n=1, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            max_new_tokens=r.max_new_tokens, stop=tuple(r.stop), seed=step_seed(cfg.train.seed, step))
    tokenize, detokenize = chat_tokenizer(ctx.tokenizer)
    episodes = run_agent_episodes(ctx.engine, ctx.env_pool, tokenize, detokenize, specs, params, cfg.agent.play,
                                  r.max_prompt_tokens)
    samples, dropped = episodes_to_samples(episodes, r.group_size, cfg.algorithm.advantage, cfg.train.token_budget)
    # every DP rank needs whole trajectories: drop the last ones that do not divide evenly
    samples = samples.trim_to_multiple(ctx.dp_size)
    metrics = episode_metrics(episodes)
    metrics.update({
        "agent/turns_dropped": float(dropped),
        "kept_samples": float(len(samples)),
        "tokens": float(sum(len(s) for s in samples.sequences)),
        "stale_samples": 0.0,
    })
    if cfg.agent.save_transcripts:
        out = Path(cfg.run_dir) / "transcripts"
        out.mkdir(parents=True, exist_ok=True)
        write_transcripts(out / f"step_{step + 1:06d}.jsonl", episodes)
    samples.metrics = metrics
    samples.examples = [e.turns[0].response for e in episodes[:2] if e.turns]
    return samples
