"""The multi-turn environment interface: what agent rollouts may ask of any text environment.

Pure Python (no torch, no Megatron, no SGLang). One :class:`TextEnv` plays one episode at a time:

    obs = env.reset(game)            # task text, first observation, admissible actions
    while not done:
        res = env.step(action)       # observation, reward, done, won, invalid, admissible actions

An :class:`EnvFactory` is a picklable callable that builds a fresh env in a worker process;
:class:`~holderpo_megatron.envs.pool.EnvPool` runs many of them in worker processes with per-step and
per-episode timeouts, so one slow or crashed game never blocks the batch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["EnvObservation", "EnvStep", "TextEnv", "EnvFactory", "EpisodeSpec", "normalise_action"]


@dataclass(frozen=True)
class EpisodeSpec:
    """Which game to play: ``game`` is env-specific (an ALFWorld game file path, a seed, ...);
    ``task_type`` groups results in evaluation (ALFWorld: pick, clean, heat, cool, look, pick_two)."""

    game: str
    task_type: str = ""
    split: str = ""


@dataclass(frozen=True)
class EnvObservation:
    """What :meth:`TextEnv.reset` returns. ``task``: the goal in words; ``observation``: the first
    observation (without the task line); ``admissible_actions``: valid commands now."""

    task: str
    observation: str
    admissible_actions: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvStep:
    """What :meth:`TextEnv.step` returns.

    reward: the env's own reward for this step (ALFWorld: 1.0 when won, else 0.0; the trainer's
    episode reward is computed from ``won`` and ``invalid`` counts, see ``envs.rewards``);
    done: the episode ended (won, lost, or the env's own step limit); won: the goal is reached;
    invalid: the action was not admissible (the env state did not change);
    failed: the environment itself failed (crash, timeout) — the episode counts as lost, never won;
    error: a one-line reason when ``failed``.
    """

    observation: str
    admissible_actions: tuple[str, ...]
    reward: float
    done: bool
    won: bool = False
    invalid: bool = False
    failed: bool = False
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)


class TextEnv(abc.ABC):
    """One text environment instance; reusable across episodes (``reset`` starts a new one)."""

    @abc.abstractmethod
    def reset(self, spec: EpisodeSpec) -> EnvObservation: ...

    @abc.abstractmethod
    def step(self, action: str) -> EnvStep: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def normalise_action(action: str) -> str:
    """How actions are compared with the admissible ones: lower case, whitespace collapsed."""
    return " ".join(action.lower().split())


# A picklable zero-argument callable returning a TextEnv (e.g. functools.partial(AlfworldEnv, cfg)).
EnvFactory = Callable[[], TextEnv]
