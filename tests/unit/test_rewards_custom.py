"""Rewards of one's own: import paths and the registry, checked at start-up; run in the timeout
worker pool, where a hanging, raising or dying function is a counted outcome, never a stalled batch."""

import os
import time
from pathlib import Path

import pytest

from holderpo_megatron.data.datasets import MathItem
from holderpo_megatron.rewards import (FunctionReward, RewardConfig, RewardScore, build_reward, register_reward,
                                       resolve_reward, reward_names)

ROOT = Path(__file__).resolve().parents[2]
FNS = "tests.unit.reward_fns"


def _item(answer="7", **row):
    return MathItem(problem="p", answers=(answer,), row={"answer": answer, **row})


def test_import_path_reward_runs_in_worker_processes():
    with build_reward(RewardConfig(kind=f"{FNS}:worker_pid", timeout_s=5, workers=2)) as reward:
        res = reward.score_items(["a", "b", "c"], [_item()] * 3)
    pids = {int(r) for r in res.rewards}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert res.outcomes == ["scored"] * 3 and res.stats["scored"] == 3


def test_floats_labels_async_and_the_whole_row_reach_the_result():
    with build_reward(RewardConfig(kind=f"{FNS}:labelled", timeout_s=5)) as reward:
        res = reward.score_items(["x", "y", "z"], [_item(flag=True), _item(), _item()], ["stop", "stop", "length"])
    assert res.rewards == [0.25, 0.5, -1.0] and res.outcomes == ["seen", "scored", "cut_off"]
    assert res.stats["mean_reward"] == pytest.approx(-0.25 / 3)
    with build_reward(RewardConfig(kind=f"{FNS}:async_score", timeout_s=5, workers=1)) as reward:
        assert reward.score_items(["yes!", "no"], [_item()] * 2).rewards == [0.75, 0.0]


def test_hanging_raising_dying_and_bad_returns_are_counted_and_the_batch_completes(caplog):
    timeout = 1.0
    texts = ["ok", "HANG", "BOOM", "BAD", "DIE", "HANG", "ok"]
    with build_reward(RewardConfig(kind=f"{FNS}:hang_or_raise", timeout_s=timeout, workers=2)) as reward:
        reward.score_items(["warm", "warm"], [_item()] * 2)  # workers started outside the timed part
        t0 = time.monotonic()
        res = reward.score_items(texts, [_item()] * len(texts))
        wall = time.monotonic() - t0
        assert res.outcomes == ["scored", "timeout", "error", "error", "error", "timeout", "scored"]
        assert res.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert res.stats["timeout"] == 2 and res.stats["error"] == 3 and res.stats["worker_restarts"] == 3
        assert any("user reward exploded" in e for e in res.stats["error_examples"])
        assert any("must return a number or a RewardScore, got str" in e for e in res.stats["error_examples"])
        # two hangs on two workers overlap: about one timeout, plus the replacements' start-ups
        assert timeout <= wall < timeout + 15.0, wall
        assert reward.score_items(["ok"], [_item()]).rewards == [1.0]  # the replaced workers serve on
    assert "timed out" in caplog.text and "user reward exploded" in caplog.text


def test_a_batch_budget_bounds_a_batch_of_hanging_calls():
    with build_reward(RewardConfig(kind=f"{FNS}:hang_or_raise", timeout_s=1.0, workers=2,
                                   batch_timeout_s=1.5)) as reward:
        reward.score_items(["warm", "warm"], [_item()] * 2)
        t0 = time.monotonic()
        res = reward.score_items(["HANG"] * 12, [_item()] * 12)
        wall = time.monotonic() - t0
    assert res.outcomes == ["timeout"] * 12 and res.stats["over_budget"] >= 6
    assert wall < 1.5 + 1.0 + 10.0, wall


