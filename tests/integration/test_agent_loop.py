"""Agent training on ALFWorld: real SGLang on CPU, real ALFWorld games in worker processes, a tiny
random Llama with SmolLM2's real tokenizer (so prompts and observations are real text).

1. Episodes -> training samples: the loss mask is zero on every observation token (the current
   one and those in the history), one exactly on the tokens the policy generated.
2. `holderpo train` for 2 steps on 4 games (TP1 x PP2 under gloo): completes; the metrics and the
   transcripts say what happened.
"""

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from tests.integration.tiny_llama import require_sglang, save_tiny_chat_llama

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("HOLDERPO_DATA", ROOT.parent / "shared" / "data")) / "alfworld"
if not (DATA / "json_2.1.1.tar.gz").is_file():
    pytest.skip(f"ALFWorld games not found at {DATA} (set HOLDERPO_DATA)", allow_module_level=True)
pytest.importorskip("alfworld", reason="alfworld is not installed (make test installs requirements-alfworld.txt)")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    require_sglang()
    return save_tiny_chat_llama(tmp_path_factory.mktemp("tiny_chat_llama"))


def test_observation_tokens_are_masked_and_generated_tokens_are_not(tiny_model):
    from transformers import AutoTokenizer

    from holderpo_megatron.envs.alfworld import AlfworldEnv, AlfworldEnvConfig, list_alfworld_games, prepare_alfworld_data
    from holderpo_megatron.envs.pool import EnvPool
    from holderpo_megatron.rollout import SamplingParams, SGLangEngine, SGLangEngineConfig
    from holderpo_megatron.rollout.agent import AgentConfig, run_agent_episodes
    from holderpo_megatron.trainer.batch import loss_mask
    from holderpo_megatron.trainer.agent_loop import chat_tokenizer, episodes_to_samples

    prepare_alfworld_data()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tokenize, detokenize = chat_tokenizer(tok)
    specs = [s for s in list_alfworld_games("valid_seen", limit=2) for _ in range(2)]
    cfg = AgentConfig(max_turns=3, history_length=2, think=False)
    engine = SGLangEngine(SGLangEngineConfig(model_path=str(tiny_model), dtype="float32", context_length=2048))
    try:
        with EnvPool(partial(AlfworldEnv, AlfworldEnvConfig(max_steps=3)), num_workers=2) as pool:
            episodes = run_agent_episodes(engine, pool, tokenize, detokenize, specs,
                                          SamplingParams(temperature=1.0, max_new_tokens=16, seed=1), cfg,
                                          max_prompt_tokens=1536)
    finally:
        engine.shutdown()
    assert len(episodes) == 4 and all(not e.failed for e in episodes)
    assert all(len(e.turns) == 3 for e in episodes)  # a random model wins nothing in 3 turns
    # random text is never an admissible action: every turn is invalid and penalised
    assert all(e.invalid_actions == 3 and e.reward == pytest.approx(-0.3) for e in episodes)

    out, _ = episodes_to_samples(episodes, group_size=2, estimator="grpo", token_budget=100_000)
    assert len(out) == 12 and out.trajectory == [k for k in range(4) for _ in range(3)]
    checked = 0
    for k, e in enumerate(episodes):
        for j, t in enumerate(e.turns):
            i = 3 * k + j
            seq, start = out.sequences[i], out.response_start[i]
            mask = loss_mask(len(seq), start)
            # tokens x_1..x_{n-1}: masked exactly where they are not the policy's own output
            assert seq[start:] == t.output_ids
            assert mask.tolist() == [p >= len(t.prompt_ids) for p in range(1, len(seq))]
            # every observation the prompt shows (the history's and the current one) sits in the prompt
            rendered = tok.decode(t.prompt_ids)
            enc = tok(rendered, return_offsets_mapping=True, add_special_tokens=False)
            assert enc["input_ids"] == t.prompt_ids
            # the observation before turn m: the first one, then what each turn's action brought
            before = [e.first_observation] + [u.observation for u in e.turns]
            for obs in (before[m].strip() for m in range(max(0, j - cfg.history_length), j + 1)):
                at = rendered.find(obs)
                assert obs and at >= 0, f"observation {obs!r} not in the prompt of turn {j}"
                toks = [q for q, (a, b) in enumerate(enc["offset_mapping"]) if a < at + len(obs) and b > at]
                # the token at position q is predicted at mask index q-1: all masked
                assert toks and not any(mask[q - 1] for q in toks if q >= 1)
                checked += len(toks)
    assert checked > 500, checked


