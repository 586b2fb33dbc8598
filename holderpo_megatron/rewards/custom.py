"""Your own reward: a Python function, run in the timeout worker pool.

The one signature (``data.reward: my_pkg.my_module:score``, or ``path/to/file.py:score``)::

    def score(completion: str, item, finish_reason: str) -> float | RewardScore

``completion`` is the decoded response; ``item`` the data row it answers (``item.problem``,
``item.answers``: the gold answers as text, ``item.row``: every field of the original row);
``finish_reason`` is "stop" or "length" (cut off by ``rollout.max_new_tokens``: the function
decides what that is worth). An ``async def`` works too. Return a number, or a
``RewardScore(reward, label)`` whose label is counted per step (``"format_ok"``, ``"too_long"``).

Each call runs in a worker process with ``timeout_s`` of wall time: one that hangs is killed and
scores 0 as a ``timeout``, one that raises (or returns something else) scores 0 as an ``error``;
both are counted and logged, and the step goes on. The function travels to the workers by
reference, so it must be a module-level function.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import logging
import math
import os
import pickle
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from holderpo_megatron.rewards.math import RewardResult
from holderpo_megatron.rewards.pool import TimeoutPool

__all__ = ["RewardScore", "FunctionReward", "load_reward_function", "check_reward_function"]

log = logging.getLogger("holderpo.rewards")

_LABEL_RE = re.compile(r"[A-Za-z0-9_]{1,40}")


@dataclass(frozen=True)
class RewardScore:
    """What a reward function may return instead of a bare number: the reward, and a short label
    (letters, digits, ``_``; up to 40) saying why, counted per step."""

    reward: float
    label: str = "scored"

    def __post_init__(self) -> None:
        if isinstance(self.reward, bool) or not isinstance(self.reward, (int, float)) or not math.isfinite(self.reward):
            raise ValueError(f"RewardScore.reward must be a finite number, got {self.reward!r}")
        if not (isinstance(self.label, str) and _LABEL_RE.fullmatch(self.label)):
            raise ValueError(f"RewardScore.label must be 1-40 letters, digits or '_', got {self.label!r}")


def _as_score(value: Any) -> RewardScore:
    if isinstance(value, RewardScore):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a reward function must return a number or a RewardScore, got {type(value).__name__}: "
                        f"{value!r:.80}")
    return RewardScore(float(value))


def _call_reward(fn: Callable, completion: str, item: Any, finish_reason: str) -> RewardScore:
    """Runs in a pool worker: one call of the user's function, its answer checked there (a bad
    return value is that call's error, not the batch's)."""
    out = fn(completion, item, finish_reason)
    if inspect.isawaitable(out):
        out = asyncio.run(_wait(out))
    return _as_score(out)


async def _wait(awaitable):
    return await awaitable


def check_reward_function(fn: Any, where: str) -> None:
    """ValueError unless ``fn`` is a module-level function callable as ``fn(completion, item, finish_reason)``."""
    if not callable(fn):
        raise ValueError(f"{where} is not callable: {type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None  # a builtin without a signature: trust it
    if sig is not None:
        try:
            sig.bind("completion", None, "stop")
        except TypeError:
            raise ValueError(f"{where} must take (completion, item, finish_reason); its signature is "
                             f"{fn.__name__}{sig}") from None
    try:  # the workers receive it by reference: a lambda or a nested function cannot travel
        pickle.dumps(fn)
    except Exception as e:
        raise ValueError(f"{where} must be a module-level function (it is sent to worker processes by "
                         f"name): {type(e).__name__}: {e}") from None


def load_reward_function(spec: str) -> Callable:
    """The function an import path names: ``pkg.module:name``, or ``path/to/file.py:name`` (relative
    to the working directory; its folder joins ``sys.path`` so that the workers import it too).
    ValueError when it does not import or its signature does not fit."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise ValueError(f"reward {spec!r} is not an import path; expected module.path:function or "
                         f"path/to/file.py:function")
    if target.endswith(".py"):
        module = _import_file(spec, Path(target))
    else:
        module = _import_module(spec, target)
    fn = getattr(module, attr, None)
    if fn is None:
        have = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise ValueError(f"reward {spec!r}: {module.__name__} has no {attr!r} (its functions: "
                         f"{', '.join(have) or 'none'})")
    check_reward_function(fn, f"reward {spec!r}")
    return fn


