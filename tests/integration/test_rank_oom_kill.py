"""A rank the kernel kills (SIGKILL, as its OOM killer does) mid-step is named and explained, and
takes everything it started with it (issue 15).

Two CPU ranks (DP 2) of the tiny Llama, the embedded engine on rank 0, a checkpoint after step 1
(so a writing rank holds Megatron's checkpoint-writer Manager process); one rank SIGKILLs itself in step 2
(``HOLDERPO_KILL_RANK_IN_STEP``). `holderpo train` must keep torchrun's traceback, then name the
rank, its pid and SIGKILL's usual cause, the out-of-memory killer; and 30 s later no process of the
run may be alive: before the fix a SIGKILLed rank 0 left its Manager process and its resource
tracker running forever under PID 1.
"""

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.test_launcher_death import TAG, _cmd, _run_processes

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp: Path, model: Path) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(f"""
name: oom
output_dir: {tmp / 'runs'}
hardware: test
model: {{hf_path: {model}, dtype: fp32}}
parallel: {{tp: 1, pp: 1, nproc_per_node: 2}}
rollout: {{mode: embedded, group_size: 2, top_k: 1, max_prompt_tokens: 48, max_new_tokens: 8, weight_sync: tensor}}
train: {{steps: 3, prompts_per_step: 2, token_budget: 256, optimizer: {{lr: 1.0e-3}}}}
data: {{train: arithmetic, arithmetic_max_operand: 9, prompt_template: plain, reward: exact_int, answer_template: plain}}
checkpoint: {{every: 1, export_hf_at_end: false}}
logging: {{tensorboard: false, progress: false}}
""")
    return path


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_sigkilled_mid_step_is_named_as_a_likely_oom_and_leaves_nothing_behind(tiny_model, tmp_path, rank):
    import psutil

    recipe = _recipe(tmp_path, tiny_model)
    tag = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HOLDERPO_KILL_RANK_IN_STEP=f"{rank}:2", **{TAG: tag})
    log_path = tmp_path / "train.log"
    seen: dict[int, psutil.Process] = {}  # every descendant of the launcher seen while it ran
    titles: dict[int, str] = {}  # their command lines when last seen alive
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "holderpo_megatron.cli", "train", "--config", str(recipe)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        launcher = psutil.Process(proc.pid)
        deadline = time.monotonic() + 900
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not end within 900 s"
            try:
                for p in launcher.children(recursive=True):
                    seen.setdefault(p.pid, p)
                    titles[p.pid] = _cmd(p) or titles.get(p.pid, "")
            except psutil.Error:
                pass
            time.sleep(0.5)
    text = log_path.read_text()
    names = list(titles.values())
    left = _run_processes(tag, list(seen.values()))
    deadline = time.monotonic() + 30
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _run_processes(tag, list(seen.values()))
    survivors = [(p.pid, _cmd(p)[:200]) for p in left]
    for p in left:  # never leave them running, whatever the verdict
        try:
            p.kill()
        except psutil.Error:
            pass

    assert proc.returncode != 0, text[-5000:]
    assert "Signal 9 (SIGKILL) received by PID" in text, text[-5000:]  # torchrun's traceback is kept
    m = re.search(rf"holderpo train: rank {rank} \(local rank {rank}, pid (\d+) on host \S+\) was killed by signal 9 "
                  r"\(SIGKILL\)", text)
    assert m, text[-5000:]
    assert f"Signal 9 (SIGKILL) received by PID {m.group(1)}" in text  # the same process torchrun names
    assert text.index("received by PID") < m.start()  # the explanation comes after the traceback
    assert "out-of-memory (OOM) killer" in text
    assert "stopped from outside" not in text  # the rank torchrun stopped afterwards is not blamed
    assert re.search(rf"Rank {rank}: (last recorded RSS [\d.]+ GiB, peak [\d.]+ GiB|no RSS recorded)", text), text[-3000:]
    assert "GiB RAM" in text and "train.token_budget (now 256)" in text
    # the case this test is for: ranks with multiprocessing children (Megatron's Manager) and SGLang's
    assert any("multiprocessing.spawn import spawn_main" in n for n in names), names  # untitled: the Manager
    assert any("sglang::scheduler" in n for n in names), names
    assert not survivors, f"alive 30 s after the run ended: {survivors}"
