"""A run ends with its launcher: `holderpo train` killed with SIGKILL (its whole process group, as a
user or an OOM killer would) mid-run leaves no worker, SGLang engine or helper process behind, and
frees the run directory's lock (issue 14). torchrun starts its workers in sessions of their own, so
the group kill alone never reaches them: they must notice their parent's death.

Each run also evaluates the initial policy first (``eval.at_start``): its step-0 record must be
logged before the kill. The server launched in ``servers`` mode refuses requests without its key.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from holderpo_megatron.trainer.run_guard import acquire_run_lock

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TAG = "HOLDERPO_TEST_RUN_TAG"


def _recipe(tmp: Path, model: Path, mode: str) -> Path:
    bench = tmp / "data" / "math" / "tinybench"
    bench.mkdir(parents=True)
    bench.joinpath("data.jsonl").write_text("".join(json.dumps({"problem": f"w{i} w{i + 1}", "answer": str(i)}) + "\n"
                                                    for i in range(3, 5)))
    path = tmp / "recipe.yaml"
    path.write_text(f"""
name: doomed
output_dir: {tmp / 'runs'}
hardware: test
model: {{hf_path: {model}, dtype: fp32}}
parallel: {{tp: 1, pp: 1, nproc_per_node: 1}}
rollout: {{mode: {mode}, group_size: 2, top_k: 1, max_prompt_tokens: 48, max_new_tokens: 8, weight_sync: tensor}}
train: {{steps: 200, prompts_per_step: 2, token_budget: 256, optimizer: {{lr: 1.0e-3}}}}
data: {{train: arithmetic, arithmetic_max_operand: 9, prompt_template: plain, reward: exact_int, answer_template: plain,
       data_dir: {tmp / 'data'}}}
eval: {{at_start: true, benchmarks: [tinybench], max_new_tokens: 8}}
checkpoint: {{every: 0, export_hf_at_end: false}}
logging: {{tensorboard: false, progress: false}}
""")
    return path


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # is_running also checks the PID's start time
    except psutil.Error:
        return False


def _run_processes(tag: str, known: list) -> list:
    """Live processes of the run: those whose environment carries its tag, and ``known`` ones (the
    launcher's descendants seen before the kill: SGLang's setproctitle overwrites the environment
    its schedulers show, so they are found by descent)."""
    import psutil

    out = {p.pid: p for p in known if _alive(p)}
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid not in out and _alive(p) and p.environ().get(TAG) == tag:
                out[p.pid] = p
        except psutil.Error:
            pass
    return list(out.values())


def _cmd(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _records(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.endswith("}")]


def _assert_server_wants_its_key(run: Path) -> None:
    """The server we launched answers only requests carrying its key (health checks excepted)."""
    import urllib.error
    import urllib.request

    (log,) = (run / "sglang_logs").glob("sglang-*.log")
    url = f"http://127.0.0.1:{log.stem.split('-')[1]}"
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert r.status == 200
    req = urllib.request.Request(url + "/flush_cache", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code in (401, 403), e.value.code


@pytest.mark.parametrize("mode", ["embedded", "servers"])
def test_sigkill_of_the_launchers_group_mid_step_ends_every_process_of_the_run(tiny_model, tmp_path, mode):
    import psutil

    recipe = _recipe(tmp_path, tiny_model, mode)
    run = tmp_path / "runs" / "doomed"
    tag = uuid.uuid4().hex
    known: list = []
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **{TAG: tag})
    log = open(tmp_path / "train.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "holderpo_megatron.cli", "train", "--config", str(recipe)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not any(r["step"] >= 1 and "reward_mean" in r for r in _records(run)):
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "no training step within 600 s"
            time.sleep(0.5)
        records = _records(run)
        assert any(r["step"] == 0 and "eval/average" in r for r in records), records  # eval.at_start
        known = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        alive = _run_processes(tag, known)
        names = " ".join(_cmd(p) for p in alive)
        assert "holderpo_megatron.trainer.main" in names, names
        if mode == "servers":
            assert "sglang.launch_server" in names, names
            _assert_server_wants_its_key(run)
        assert len(alive) >= 4, names  # launcher, torchrun, worker, engine processes
        if mode == "embedded":
            assert "sglang::scheduler" in names, names
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and torchrun; the workers are in other sessions
        except ProcessLookupError:
            pass
        proc.wait(30)
        log.close()
    deadline = time.monotonic() + 30
    left = _run_processes(tag, known)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _run_processes(tag, known)
    survivors = [(p.pid, _cmd(p)[:200]) for p in left]
    for p in left:  # never leave them running, whatever the verdict
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not survivors, f"alive 30 s after the launcher's group was killed: {survivors}"
    with acquire_run_lock(run):  # the kernel released the dead run's lock
        pass
