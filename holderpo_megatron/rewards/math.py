"""Outcome rewards for math reasoning: 1.0 when the final answer is right, else 0.0.

``MathReward`` extracts the answer in the prompt template's format (``extract.py``), then checks it
against every acceptable gold answer of the item (any match counts): first a string comparison,
then math-verify in a ``TimeoutPool`` so that a hanging verification scores 0, is counted, and
never stalls the run. ``ExactIntReward`` is the arithmetic demo's reward: the last integer of the
response equals the answer.

Per-response outcomes (``RewardResult.outcomes``), in the order they are decided:
  truncated   finish reason "length" and ``truncated_reward`` is set: scored ``truncated_reward``
  no_answer   no answer in the template's format
  too_long    the extracted answer exceeds ``max_answer_chars`` (adversarial input), scored 0
  correct / wrong
  timeout     the verifier overran ``timeout_s``: scored 0, its worker killed and replaced; or the
              batch's ``batch_timeout_s`` was spent before it was verified (counted apart as
              ``stats["over_budget"]``, logged)
  error       the verifier raised (or its worker died): scored 0

The per-batch budget bounds one call of ``score``: answers are sent to the verifier in waves
sized so that a wave cannot outlast the budget left (``workers`` answers per ``timeout_s``
of it); once it is spent the rest score as timeouts. A batch therefore takes at most
``batch_timeout_s`` plus one ``timeout_s`` (and the restarts of killed workers), however many
answers hang.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

from holderpo_megatron.rewards.extract import ANSWER_TEMPLATES, extract_answer, extract_last_integer
from holderpo_megatron.rewards.pool import TimeoutPool
from holderpo_megatron.rewards.verifier import math_verify_any, warm_up_math_verify, same_answer_text

__all__ = ["RewardConfig", "RewardResult", "MathReward", "ExactIntReward", "Reward", "REWARD_KINDS", "OUTCOMES"]

log = logging.getLogger(__name__)

REWARD_KINDS = ("math", "exact_int")  # the built-ins; rewards/registry.py holds every name
OUTCOMES = ("correct", "wrong", "no_answer", "truncated", "too_long", "timeout", "error")


@dataclass
class RewardConfig:
    """Typed reward settings (validated on construction).

    kind: a registered reward ("math": template extraction + math-verify; "exact_int": the
      arithmetic demo) or an import path of your own function (rewards/custom.py).
    template: answer format for kind="math": qwen_math | r1 | plain.
    timeout_s: wall-clock seconds per item for math-verify (all its gold answers together).
    workers: verifier processes.
    truncated_reward: reward of a response cut off by the length limit; None grades it like any other.
    max_answer_chars: longer extracted answers score 0 without verification; None disables the check.
    batch_timeout_s: wall-clock seconds for verifying one ``score`` call's answers (None: no budget);
      once spent, the answers not yet verified score as timeouts (module docstring).
    """

    kind: str = "math"
    template: str = "qwen_math"
    timeout_s: float = 5.0
    workers: int = 2
    truncated_reward: float | None = 0.0
    max_answer_chars: int | None = 1000
    batch_timeout_s: float | None = None

    def __post_init__(self) -> None:
        from holderpo_megatron.rewards.registry import resolve_reward  # (the registry builds from this config)

        resolve_reward(self.kind)  # a ValueError naming the kind and what is allowed
        if self.template not in ANSWER_TEMPLATES:
            raise ValueError(f"unknown answer template {self.template!r}; allowed: {sorted(ANSWER_TEMPLATES)}")
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a number > 0, got {self.timeout_s!r}")
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        if self.truncated_reward is not None and not isinstance(self.truncated_reward, (int, float)):
            raise ValueError(f"truncated_reward must be a number or None, got {self.truncated_reward!r}")
        if self.max_answer_chars is not None and not (isinstance(self.max_answer_chars, int)
                                                      and self.max_answer_chars >= 1):
            raise ValueError(f"max_answer_chars must be an int >= 1 or None, got {self.max_answer_chars!r}")
        if self.batch_timeout_s is not None and not (isinstance(self.batch_timeout_s, (int, float))
                                                     and self.batch_timeout_s > 0):
            raise ValueError(f"batch_timeout_s must be a number > 0 or None, got {self.batch_timeout_s!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "RewardConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown reward config keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RewardResult:
    """``rewards[i]`` for response i; ``outcomes[i]`` in OUTCOMES; ``extracted[i]`` the answer found
    (None when none); ``stats``: counts per outcome, n, mean_reward, verified (sent to the
    verifier), fast_path (decided by string match), worker_restarts, seconds, error_examples."""

    rewards: list[float]
    outcomes: list[str]
    extracted: list[str | None]
    stats: dict = field(default_factory=dict)


class Reward(Protocol):
    """What the loop holds: ``score_items(responses, items, finish_reasons)``, ``items[i]`` the data
    row response i answers (``.answers``: its gold answers; ``.row``: every field)."""

    def score_items(self, responses: list[str], items: Sequence,
                    finish_reasons: list[str] | None = None) -> RewardResult: ...

    def close(self) -> None: ...


def _check_inputs(responses, answers, finish_reasons) -> list[str]:
    if len(answers) != len(responses):
        raise ValueError(f"got {len(responses)} responses but {len(answers)} answer lists")
    for i, golds in enumerate(answers):
        if isinstance(golds, str) or not golds:
            raise ValueError(f"answers[{i}] must be a non-empty list of strings, got {golds!r}")
    if finish_reasons is None:
        return ["stop"] * len(responses)
    if len(finish_reasons) != len(responses):
        raise ValueError(f"got {len(responses)} responses but {len(finish_reasons)} finish reasons")
    return list(finish_reasons)


class _GoldAnswerReward:
    """A reward graded against the items' gold answers only."""

    needs_answers = True

    def score_items(self, responses: list[str], items: Sequence,
                    finish_reasons: list[str] | None = None) -> RewardResult:
        return self.score(responses, [list(it.answers) for it in items], finish_reasons)


