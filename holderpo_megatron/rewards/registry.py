"""Every reward by name: the built-ins, those registered with ``@register_reward``, and import paths.

    @register_reward("format_ok")           # data.reward: format_ok (once this module is imported)
    def format_ok(completion, item, finish_reason): ...

    data.reward: my_pkg.my_module:score     # or path/to/file.py:score, no registration needed

The only place that turns a reward's name into a reward: ``build_reward(RewardConfig)``. A
registered function is run like an import path's (rewards/custom.py: a worker pool with timeouts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from holderpo_megatron.rewards.custom import FunctionReward, check_reward_function, load_reward_function
from holderpo_megatron.rewards.math import ExactIntReward, MathReward, Reward, RewardConfig

__all__ = ["RewardSpec", "register_reward", "reward_names", "resolve_reward", "build_reward"]


@dataclass(frozen=True)
class RewardSpec:
    """``build(config)`` makes the reward; ``needs_answers``: it grades against the rows' gold
    answers (so ``data.answer_key`` cannot be null)."""

    name: str
    build: Callable[[RewardConfig], Reward]
    needs_answers: bool


_REWARDS: dict[str, RewardSpec] = {}


def _add(spec: RewardSpec) -> None:
    if ":" in spec.name or not spec.name.strip():
        raise ValueError(f"a reward name cannot be empty or hold ':' (that is an import path), got {spec.name!r}")
    if spec.name in _REWARDS:
        raise ValueError(f"reward {spec.name!r} is already registered")
    _REWARDS[spec.name] = spec


def register_reward(name: str):
    """Decorator: ``fn(completion, item, finish_reason) -> float | RewardScore`` as the reward ``name``."""

    def decorate(fn):
        check_reward_function(fn, f"reward {name!r}")
        _add(RewardSpec(name, functools.partial(FunctionReward, fn, name=name), needs_answers=False))
        return fn

    return decorate


def reward_names() -> list[str]:
    return sorted(_REWARDS)


def resolve_reward(kind: str) -> RewardSpec:
    """The reward ``kind`` names: a registered name or an import path (imported and checked now).
    ValueError naming the kind and what is allowed."""
    if not isinstance(kind, str):
        raise ValueError(f"reward must be a name or an import path, got {kind!r}")
    if kind in _REWARDS:
        return _REWARDS[kind]
    if ":" not in kind:
        raise ValueError(f"unknown reward {kind!r}; allowed: {reward_names()} or an import path of your own "
                         f"function (my_pkg.my_module:score, or path/to/file.py:score)")
    fn = load_reward_function(kind)
    return RewardSpec(kind, functools.partial(FunctionReward, fn, name=kind), needs_answers=False)


def build_reward(config: RewardConfig) -> Reward:
    return resolve_reward(config.kind).build(config)


_add(RewardSpec("math", MathReward, needs_answers=True))
_add(RewardSpec("exact_int", ExactIntReward, needs_answers=True))
