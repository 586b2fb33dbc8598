"""Multi-turn agent rollouts: a policy served by a :class:`RolloutEngine` plays text environments.

Each turn of each live episode:

    prompt  = task + the last ``history_length`` (observation, action) pairs + the current
              observation + the admissible actions + "think in <think>, act in <action>"
    output  = engine.generate(prompt)                   one sample, with its log-probs
    action  = the text inside the last <action> ... </action> (invalid when absent or not admissible)
    env.step(action) -> next observation, won / done    (in worker processes, see envs.pool)

An episode ends at success, failure, an environment fault, or ``max_turns``. It is one trajectory:
its reward is ``win_reward * won - invalid_penalty * invalid actions`` and every turn shares the
episode's group advantage. For training each turn is one sample (prompt + response); the prompt,
which holds every observation, is masked, so the loss covers only the agent's own tokens, and the
Actor reduces all turns of an episode as one sequence (``RolloutBatch.trajectory``).

This module knows the engine and environment *interfaces* only (no Megatron, no SGLang import).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from holderpo_megatron.envs.interface import EnvObservation, EnvStep, EpisodeSpec, normalise_action

from .interface import RolloutEngine, SamplingParams

__all__ = ["AgentConfig", "AgentTurn", "Episode", "parse_action", "build_agent_prompt", "run_agent_episodes",
           "write_transcripts"]

log = logging.getLogger("holderpo.agent")

_ACTION = re.compile(r"<action>(.*?)(?:</action>|$)", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class AgentConfig:
    """How an agent plays. Token counts are of the policy's tokenizer."""

    max_turns: int = 50
    history_length: int = 2
    think: bool = True  # ask for <think> reasoning before the <action>
    win_reward: float = 10.0
    invalid_penalty: float = 0.1
    max_action_chars: int = 200  # an unparseable answer is sent to the env cut to this length

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"AgentConfig.{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        if not isinstance(self.max_turns, int) or self.max_turns < 1:
            bad("max_turns", "an int >= 1")
        if not isinstance(self.history_length, int) or self.history_length < 0:
            bad("history_length", "an int >= 0")
        for name in ("win_reward", "invalid_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, "a finite number >= 0")

    def episode_reward(self, won: bool, invalid_actions: int) -> float:
        return self.win_reward * float(won) - self.invalid_penalty * invalid_actions


@dataclass
class AgentTurn:
    """One turn: the prompt the policy saw, what it generated (ids, log-probs), the action taken."""

    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: torch.Tensor
    finish_reason: str
    response: str
    action: str
    valid: bool  # parsed, and admissible when the action was taken
    observation: str = ""  # what the environment answered


@dataclass
class Episode:
    spec: EpisodeSpec
    task: str = ""
    first_observation: str = ""
    turns: list[AgentTurn] = field(default_factory=list)
    won: bool = False
    failed: bool = False  # the environment failed (crash, hang, error): not the agent's doing
    error: str = ""
    invalid_actions: int = 0
    reward: float = 0.0

    def transcript(self) -> dict:
        return {
            "game": self.spec.game, "task_type": self.spec.task_type, "split": self.spec.split, "task": self.task,
            "first_observation": self.first_observation,
            "won": self.won, "failed": self.failed, "error": self.error, "reward": self.reward,
            "invalid_actions": self.invalid_actions, "turns": len(self.turns),
            "steps": [{"response": t.response, "action": t.action, "valid": t.valid, "observation": t.observation,
                       "prompt_tokens": len(t.prompt_ids), "response_tokens": len(t.output_ids),
                       "finish_reason": t.finish_reason} for t in self.turns],
        }


def write_transcripts(path, episodes: Sequence[Episode]) -> None:
    """Every episode's transcript, one JSON line each."""
    with open(path, "w") as f:
        for e in episodes:
            f.write(json.dumps(e.transcript()) + "\n")


def parse_action(text: str) -> str | None:
    """The text inside the last ``<action>...</action>`` (a missing close tag is tolerated), or None."""
    found = _ACTION.findall(text)
    if not found:
        return None
    action = " ".join(found[-1].split())
    return action or None


def build_agent_prompt(task: str, observation: str, admissible: Sequence[str],
                       history: Sequence[tuple[str, str]], turn: int, think: bool = True) -> str:
    """The user message of one turn (history: the most recent (observation, action) pairs, oldest first)."""
    lines = [f"You are an agent in a text-based household environment. Your task is to: {task}"]
    if history:
        lines.append(f"You have taken {turn} step(s) so far. Your last {len(history)} observation(s) and the "
                     "action you took after each:")
        first = turn - len(history) + 1
        for k, (obs, act) in enumerate(history):
            lines.append(f"[Step {first + k}] Observation: {obs}\n[Step {first + k}] Action: {act}")
    lines.append(f"You are now at step {turn + 1}. Current observation: {observation}")
    lines.append("Admissible actions: [" + ", ".join(f"'{a}'" for a in admissible) + "]")
    if think:
        lines.append("First reason step by step about the situation inside <think> </think> tags, then give "
                     "exactly one admissible action inside <action> </action> tags.")
    else:
        lines.append("Give exactly one admissible action inside <action> </action> tags.")
    return "\n\n".join(lines)


class _Live:
    """The state of one running episode."""

    def __init__(self, spec: EpisodeSpec, first: EnvObservation | EnvStep):
        self.episode = Episode(spec)
        self.history: list[tuple[str, str]] = []
        self.done = False
        if isinstance(first, EnvStep):  # the reset itself failed
            self.episode.failed, self.episode.error, self.done = True, first.error or "reset failed", True
            self.observation, self.admissible = "", ()
        else:
            self.episode.task, self.episode.first_observation = first.task, first.observation
            self.observation, self.admissible = first.observation, tuple(first.admissible_actions)


def run_agent_episodes(engine: RolloutEngine, pool, tokenize: Callable[[str], list[int]],
                       detokenize: Callable[[list[int]], str], specs: Sequence[EpisodeSpec],
                       sampling: SamplingParams, cfg: AgentConfig, max_prompt_tokens: int) -> list[Episode]:
    """Play one episode per spec to the end; returns them in spec order.

    pool: an :class:`~holderpo_megatron.envs.pool.EnvPool` (or anything with its reset/step);
    tokenize: user message -> prompt ids (the chat template applied); detokenize: ids -> text.
    ``sampling.n`` must be 1 (a group is several specs of the same game); its seed, when set, is
    advanced per turn so every turn draws fresh samples. ``max_prompt_tokens`` bounds each turn's
    prompt (the oldest history goes first, then the observation is cut).
    """
    if not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 16:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens!r} is invalid; allowed: an int >= 16")
    if sampling.n != 1:
        raise ValueError(f"agent rollouts sample one action per episode and turn: sampling.n must be 1, got {sampling.n}")
    live = [_Live(spec, first) for spec, first in zip(specs, pool.reset(list(specs)))]
    for turn in range(cfg.max_turns):
        active = [i for i, e in enumerate(live) if not e.done]
        if not active:
            break
        prompts = [_prompt_ids(live[i], turn, tokenize, cfg.think, max_prompt_tokens) for i in active]
        seed = None if sampling.seed is None else sampling.seed + turn * 1_000_003
        outputs = engine.generate(prompts, replace(sampling, seed=seed))
        actions = {}
        for i, ids, (sample,) in zip(active, prompts, outputs):
            text = detokenize(sample.output_ids)
            parsed = parse_action(text)
            e = live[i]
            ok = parsed is not None and normalise_action(parsed) in {normalise_action(a) for a in e.admissible}
            action = parsed if parsed is not None else " ".join(text.split())[: cfg.max_action_chars]
            e.episode.turns.append(AgentTurn(ids, list(sample.output_ids), sample.logprobs.float(),
                                             sample.finish_reason, text, action, ok))
            actions[i] = action
        results = pool.step(actions)
        for i in active:
            _apply(live[i], results[i], turn, cfg)
    episodes = []
    for e in live:
        ep = e.episode
        ep.reward = 0.0 if ep.failed else cfg.episode_reward(ep.won, ep.invalid_actions)
        episodes.append(ep)
    return episodes


