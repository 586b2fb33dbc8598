"""Resume after kill -9: the whole loop (Megatron TP2 under gloo + SGLang on CPU + a tiny random Llama).

Run A goes 3 steps uninterrupted. Run B is killed with SIGKILL right after step 2 (its step-2
checkpoint committed), resumed, killed again while step 3's checkpoint is half-written, and resumed
once more: the half-written state is removed, never loaded, and step 3 is redone from step 2.
After step 3, B's model and optimizer state and data position equal A's, bit for bit.

Rollouts use top_k=1 (greedy): SGLang's per-request sampling seeds need its deterministic-inference
mode, which needs a GPU attention backend, so sampled rollouts on CPU cannot repeat after a restart.
With greedy rollouts, any difference left after resume is a difference of restored state.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp: Path, model: Path, out: Path) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(f"""
name: resume
output_dir: {out}
hardware: test
model: {{hf_path: {model}, dtype: fp32}}
parallel: {{tp: 2, pp: 1, nproc_per_node: 2}}
rollout: {{group_size: 2, top_k: 1, max_prompt_tokens: 48, max_new_tokens: 8, weight_sync: tensor}}
algorithm:
  loss: holder
  regularizers: {{entropy_coef: 0.05}}
  p_schedule: {{kind: linear_dec, p_min: -1.0, p_max: 2.0, schedule_steps: 3}}
train: {{steps: 3, prompts_per_step: 4, minibatches_per_step: 2, token_budget: 256, optimizer: {{lr: 1.0e-3}}, seed: 5}}
data: {{train: arithmetic, arithmetic_max_operand: 9, prompt_template: plain, reward: exact_int, answer_template: plain}}
checkpoint: {{every: 1, keep_last: 3, export_hf_at_end: false}}
logging: {{tensorboard: false, progress: false}}
""")
    return path


def _train(recipe: Path, log: Path, *overrides, env=None) -> int:
    """Run `holderpo train` in its own session; afterwards kill whatever of it is left (a SIGKILLed
    rank leaves SGLang's scheduler and multiprocessing helpers behind)."""
    env = dict(os.environ, **(env or {}), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "holderpo_megatron.cli", "train", "--config", str(recipe),
                                 *overrides], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=900)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return rc


def _state(step_dir: Path) -> dict:
    """A torch_dist (DCP) training state as one flat dict of tensors, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = step_dir.parent / f"{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, flat)
    return torch.load(flat, weights_only=False)


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), obj


def _records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_kill9_after_step_and_during_checkpoint_then_resume_equals_uninterrupted(tiny_model, tmp_path):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    (tmp_path / "ra").mkdir()
    rc = _train(_recipe(tmp_path / "ra", tiny_model, out_a), tmp_path / "a.log")
    assert rc == 0, (tmp_path / "a.log").read_text()[-6000:]

    recipe_b = _recipe(tmp_path, tiny_model, out_b)
    ckpt = out_b / "resume" / "checkpoints"
    rc = _train(recipe_b, tmp_path / "b1.log", env={"HOLDERPO_KILL_AFTER_STEP": "2"})
    assert rc != 0, "the run was to be killed after step 2"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"

    rc = _train(recipe_b, tmp_path / "b2.log", "--resume", env={"HOLDERPO_KILL_DURING_SAVE": "3"})
    assert rc != 0, "the run was to be killed while writing step 3"
    log2 = (tmp_path / "b2.log").read_text()
    assert "resumed from" in log2 and "at step 2" in log2, log2[-4000:]
    half = ckpt / ".incomplete.step_00000003"
    assert half.is_dir() and any(half.rglob("*.distcp")), "step 3's checkpoint should be half-written"
    assert (ckpt / "latest").read_text().strip() == "step_00000002"

    rc = _train(recipe_b, tmp_path / "b3.log", "--resume")
    log3 = (tmp_path / "b3.log").read_text()
    assert rc == 0, log3[-6000:]
    assert "at step 2" in log3 and ".incomplete.step_00000003" in log3, log3[-4000:]
    assert not half.exists()

    a_dir, b_dir = out_a / "resume" / "checkpoints" / "step_00000003", ckpt / "step_00000003"
    marker_a, marker_b = (json.loads((d / "train_state.json").read_text()) for d in (a_dir, b_dir))
    assert marker_a["extra"] == marker_b["extra"]  # data-loader position and schedule state
    sa, sb = dict(_flatten(_state(a_dir))), dict(_flatten(_state(b_dir)))
    assert set(sa) == set(sb)
    tensors = [k for k, v in sa.items() if torch.is_tensor(v)]
    model_keys = [k for k in tensors if not k.startswith("optimizer.")]
    assert model_keys and any("exp_avg_sq" in k for k in tensors), sorted(tensors)
    differ = [k for k in tensors if not torch.equal(sa[k], sb[k])]
    assert not differ, f"after resume these differ from the uninterrupted run: {differ[:10]}"
    # and the model did move during the run (the comparison is not between two untouched copies)
    s1 = dict(_flatten(_state(out_a / "resume" / "checkpoints" / "step_00000001")))
    assert any(not torch.equal(s1[k], sa[k]) for k in model_keys)

    ra, rb = _records(out_a / "resume"), _records(out_b / "resume")
    assert sorted(rb) == [1, 2, 3]  # the killed attempt's step-3 record was dropped, then redone
    for key in ("reward_mean", "response_length_mean", "p", "entropy", "grad_norm"):
        if key in ra[3]:
            assert ra[3][key] == rb[3][key], (key, ra[3][key], rb[3][key])