def _import_file(spec: str, path: Path):
    path = path.resolve()
    if not path.is_file():
        raise ValueError(f"reward {spec!r}: no file {path}")
    if not path.stem.isidentifier():
        raise ValueError(f"reward {spec!r}: {path.name} is not importable as a module name; rename it")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = _import_module(spec, path.stem)
    if Path(getattr(module, "__file__", "") or "").resolve() != path:
        raise ValueError(f"reward {spec!r}: the module name {path.stem!r} is already taken by "
                         f"{getattr(module, '__file__', module)}; rename {path.name}")
    return module


def _import_module(spec: str, name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        # `holderpo` (a console script) does not put the working directory on sys.path as `python -m`
        # does; a package in the project folder is what a user means
        cwd = os.getcwd()
        if e.name and name.split(".")[0] == e.name.split(".")[0] and cwd not in sys.path:
            sys.path.append(cwd)
            return _import_module(spec, name)
        raise ValueError(f"reward {spec!r}: module {name!r} does not import ({e}); put its folder on "
                         f"PYTHONPATH, or name the file: path/to/file.py:function") from None
    except Exception as e:
        raise ValueError(f"reward {spec!r}: importing {name} raised {type(e).__name__}: {e}") from None


@dataclass
class _Tally:
    rewards: list[float]
    outcomes: list[str]
    errors: list[str] = field(default_factory=list)


class FunctionReward:
    """A per-response reward function run in a :class:`TimeoutPool` (module docstring).

    ``config`` is the reward's ``RewardConfig``: ``timeout_s`` per call, ``workers`` processes,
    ``batch_timeout_s`` for one ``score_items`` call (the calls not started by then score as
    timeouts, counted in ``stats["over_budget"]``). ``truncated_reward`` does not apply: the
    function sees the finish reason and decides.
    """

    needs_answers = False

    def __init__(self, fn: Callable, config, name: str | None = None):
        self.name = name or f"{fn.__module__}:{fn.__qualname__}"
        check_reward_function(fn, f"reward {self.name!r}")
        self.fn = fn
        self.config = config
        self._pool: TimeoutPool | None = None

    @property
    def pool(self) -> TimeoutPool:
        if self._pool is None:
            self._pool = TimeoutPool(functools.partial(_call_reward, self.fn), workers=self.config.workers,
                                     timeout_s=self.config.timeout_s)
        return self._pool

    def score_items(self, responses: list[str], items: Sequence[Any], finish_reasons: list[str] | None = None):
        """Rewards for ``responses[i]``, the answer to ``items[i]``; a ``RewardResult`` whose
        outcomes are the functions' labels, ``timeout`` or ``error``."""
        t0 = time.monotonic()
        n = len(responses)
        if len(items) != n:
            raise ValueError(f"got {n} responses but {len(items)} items")
        reasons = list(finish_reasons) if finish_reasons is not None else ["stop"] * n
        if len(reasons) != n:
            raise ValueError(f"got {n} responses but {len(reasons)} finish reasons")
        tally = _Tally([0.0] * n, ["timeout"] * n)
        pool = self.pool
        restarts_before = pool.restarts
        outs = pool.map_within_budget(list(zip(responses, items, reasons)), self.config.batch_timeout_s, t0)
        over_budget = 0
        for i, res in enumerate(outs):
            if res is None:
                over_budget += 1
            elif res.status == "ok":
                tally.rewards[i], tally.outcomes[i] = float(res.value.reward), res.value.label
            else:
                tally.outcomes[i] = res.status
                if res.status == "error" and len(tally.errors) < 3:
                    tally.errors.append(res.error)
        counts = Counter(tally.outcomes)
        if counts["timeout"] or counts["error"]:
            first = tally.errors[0].splitlines()[0] if tally.errors else ""
            log.warning("reward %s: of %d calls %d timed out (timeout_s=%g%s) and %d failed%s; they score 0",
                        self.name, n, counts["timeout"], self.config.timeout_s,
                        f", {over_budget} past batch_timeout_s" if over_budget else "", counts["error"],
                        f" (first: {first})" if first else "")
        stats = {"timeout": 0, "error": 0, **counts, "n": n,
                 "mean_reward": sum(tally.rewards) / n if n else 0.0, "seconds": time.monotonic() - t0,
                 "worker_restarts": pool.restarts - restarts_before, "error_examples": tally.errors,
                 "over_budget": over_budget}
        return RewardResult(tally.rewards, tally.outcomes, [None] * n, stats)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "FunctionReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
