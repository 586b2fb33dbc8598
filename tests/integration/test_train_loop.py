"""The whole loop for 3 steps: Megatron TP2 under gloo + SGLang on CPU + a tiny random Llama.

Checks the metrics file has every field, the weights changed, and the engine's log-probs after each
sync agree with Megatron's re-scoring (drift). (Bitwise resume of model + optimizer + RNG is tested
at the Actor level in tests/distributed/test_train_state.py.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

FIELDS = ["reward_mean", "accuracy", "response_length_mean", "p", "rho_mean", "rho_min", "rho_max", "clip_frac",
          "entropy", "kl", "grad_norm", "logprob_drift_mean", "logprob_drift_max", "time/rollout", "time/score",
          "time/train", "time/sync"]


def _check_host_memory(run_dir: Path, records: list[dict]) -> None:
    """Every step carries each rank's RSS and peak RSS (gathered to rank 0) and the embedded engine's RSS;
    each rank's record in run_dir/ranks/ is its last step's, the one the metrics carry."""
    from holderpo_megatron.observability.host_memory import read_rank_records

    for r in records:
        for rank in (0, 1):
            assert 0.05 < r[f"host/rss_gib/rank{rank}"] <= r[f"host/rss_peak_gib/rank{rank}"] < 64, r
        assert r["host/rss_peak_gib/max"] == max(r["host/rss_peak_gib/rank0"], r["host/rss_peak_gib/rank1"])
        assert r["host/engine_rss_gib"] > 0.1, r  # SGLang's scheduler: a child process of rank 0
    ranks = read_rank_records(run_dir)
    assert sorted(ranks) == [0, 1] and ranks[0].pid != ranks[1].pid
    last = records[-1]
    for rank, rec in ranks.items():
        assert rec.step == last["step"]
        assert rec.peak_rss_gib == last[f"host/rss_peak_gib/rank{rank}"] and rec.rss_gib == last[f"host/rss_gib/rank{rank}"]


def _recipe(tmp: Path, model: Path, steps: int, out: Path) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(f"""
name: loop
output_dir: {out}
hardware: test
model: {{hf_path: {model}, dtype: fp32}}
parallel: {{tp: 2, pp: 1, nproc_per_node: 2}}
rollout: {{group_size: 4, temperature: 1.0, max_prompt_tokens: 48, max_new_tokens: 12, weight_sync: tensor}}
algorithm:
  loss: holder
  regularizers: {{kl_coef: 0.01, entropy_coef: 0.01}}
  p_schedule: {{kind: linear_dec, p_min: -1.0, p_max: 2.0, schedule_steps: {steps}}}
train: {{steps: {steps}, prompts_per_step: 4, minibatches_per_step: 2, token_budget: 256, optimizer: {{lr: 1.0e-3}}, seed: 3}}
data: {{train: arithmetic, arithmetic_max_operand: 9, prompt_template: plain, reward: exact_int, answer_template: plain}}
checkpoint: {{every: 1, keep_last: 2, export_hf_at_end: true}}
logging: {{tensorboard: false, progress: false}}
""")
    return path


def _train(recipe: Path, *overrides, env=None, check=True):
    env = dict(os.environ, **(env or {}), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "holderpo_megatron.cli", "train", "--config", str(recipe), *overrides],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    return res


def test_three_steps_metrics_weights_and_drift(tiny_model, tmp_path):
    out = tmp_path / "runs"
    _train(_recipe(tmp_path, tiny_model, 3, out))
    records = [json.loads(line) for line in (out / "loop" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        missing = [f for f in FIELDS if f not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        # the engine samples with the weights Megatron re-scores: fp32 on both sides
        assert r["logprob_drift_max"] < 5e-3, r
    assert records[0]["p"] == 2.0 and records[-1]["p"] < records[0]["p"]
    _check_host_memory(out / "loop", records)
    from safetensors.torch import load_file

    before = load_file(str(tiny_model / "model.safetensors"))
    after = {}
    for f in sorted((out / "loop" / "hf").glob("*.safetensors")):
        after.update(load_file(str(f)))
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, changed

    # the same command again: the run is complete and exported, so nothing starts
    res = _train(_recipe(tmp_path, tiny_model, 3, out))
    assert "is complete: its last state step_00000003 is step 3 of train.steps=3" in res.stdout, res.stdout
    assert "launching" not in res.stdout
    # trained further, it resumes and replaces its own export (atomically) instead of failing on it
    res = _train(_recipe(tmp_path, tiny_model, 4, out))
    assert "resuming" in res.stdout and "step 3 of 4" in res.stdout, res.stdout[-3000:]
    assert [json.loads(x)["step"] for x in (out / "loop" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    again = {}
    for f in sorted((out / "loop" / "hf").glob("*.safetensors")):
        again.update(load_file(str(f)))
    assert set(again) == set(before) and any(not torch.equal(after[k], again[k]) for k in after)