def test_two_training_steps_on_four_games(tiny_model, tmp_path):
    out = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "holderpo_megatron.cli", "train", "--config",
           str(ROOT / "examples/recipes/alfworld-tiny-cpu.yaml"), f"output_dir={out}", f"model.hf_path={tiny_model}",
           "agent.games_limit=4", "train.prompts_per_step=2", "rollout.group_size=2", "agent.play.max_turns=2",
           "rollout.max_new_tokens=12", "checkpoint.export_hf_at_end=true"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    run = out / "alfworld-tiny-cpu"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("agent/success_rate", "agent/turns_mean", "agent/invalid_actions_mean", "agent/env_failures",
                    "reward_mean", "grad_norm", "rho_mean", "logprob_drift_max", "time/rollout", "time/train"):
            assert key in r, (key, sorted(r))
        assert r["agent/env_failures"] == 0 and r["agent/turns_mean"] == 2
        assert r["logprob_drift_max"] < 5e-3
        assert torch.isfinite(torch.tensor(r["grad_norm"]))
    transcripts = sorted((run / "transcripts").glob("step_*.jsonl"))
    assert [p.name for p in transcripts] == ["step_000001.jsonl", "step_000002.jsonl"]
    eps = [json.loads(line) for line in transcripts[0].read_text().splitlines()]
    assert len(eps) == 4 and all(len(e["steps"]) == 2 and e["task"] for e in eps)
    assert all(s["observation"] for e in eps for s in e["steps"])
    assert (run / "hf" / "config.json").is_file()


def test_holderpo_eval_for_agents_writes_summary_table_and_transcripts(tiny_model, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "holderpo_megatron.cli", "eval", "--config",
           str(ROOT / "examples/recipes/alfworld-tiny-cpu.yaml"), f"model.hf_path={tiny_model}", "agent.eval_limit=3",
           "agent.play.max_turns=2", "rollout.max_new_tokens=8", f"output_dir={tmp_path / 'runs'}", "--out",
           str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    # the engine eval started is configured by the builder training uses, from the same recipe
    from holderpo_megatron.trainer.config import engine_config, load_run_config

    recorded = json.loads((tmp_path / "runs" / "alfworld-tiny-cpu" / "sglang_logs" / "engine_config.json").read_text())
    cfg = load_run_config(cmd[cmd.index("--config") + 1], cmd[cmd.index("--config") + 2: cmd.index("--out")])
    assert recorded == json.loads(json.dumps(engine_config(cfg, tiny_model).to_dict(), sort_keys=True, default=str))
    summary = json.loads((tmp_path / "summary.json").read_text())["valid_seen"]
    assert summary["episodes"] == 3 and summary["env_failures"] == 0
    assert summary["success_rate"] == 0.0 and summary["ci95"][0] == 0.0 and 0.4 < summary["ci95"][1] < 0.7
    assert len(summary["per_task_type"]) == 3  # list_alfworld_games takes the task types in turn
    episodes = [json.loads(line) for line in (tmp_path / "valid_seen.jsonl").read_text().splitlines()]
    assert len(episodes) == 3 and all(len(e["steps"]) == 2 and e["first_observation"] for e in episodes)
    assert "| valid_seen | 3 | 0.0 |" in (tmp_path / "results.md").read_text()
