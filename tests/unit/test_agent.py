"""Agent pieces without an engine: action parsing, prompts within budget, episodes -> samples, CI."""

import math

import pytest
import torch

from holderpo_megatron.envs.interface import EpisodeSpec
from holderpo_megatron.eval.agent_eval import summarise_episodes, wilson_interval
from holderpo_megatron.rollout.agent import AgentConfig, AgentTurn, Episode, build_agent_prompt, parse_action
from holderpo_megatron.trainer.batch import RolloutBatch
from holderpo_megatron.trainer.agent_loop import episodes_to_samples


@pytest.mark.parametrize("text, want", [
    ("<think>the apple is in the fridge</think><action>go to fridge 1</action>", "go to fridge 1"),
    ("<action>open  fridge 1\n</action> trailing", "open fridge 1"),
    ("<action>take apple</action> then <action>go to desk 1</action>", "go to desk 1"),  # the last one counts
    ("<ACTION>look</ACTION>", "look"),
    ("<action>go to sofa 1", "go to sofa 1"),  # cut off by max_new_tokens: close tag missing
    ("go to fridge 1", None),
    ("<action>   </action>", None),
    ("", None),
])
def test_parse_action(text, want):
    assert parse_action(text) == want


def test_prompt_holds_task_history_observation_and_actions():
    p = build_agent_prompt("put a clean apple in the fridge", "You see a fridge 1.", ["go to fridge 1", "look"],
                           [("You are in a room.", "look")], turn=3)
    assert "Your task is to: put a clean apple in the fridge" in p
    assert "[Step 3] Observation: You are in a room." in p and "[Step 3] Action: look" in p
    assert "You are now at step 4. Current observation: You see a fridge 1." in p
    assert "'go to fridge 1', 'look'" in p and "<think>" in p and "<action>" in p
    assert "<think>" not in build_agent_prompt("t", "o", ["look"], [], turn=0, think=False)


@pytest.mark.parametrize("field, value", [("max_turns", 0), ("history_length", -1),
                                          ("win_reward", -1.0), ("invalid_penalty", math.nan)])
def test_agent_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        AgentConfig(**{field: value})


def test_agent_episodes_reject_a_tiny_prompt_budget():
    from holderpo_megatron.rollout.agent import run_agent_episodes
    from holderpo_megatron.rollout.interface import SamplingParams

    with pytest.raises(ValueError, match="max_prompt_tokens=8 is invalid; allowed: an int >= 16"):
        run_agent_episodes(None, None, None, None, [], SamplingParams(), AgentConfig(), max_prompt_tokens=8)


def test_episode_reward():
    cfg = AgentConfig(win_reward=10.0, invalid_penalty=0.1)
    assert cfg.episode_reward(True, 3) == pytest.approx(9.7)
    assert cfg.episode_reward(False, 2) == pytest.approx(-0.2)


def _turn(prompt_len: int, out_len: int, base: int = 0) -> AgentTurn:
    return AgentTurn(list(range(base, base + prompt_len)), list(range(100, 100 + out_len)),
                     torch.full((out_len,), -0.5), "stop", "r", "a", True)


def _episode(reward: float, turns: list[AgentTurn], failed: bool = False) -> Episode:
    return Episode(EpisodeSpec("g"), turns=turns, reward=reward, failed=failed, won=reward > 5)


def test_episodes_to_samples_group_advantages_trajectories_and_masks():
    # two games x group 2; game 1's second play failed in the environment
    eps = [_episode(10.0, [_turn(5, 3), _turn(7, 2)]), _episode(0.0, [_turn(5, 4)]),
           _episode(9.9, [_turn(6, 2)]), _episode(0.0, [_turn(6, 2)], failed=True)]
    out, dropped = episodes_to_samples(eps, group_size=2, estimator="grpo", token_budget=100)
    assert out.trajectory == [0, 0, 1, 2] and dropped == 0  # the failed episode is not trained on
    a = out.advantages
    assert a[0] == a[1] > 0 > a[2] and a[3] == 0.0  # a group of one (after the failure) carries no signal
    assert out.response_start == [5, 7, 5, 6]
    batch = out.to_batch([torch.zeros(len(s) - 1) for s in out.sequences])
    assert batch.units() == [[0, 1], [2], [3]]
    assert batch.select([[2], [0, 1]]).trajectory == [1, 0, 0]
    # the DP share keeps whole trajectories: rank 0 of 2 gets trajectories 0 and 2, rank 1 gets 1
    assert out.share(0, 2).trajectory == [0, 0, 2] and out.share(1, 2).trajectory == [1]
    assert out.trim_to_multiple(2).trajectory == [0, 0, 1]


def test_long_trajectory_keeps_its_most_recent_turns_that_fit():
    eps = [_episode(10.0, [_turn(10, 5, base=k) for k in range(4)]), _episode(0.0, [_turn(10, 5)])]
    out, dropped = episodes_to_samples(eps, group_size=2, estimator="grpo", token_budget=31)
    assert dropped == 2
    assert [s[0] for s in out.sequences[:2]] == [2, 3]  # turns 3 and 4 of the first episode, in order


def test_rollout_batch_rejects_turns_with_different_advantages():
    with pytest.raises(ValueError, match="trajectory 0"):
        RolloutBatch([[1, 2, 3], [1, 2, 3]], [1, 1], [torch.zeros(2)] * 2, torch.tensor([1.0, 2.0]), trajectory=[0, 0])


def test_wilson_interval_and_summary():
    lo, hi = wilson_interval(131, 140)  # e.g. 93.6% of valid_seen
    assert lo < 131 / 140 < hi and 0.88 < lo < 0.9 and 0.96 < hi < 0.98
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)
    eps = [Episode(EpisodeSpec("a", "pick"), won=True), Episode(EpisodeSpec("b", "pick")),
           Episode(EpisodeSpec("c", "heat"), won=True)]
    s = summarise_episodes(eps)
    assert s["success_rate"] == pytest.approx(2 / 3)
    assert s["per_task_type"] == {"heat": {"episodes": 1, "success_rate": 1.0},
                                  "pick": {"episodes": 2, "success_rate": 0.5}}