def _summarise(rewards, outcomes, t0, **extra) -> dict:
    counts = Counter(outcomes)
    stats = {k: counts.get(k, 0) for k in OUTCOMES}
    stats.update(n=len(rewards), mean_reward=(sum(rewards) / len(rewards)) if rewards else 0.0,
                 seconds=time.monotonic() - t0)
    stats.update(extra)
    return stats


class MathReward(_GoldAnswerReward):
    """Math answer reward. ``MathReward(template="qwen_math", timeout_s=5.0, workers=2, truncated_reward=0.0)``.

    ``verify_fn(pred, golds) -> bool`` replaces math-verify (tests inject a hanging one); it must be
    a module-level function (it is pickled into the worker processes). Call ``close()`` (or use
    ``with``) to stop the workers; they also stop when the object is garbage-collected.
    """

    def __init__(self, config: RewardConfig | None = None, *,
                 verify_fn: Callable[[str, list[str]], bool] | None = None, **fields):
        if config is not None and fields:
            raise ValueError(f"pass either a RewardConfig or keyword fields, not both (got {sorted(fields)})")
        self.config = config if config is not None else RewardConfig(**fields)
        if self.config.kind != "math":
            raise ValueError(f"MathReward needs kind='math', got {self.config.kind!r}")
        self._verify_fn = verify_fn or math_verify_any
        self._pool: TimeoutPool | None = None

    @property
    def pool(self) -> TimeoutPool:
        if self._pool is None:
            init = warm_up_math_verify if self._verify_fn is math_verify_any else None
            self._pool = TimeoutPool(self._verify_fn, workers=self.config.workers, timeout_s=self.config.timeout_s,
                                     initializer=init)
        return self._pool

    def score(self, responses: list[str], answers: list[list[str]],
              finish_reasons: list[str] | None = None) -> RewardResult:
        """Rewards for ``responses[i]`` against the acceptable answers ``answers[i]`` (any match counts)."""
        t0 = time.monotonic()
        reasons = _check_inputs(responses, answers, finish_reasons)
        cfg = self.config
        n = len(responses)
        rewards = [0.0] * n
        outcomes = [""] * n
        extracted: list[str | None] = [None] * n
        to_verify: list[int] = []
        fast = 0
        for i, (text, golds, reason) in enumerate(zip(responses, answers, reasons)):
            golds = [str(g) for g in golds]
            if reason == "length" and cfg.truncated_reward is not None:
                rewards[i], outcomes[i] = float(cfg.truncated_reward), "truncated"
                continue
            pred = extract_answer(text, cfg.template)
            extracted[i] = pred
            if pred is None:
                outcomes[i] = "no_answer"
            elif cfg.max_answer_chars is not None and len(pred) > cfg.max_answer_chars:
                outcomes[i] = "too_long"
            elif same_answer_text(pred, golds):
                rewards[i], outcomes[i] = 1.0, "correct"
                fast += 1
            else:
                to_verify.append(i)
        errors = []
        restarts_before = self._pool.restarts if self._pool is not None else 0
        restarts = 0
        over_budget = 0
        if to_verify:
            pool = self.pool
            calls = [(extracted[i], [str(g) for g in answers[i]]) for i in to_verify]
            for i, res in zip(to_verify, pool.map_within_budget(calls, cfg.batch_timeout_s, t0)):
                if res is None:  # the batch's time budget ran out before this answer was verified
                    outcomes[i] = "timeout"
                    over_budget += 1
                elif res.status == "ok":
                    ok = bool(res.value)
                    rewards[i], outcomes[i] = (1.0 if ok else 0.0), ("correct" if ok else "wrong")
                else:
                    outcomes[i] = res.status
                    if res.status == "error" and len(errors) < 3:
                        errors.append(res.error)
            restarts = pool.restarts - restarts_before
            if over_budget:
                log.warning("reward: the batch's time budget (batch_timeout_s=%.0f s) ran out: %d of %d answers "
                            "were not verified and score as timeouts", cfg.batch_timeout_s, over_budget, n)
        stats = _summarise(rewards, outcomes, t0, verified=len(to_verify) - over_budget, fast_path=fast,
                           worker_restarts=restarts, error_examples=errors, over_budget=over_budget)
        return RewardResult(rewards, outcomes, extracted, stats)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "MathReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ExactIntReward(_GoldAnswerReward):
    """Arithmetic-demo reward: 1.0 when the last integer of the response equals the (integer) answer.

    Pure Python in the calling process: nothing to hang on. ``answers[i]`` lists acceptable
    integers as strings (``["12"]``); a non-integer gold is a ValueError.
    """

    def __init__(self, config: RewardConfig | None = None, **fields):
        if config is None:
            fields.setdefault("kind", "exact_int")
            config = RewardConfig(**fields)
        if config.kind != "exact_int":
            raise ValueError(f"ExactIntReward needs kind='exact_int', got {config.kind!r}")
        self.config = config

    def score(self, responses: list[str], answers: list[list[str]],
              finish_reasons: list[str] | None = None) -> RewardResult:
        t0 = time.monotonic()
        reasons = _check_inputs(responses, answers, finish_reasons)
        rewards, outcomes, extracted = [], [], []
        for text, golds, reason in zip(responses, answers, reasons):
            if reason == "length" and self.config.truncated_reward is not None:
                rewards.append(float(self.config.truncated_reward))
                outcomes.append("truncated")
                extracted.append(None)
                continue
            try:
                gold_ints = {int(str(g).strip()) for g in golds}
            except ValueError:
                raise ValueError(f"exact_int needs integer answers, got {golds!r}") from None
            pred = extract_last_integer(text)
            extracted.append(None if pred is None else str(pred))
            if pred is None:
                rewards.append(0.0)
                outcomes.append("no_answer")
            else:
                ok = pred in gold_ints
                rewards.append(1.0 if ok else 0.0)
                outcomes.append("correct" if ok else "wrong")
        return RewardResult(rewards, outcomes, extracted, _summarise(rewards, outcomes, t0))

    def close(self) -> None:
        pass

