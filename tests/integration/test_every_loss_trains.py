"""Every policy loss the config accepts trains a step through the real loop: ``holderpo train`` on
the tiny CPU recipe (``examples/recipes/tiny-cpu.yaml``) with a tiny random Llama in place of
SmolLM2 and Megatron under gloo; the losses sample with the in-process transformers sampler
(``rollout.backend: transformers``: no engine start-up to pay seven times). A run through a CPU SGLang
engine at temperature 0.7 stays on-policy (the Actor scores at the rollout's temperature), and the
engine config the run started with is the one ``engine_config`` builds from the recipe (the same
builder ``holderpo eval`` uses).

The random model earns no reward, so every advantage is 0: a small entropy bonus gives each step a
non-zero gradient through the same loss function and schedule. That the policy losses' own gradients
are right at every layout is checked against transformers in tests/distributed/test_megatron_actor.py.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "recipes" / "tiny-cpu.yaml"

# (loss, its options) for every registered loss and every HölderPO variant
LOSSES = [("grpo", "{aggregation: seq-mean-token-mean}"), ("dr_grpo", "{}"), ("gspo", "{}"), ("gmpo", "{}"),
          ("holder", "{variant: seq}"), ("holder", "{variant: token}"), ("holder", "{variant: seq_tokclip}")]


def _overrides(model: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [f"model.hf_path={model}", f"output_dir={out}", f"name={name}", "data.prompt_template=plain",
            "data.answer_template=plain", "rollout.max_prompt_tokens=48", "rollout.max_new_tokens=8",
            "train.prompts_per_step=2", "rollout.group_size=4", "train.token_budget=256",
            "checkpoint.export_hf_at_end=false", "checkpoint.resume=false", "logging.progress=false", *extra]


def _train(overrides: list[str]) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "holderpo_megatron.cli", "train", "--config", str(RECIPE), *overrides],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("name="))
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss,options", LOSSES, ids=[f"{n}-{o.strip('{}').split(': ')[-1] or 'default'}"
                                                      for n, o in LOSSES])
def test_loss_trains_one_step_through_the_loop(tiny_model, tmp_path, loss, options):
    # one rank (TP1 x PP1) and the in-process transformers sampler (no SGLang start-up, ~20 s each): the
    # loss, not the layout or the engine, is under test here; the run at T 0.7 below goes through SGLang
    (rec,) = _train(_overrides(tiny_model, tmp_path, "loss", "train.steps=1", "parallel.pp=1",
                               "parallel.nproc_per_node=1", "rollout.backend=transformers",
                               f"algorithm.loss={loss}", f"algorithm.options={options}",
                               "algorithm.regularizers={entropy_coef: 0.01}"))
    assert rec["step"] == 1
    assert math.isfinite(rec["grad_norm"]) and rec["grad_norm"] > 0, rec
    assert rec["num_seqs"] == 8 and math.isfinite(rec["rho_mean"]), rec  # the loss saw every sample
    assert rec["weight_sync/bytes"] > 0 and rec["weight_sync/gb_per_s"] > 0, rec
    assert rec["lr"] == pytest.approx(2e-5)  # the optimizer's applied lr (the recipe's)


def test_temperature_07_stays_on_policy_and_engine_config_is_the_recipes(tiny_model, tmp_path):
    from holderpo_megatron.trainer.config import engine_config, load_run_config

    overrides = _overrides(tiny_model, tmp_path, "t07", "train.steps=2", "rollout.temperature=0.7")
    records = _train(overrides)  # the recipe's layout: DP2 over 2 ranks
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        # engine log-probs are log_softmax(logits / 0.7); so are the Actor's (2.33 nats when it scored at T=1)
        assert r["logprob_drift_max"] < 5e-3, r
    recorded = json.loads((tmp_path / "t07" / "sglang_logs" / "engine_config.json").read_text())
    expected = engine_config(load_run_config(RECIPE, overrides), tiny_model).to_dict()
    assert recorded == json.loads(json.dumps(expected, sort_keys=True, default=str))
