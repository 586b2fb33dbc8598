"""Outcome rewards: final-answer extraction and math verification (imports nothing of ours).

    from holderpo_megatron.rewards import MathReward
    with MathReward(template="qwen_math", timeout_s=5.0, workers=2) as reward:
        res = reward.score(responses, [item.answers for item in items], finish_reasons)

Your own reward: ``data.reward: my_pkg.my_module:score`` (rewards/custom.py has the signature),
or ``@register_reward("name")``; ``build_reward(RewardConfig(kind=...))`` makes any of them.
"""

from holderpo_megatron.rewards.extract import (ANSWER_TEMPLATES, extract_answer, extract_boxed,
                                               extract_last_integer, extract_last_number, extract_r1)
from holderpo_megatron.rewards.custom import FunctionReward, RewardScore, load_reward_function
from holderpo_megatron.rewards.math import (OUTCOMES, REWARD_KINDS, ExactIntReward, MathReward, Reward,
                                            RewardConfig, RewardResult)
from holderpo_megatron.rewards.pool import CallOutcome, TimeoutPool
from holderpo_megatron.rewards.registry import RewardSpec, build_reward, register_reward, resolve_reward, reward_names
from holderpo_megatron.rewards.verifier import math_verify_any, same_answer_text

__all__ = [
    "ANSWER_TEMPLATES", "extract_answer", "extract_boxed", "extract_last_integer", "extract_last_number",
    "extract_r1", "OUTCOMES", "REWARD_KINDS", "ExactIntReward", "MathReward", "Reward", "RewardConfig",
    "RewardResult", "build_reward", "CallOutcome", "TimeoutPool", "math_verify_any", "same_answer_text",
    "FunctionReward", "RewardScore", "load_reward_function", "RewardSpec", "register_reward", "resolve_reward",
    "reward_names",
]
