"""Reward functions for tests/unit/test_rewards_custom.py, at module level so they travel to the
pool's workers by reference; no pytest import, so a (re)started worker imports this quickly."""

import os
import time

from holderpo_megatron.rewards import RewardScore


def length_score(completion, item, finish_reason):
    """Plain float: 1.0 when the completion names the item's first gold answer."""
    return float(item.answers[0] in completion)


def labelled(completion, item, finish_reason):
    if finish_reason == "length":
        return RewardScore(-1.0, "cut_off")
    return RewardScore(0.25, "seen") if item.row.get("flag") else 0.5


def hang_or_raise(completion, item, finish_reason):
    """"HANG" sleeps an hour, "BOOM" raises, "BAD" returns a string, "DIE" kills its worker."""
    if completion == "HANG":
        time.sleep(3600)
    if completion == "BOOM":
        raise RuntimeError("user reward exploded")
    if completion == "BAD":
        return "1.0"
    if completion == "DIE":
        os._exit(3)
    return 1.0


async def async_score(completion, item, finish_reason):
    return 0.75 if completion.endswith("!") else 0.0


def worker_pid(completion, item, finish_reason):
    return float(os.getpid())


def two_args(completion, item):
    return 0.0


not_a_module_function = lambda completion, item, finish_reason: 0.0  # noqa: E731