def _apply(e: _Live, res: EnvStep, turn: int, cfg: AgentConfig) -> None:
    t = e.episode.turns[-1]
    t.observation = res.observation
    if res.invalid:
        t.valid = False
    if not t.valid:
        e.episode.invalid_actions += 1
    if res.failed:
        e.episode.failed, e.episode.error, e.done = True, res.error, True
        log.warning("episode %s (%s) ended by an environment fault at turn %d: %s",
                    e.episode.spec.game, e.episode.spec.task_type, turn + 1, res.error)
        return
    e.history = (e.history + [(e.observation, t.action)])[-cfg.history_length:] if cfg.history_length else []
    e.observation, e.admissible = res.observation, tuple(res.admissible_actions)
    if res.won:
        e.episode.won = True
    if res.done or res.won:
        e.done = True


def _prompt_ids(e: _Live, turn: int, tokenize, think: bool, max_prompt_tokens: int) -> list[int]:
    """The turn's prompt, within ``max_prompt_tokens``: the oldest history goes first, then the
    observation is cut (from its start, keeping the most recent text)."""
    history = list(e.history)
    obs = e.observation
    while True:
        ids = tokenize(build_agent_prompt(e.episode.task, obs, e.admissible, history, turn, think))
        if len(ids) <= max_prompt_tokens:
            return ids
        if history:
            history.pop(0)
        elif len(obs) > 64:
            obs = "..." + obs[len(obs) // 4:]
        else:
            raise ValueError(f"the prompt of episode {e.episode.spec.game!r} has {len(ids)} tokens even without "
                             f"history; raise max_prompt_tokens ({max_prompt_tokens})")
