"""Two nodes on one machine: two ``holderpo train`` launchers (node ranks 0 and 1, one rank each) meet
at a static rendezvous on 127.0.0.1 with distinct host identities (``HOLDERPO_HOST_ID``), so the
run counts them as two hosts. PP2 spans the nodes; each node runs one CPU SGLang engine; the replica's
stage senders broadcast the weights to both engines with the distributed transport (shared memory
cannot cross hosts), and after each sync every engine's weights are read back and compared with
Megatron's (``rollout.verify_sync``). Killing node 1 mid-run ends node 0 promptly, naming node 1.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "recipes" / "tiny-cpu.yaml"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_nodes(model: Path, out: Path, steps: int, port: int, logs: Path) -> list[subprocess.Popen]:
    overrides = [f"model.hf_path={model}", f"output_dir={out}", "name=two-nodes", "data.prompt_template=plain",
                 "data.answer_template=plain", "rollout.max_prompt_tokens=48", "rollout.max_new_tokens=8",
                 "train.prompts_per_step=2", "rollout.group_size=4", "train.token_budget=256",
                 f"train.steps={steps}", "parallel.nnodes=2", "parallel.nproc_per_node=1", "parallel.pp=2",
                 "parallel.collective_timeout_s=300", "rollout.mode=servers", "rollout.weight_sync=auto",
                 "rollout.verify_sync=true", "algorithm.regularizers={entropy_coef: 0.01}", "logging.progress=false",
                 "checkpoint.resume=false", "checkpoint.export_hf_at_end=false"]
    procs = []
    for node in (0, 1):
        # two hosts to the run; their engines answer on the loopback (one machine)
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HOLDERPO_HOST_ID=f"host-{node}",
                   HOLDERPO_NODE_ADDR="127.0.0.1")
        cmd = [sys.executable, "-m", "holderpo_megatron.cli", "train", "--config", str(RECIPE), "--nnodes", "2",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), *overrides]
        log = open(logs / f"node{node}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _wait(procs, timeout_s: float) -> list[int | None]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(1)
    return [p.poll() for p in procs]


def test_two_nodes_pp2_two_engines_distributed_sync_verified(tiny_model, tmp_path):
    procs = _start_nodes(tiny_model, tmp_path / "runs", 2, _free_port(), tmp_path)
    try:
        codes = _wait(procs, 900)
    finally:
        for p in procs:
            _kill_tree(p.pid)
    logs = [(tmp_path / f"node{k}.log").read_text() for k in (0, 1)]
    assert codes == [0, 0], logs[0][-4000:] + "\n----- node 1\n" + logs[1][-4000:]
    assert "--nnodes=2 --node-rank=0 --master-addr=127.0.0.1" in logs[0]  # the exact per-node command is printed
    assert "--node-rank=1" in logs[1]
    # the stage senders are on two hosts: the distributed transport, and the log says why
    assert "weight sync: transport=distributed" in logs[0] and "'host-1'" in logs[0], logs[0][-3000:]
    records = [json.loads(line) for line in (tmp_path / "runs" / "two-nodes" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["rollout/engine0/samples"] > 0 and r["rollout/engine1/samples"] > 0, r  # one engine per node
        assert r["weight_sync/verified_tensors"] > 0, r  # every engine read back equal to Megatron
        assert r["stale_samples"] == 0 and r["logprob_drift_max"] < 5e-3, r


def test_killing_node_1_ends_node_0_naming_it(tiny_model, tmp_path):
    procs = _start_nodes(tiny_model, tmp_path / "runs", 50, _free_port(), tmp_path)
    metrics = tmp_path / "runs" / "two-nodes" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 600
        while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), (tmp_path / "node0.log").read_text()[-3000:]
            time.sleep(1)
        assert metrics.is_file(), (tmp_path / "node0.log").read_text()[-3000:]
        _kill_tree(procs[1].pid)  # node 1 dies mid-run: its launcher, torchrun agent, worker and engine
        killed = time.monotonic()
        code = _wait(procs[:1], 180)[0]
        took = time.monotonic() - killed
    finally:
        for p in procs:
            _kill_tree(p.pid)
    log0 = (tmp_path / "node0.log").read_text()
    assert code not in (None, 0), f"node 0 still running {took:.0f} s after node 1 died:\n{log0[-3000:]}"
    assert "node(s) 1 stopped: rank 1 (node 1, host host-1" in log0, log0[-5000:]
