"""`holderpo sweep` end to end: a real 2-config x 1-seed sweep (tiny random Llama, Megatron on one
gloo rank, a CPU SGLang engine), killed with SIGKILL to its whole process group while the second
config trains, then started again: the finished config is skipped (never relaunched), the killed one
resumes from its last checkpoint and finishes, and the summary and the sweep plot are written.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "recipes" / "tiny-cpu.yaml"


def _sweep(tmp: Path, model: Path, out: Path, log: Path) -> subprocess.Popen:
    grid = tmp / "grid.yaml"
    grid.write_text("""
p1: {algorithm.p_schedule: {kind: constant, p_min: 1.0, p_max: 1.0}, train.steps: 1}
gspo: {algorithm.loss: gspo, algorithm.options: {}, train.steps: 3}
""")
    overrides = [f"model.hf_path={model}", "data.prompt_template=plain", "data.answer_template=plain",
                 "rollout.max_prompt_tokens=48", "rollout.max_new_tokens=8", "train.prompts_per_step=2",
                 "rollout.group_size=4", "train.token_budget=256", "parallel.pp=1", "parallel.nproc_per_node=1",
                 "checkpoint.export_hf_at_end=false", "logging.progress=false",
                 "algorithm.regularizers={entropy_coef: 0.01}", "rollout.mem_fraction_static=0.05"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        # its own process group: the test kills the whole sweep (it, `holderpo train`, torchrun, ranks, engine)
        return subprocess.Popen([sys.executable, "-m", "holderpo_megatron.cli", "sweep", "--config", str(RECIPE),
                                 "--grid", str(grid), "--seeds", "7", "--out", str(out), *overrides],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_sweep_killed_mid_run_skips_finished_and_resumes_interrupted(tiny_model, tmp_path):
    out = tmp_path / "sweep"
    done_run, killed_run = out / "p1" / "seed7", out / "gspo" / "seed7"
    latest = killed_run / "checkpoints" / "latest"
    proc = _sweep(tmp_path, tiny_model, out, tmp_path / "first.log")
    try:
        deadline = time.time() + 600
        while not latest.is_file():  # the second config's step 1 is committed: kill it mid-run
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
            assert time.time() < deadline, "the second run never committed a checkpoint"
            time.sleep(0.1)
    finally:
        _killpg(proc)
    first = (tmp_path / "first.log").read_text()
    assert (done_run / "sweep_done.json").is_file(), first[-4000:]
    assert not (killed_run / "sweep_done.json").exists()
    assert not (out / "summary.json").exists()  # the sweep never got to its end
    killed_at = int((killed_run / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    assert 1 <= killed_at < 3, killed_at
    done_log = (done_run / "train.log").read_text()

    proc = _sweep(tmp_path, tiny_model, out, tmp_path / "second.log")
    try:
        rc = proc.wait(timeout=600)
    finally:
        _killpg(proc)
    second = (tmp_path / "second.log").read_text()
    assert rc == 0, second[-5000:]
    assert "p1/seed7: finished earlier, skipped" in second, second[-3000:]
    assert (done_run / "train.log").read_text() == done_log  # never launched again
    train_log = (killed_run / "train.log").read_text()
    assert f"resuming {killed_run} from step_{killed_at:08d}" in train_log, train_log[-4000:]
    steps = [json.loads(line)["step"] for line in (killed_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], steps  # each step once: the killed attempt's later records dropped
    assert (killed_run / "sweep_done.json").is_file()

    summary = json.loads((out / "summary.json").read_text())
    assert [c["config"] for c in summary["configs"]] == ["p1", "gspo"]
    by_config = {r["config"]: r for r in summary["runs"]}
    assert by_config["p1"]["steps"] == 1 and by_config["gspo"]["steps"] == 3
    assert len(by_config["gspo"]["reward_curve"]) == 3
    assert "| p1 | 1 |" in (out / "summary.md").read_text()

    res = subprocess.run([sys.executable, "-m", "holderpo_megatron.cli", "plot", str(out)], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    png = out / "sweep.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