def test_a_file_path_reward_imports_in_the_workers_too(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # a file path is relative to the working directory
    spec = "examples/custom_task/keyword_reward.py:score"
    item = MathItem(problem="capital?", answers=("Paris",), row={"keyword": "Paris", "max_words": 4})
    with build_reward(RewardConfig(kind=spec, timeout_s=5, workers=1)) as reward:
        res = reward.score_items(["Paris.", "It is Paris, I think, yes.", "Lyon.", "Paris"], [item] * 4,
                                 ["stop", "stop", "stop", "length"])
    assert res.rewards == [1.0, 0.5, 0.5, 0.0]
    assert res.outcomes == ["ok", "too_long", "no_keyword", "truncated"]


@pytest.mark.parametrize("kind,match", [
    ("bleu", r"unknown reward 'bleu'; allowed: \['exact_int', 'math'.*import path"),
    ("no_such_pkg.mod:score", r"module 'no_such_pkg.mod' does not import"),
    (f"{FNS}:missing", r"tests.unit.reward_fns has no 'missing' \(its functions: .*labelled"),
    (f"{FNS}:two_args", r"must take \(completion, item, finish_reason\); its signature is two_args\(completion, item\)"),
    (f"{FNS}:not_a_module_function", r"must be a module-level function"),
    ("examples/custom_task/nope.py:score", r"no file .*nope.py"),
    (f"{FNS}:", r"is not an import path"),
    (f"{FNS}:RewardScore", r"must take \(completion, item, finish_reason\)"),
])
def test_bad_reward_names_fail_at_start_up_naming_what_is_wrong(kind, match, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=match):
        RewardConfig(kind=kind)


def test_a_module_that_raises_on_import_is_named(tmp_path):
    bad = tmp_path / "broken_reward_mod.py"
    bad.write_text("raise ImportError('needs a package you do not have')\ndef score(c, i, f): return 0.0\n")
    with pytest.raises(ValueError, match=r"importing broken_reward_mod raised ImportError: needs a package"):
        resolve_reward(f"{bad}:score")


def test_register_reward_adds_a_name_the_config_accepts(monkeypatch):
    from holderpo_megatron.rewards import registry
    from tests.unit import reward_fns

    monkeypatch.setattr(registry, "_REWARDS", dict(registry._REWARDS))  # registered for this test only
    name = "test_length_score"
    register_reward(name)(reward_fns.length_score)
    assert name in reward_names() and not resolve_reward(name).needs_answers
    with pytest.raises(ValueError, match="already registered"):
        register_reward(name)(reward_fns.length_score)
    with pytest.raises(ValueError, match="cannot be empty or hold ':'"):
        register_reward("a:b")(reward_fns.length_score)
    with pytest.raises(ValueError, match="must take"):
        register_reward("test_two_args")(reward_fns.two_args)
    with build_reward(RewardConfig(kind=name, timeout_s=5, workers=1)) as reward:
        assert isinstance(reward, FunctionReward)
        assert reward.score_items(["it is 7", "8"], [_item("7")] * 2).rewards == [1.0, 0.0]
    assert resolve_reward("math").needs_answers and resolve_reward("exact_int").needs_answers


def test_builtin_rewards_score_items_by_their_gold_answers():
    items = [MathItem(problem="1+1", answers=("2",)), MathItem(problem="2+2", answers=("4", "5"))]
    res = build_reward(RewardConfig(kind="exact_int")).score_items(["so 2", "5", "3"], items + items[:1])
    assert res.rewards == [1.0, 1.0, 0.0] and res.outcomes == ["correct", "correct", "wrong"]
    with build_reward(RewardConfig(kind="math", template="qwen_math", workers=1)) as reward:  # any gold counts
        res = reward.score_items([r"\boxed{four}", r"\boxed{2}"], [MathItem("2+2", ("4", "four")), items[0]])
    assert res.rewards == [1.0, 1.0]


def test_reward_score_checks_its_fields():
    with pytest.raises(ValueError, match="finite number"):
        RewardScore(float("nan"))
    with pytest.raises(ValueError, match="label must be"):
        RewardScore(1.0, "has space")


def test_the_example_recipe_validates_and_bad_data_keys_are_named(monkeypatch):
    from holderpo_megatron.trainer.config import ConfigError, load_run_config

    monkeypatch.chdir(ROOT)
    recipe = "examples/custom_task/recipe.yaml"
    cfg = load_run_config(recipe)
    assert cfg.data.row_fields.prompt == "instruction" and cfg.data.row_fields.answer == "keyword"
    assert load_run_config(recipe, ["data.answer_key=null"]).data.row_fields.answer is None
    with pytest.raises(ConfigError, match=r"data.answer_key is null .* data.reward 'exact_int' grades against answers"):
        load_run_config(recipe, ["data.answer_key=null", "data.reward=exact_int"])
    with pytest.raises(ConfigError, match=r"data.prompt_key/answer_key/split: RowFields.prompt must be a non-empty"):
        load_run_config(recipe, ["data.prompt_key=''"])
    with pytest.raises(ConfigError, match=r"data.reward: reward '.*keyword_reward.py:nope'"):
        load_run_config(recipe, ["data.reward=examples/custom_task/keyword_reward.py:nope"])
