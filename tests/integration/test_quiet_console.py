"""A 1-step `holderpo train` (the tiny CPU recipe with a tiny random Llama; Megatron under gloo, the
embedded CPU SGLang engine) keeps its console to our lines: the torchrun command, where the log
is, progress and our INFO lines. Third-party import chatter (SGLang's model registry, Apex/AWQ/GGUF
UserWarnings, CUDA-graph and RLIMIT notices), from the worker and from the engine's scheduler
process, lands in RUN_DIR/run.log instead.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.tiny_llama import require_sglang, save_tiny_llama

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "recipes" / "tiny-cpu.yaml"
NOISE = ["UserWarning", "Ignore import error", "Apex is not installed", "GGUF", "CUDA graph", "Cuda graph", "RLIMIT"]


def _train(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [f"model.hf_path={model}", f"output_dir={out}", "name=quiet", "data.prompt_template=plain",
                 "data.answer_template=plain", "rollout.max_prompt_tokens=48", "rollout.max_new_tokens=8",
                 "train.prompts_per_step=2", "rollout.group_size=4", "train.token_budget=256", "train.steps=1",
                 "parallel.pp=1", "parallel.nproc_per_node=1", "checkpoint.export_hf_at_end=false", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "holderpo_megatron.cli", "train", "--config", str(RECIPE), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_a_one_step_run_prints_progress_and_results_and_leaves_third_party_noise_in_the_log(tmp_path):
    require_sglang()
    model = save_tiny_llama(tmp_path / "model")
    res = _train(model, tmp_path / "runs")
    console = res.stdout + res.stderr
    assert res.returncode == 0, console[-6000:]
    log_path = tmp_path / "runs" / "quiet" / "run.log"
    log = log_path.read_text()
    for noise in NOISE:
        assert noise not in console, f"{noise!r} reached the console:\n{console[-6000:]}"
    assert f"go to {log_path}" in console or f"goes to {log_path}" in console, console[-3000:]
    assert "launching (node 0 of 1)" in console
    assert "step: 100%|" in console and "1/1 [" in console, console[-3000:]  # tqdm, one line (not a terminal)
    assert "weight sync: transport=tensor" in console  # our INFO lines stay
    # the noise is kept, in the log: the worker's own (Megatron) and the scheduler process's (SGLang)
    assert "Apex is not installed" in log and "UserWarning" in log
    assert "Ignore import error" in log and "Cuda graph is disabled" in log
    assert "weight sync: transport=tensor" in log  # and the log holds our lines too, in order with the rest
    assert len(console.splitlines()) < 15, console
