"""The example task's reward (examples/custom_task/keyword_reward.py), wrapped to hang on row 0 and
raise on row 1: what tests/integration/test_custom_task.py trains with. No pytest import: the
reward's worker processes import this module."""

import time
from pathlib import Path

from holderpo_megatron.rewards import load_reward_function

_keyword_score = load_reward_function(
    f"{Path(__file__).resolve().parents[2] / 'examples' / 'custom_task' / 'keyword_reward.py'}:score")


def hang_raise_or_keyword(completion, item, finish_reason):
    if item.index == 0:
        time.sleep(3600)
    if item.index == 1:
        raise RuntimeError("custom reward raised on purpose")
    return _keyword_score(completion, item, finish_reason)
