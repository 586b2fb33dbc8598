"""The example task of your own (examples/custom_task: a JSONL with its own field names, a reward
function of its own, a recipe) trains through ``holderpo train``: its recipe, with a tiny random
Llama in place of SmolLM2 (so the raw ``plain`` prompt template: the tiny tokenizer has no chat
template), Megatron under gloo and the in-process transformers sampler (``rollout.backend:
transformers``: the reward, not the engine, is under test; no engine start-up to pay), 2 steps.

The reward is the example's, wrapped to hang on one row and raise on another (both in the first
step's batch: the data is not shuffled): each costs a counted outcome in that step's metrics, and
both steps complete. A hang that ran in the trainer's process would stall the run; it cannot
finish unless the function runs in the timeout worker pool.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.tiny_llama import save_tiny_llama

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "custom_task" / "recipe.yaml"
EXAMPLE_LABELS = {"ok", "too_long", "no_keyword", "neither", "truncated"}


def _train(*overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "holderpo_megatron.cli", "train", "--config", str(RECIPE), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_example_task_trains_with_a_hanging_and_a_raising_reward_counted(tmp_path):
    model = save_tiny_llama(tmp_path / "tiny_llama")
    out = tmp_path / "runs"
    res = _train(f"model.hf_path={model}", f"output_dir={out}", "train.steps=2", "rollout.group_size=4",
                 "rollout.backend=transformers", "rollout.max_new_tokens=8", "train.token_budget=256",
                 "data.prompt_template=plain", "data.shuffle=false", "data.reward=tests.integration.custom_task_rewards:hang_raise_or_keyword",
                 "data.reward_timeout_s=1.0", "logging.progress=false")
    log = res.stdout + res.stderr
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    records = [json.loads(line) for line in (out / "custom-task" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    first, second = records
    # step 1: rows 0-3, 4 samples each; row 0's hang and row 1's raise, every sample of them
    assert first["reward_timeouts"] == 4 and first["reward_errors"] == 4, first
    assert first["reward_label/timeout"] == 0.25 and first["reward_label/error"] == 0.25, first
    assert second["reward_timeouts"] == 0 and second["reward_errors"] == 0, second
    for r in records:
        labels = {k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("reward_label/")}
        assert math.isclose(sum(labels.values()), 1.0), labels
        assert set(labels) - {"timeout", "error"} <= EXAMPLE_LABELS, labels  # the example reward's labels
        assert math.isfinite(r["grad_norm"]) and 0.0 <= r["reward_mean"] <= 1.0, r
    assert "timed out" in log and "custom reward raised on purpose" in log, log[-3000:]


def test_a_reward_that_does_not_import_fails_before_launch(tmp_path):
    res = _train(f"output_dir={tmp_path}", "data.reward=examples/custom_task/keyword_reward.py:nope")
    assert res.returncode != 0
    assert "data.reward: reward 'examples/custom_task/keyword_reward.py:nope': keyword_reward has no 'nope' " \
           "(its functions: score)" in res.stderr, res.stderr[-2000:]
    assert "launching" not in res.stdout
