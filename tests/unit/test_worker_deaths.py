"""A torchrun worker killed by a signal is named and explained (issue 15): real torchrun runs whose
rank 1 ends itself, and the explanation against real rank records."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from holderpo_megatron.observability.host_memory import RankMemoryRecord, write_rank_record
from holderpo_megatron.trainer.config import RunConfig
from holderpo_megatron.trainer.config_loader import from_dict
from holderpo_megatron.trainer.faults import KILL_RANK_IN_STEP, rank_to_kill
from holderpo_megatron.trainer.worker_deaths import WorkerDeath, explain, read_report

ROOT = Path(__file__).resolve().parents[2]
# rank 1 ends itself with the signal in argv[1]; rank 0 waits to be stopped by torchrun
WORKER = """
import os, signal, sys, time
if os.environ["RANK"] == "1":
    time.sleep(1)
    os.kill(os.getpid(), int(sys.argv[1]))
time.sleep(0 if int(sys.argv[1]) == 0 else 120)
"""


def _torchrun(tmp_path, sig: int):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    report = tmp_path / "failures.json"
    out = subprocess.run([sys.executable, "-m", "holderpo_megatron.trainer.worker_deaths", str(report), "--standalone",
                          "--nproc-per-node=2", "--max-restarts=0", "--monitor-interval=0.2", str(script), str(sig)],
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=120)
    return out, report


@pytest.mark.parametrize("sig", [9, 11])
def test_torchrun_reports_the_rank_a_signal_killed(tmp_path, sig):
    out, report = _torchrun(tmp_path, sig)
    assert out.returncode != 0
    assert f"Signal {sig} (" in out.stderr, out.stderr[-3000:]  # torchrun's own traceback is kept
    (death, *rest) = read_report(report)
    assert (death.rank, death.local_rank, death.exitcode, death.host) == (1, 1, -sig, socket.gethostname())
    assert f"received by PID {death.pid}" in out.stderr
    assert all(d.rank == 0 for d in rest)


def test_a_successful_torchrun_writes_no_report(tmp_path):
    out, report = _torchrun(tmp_path, 0)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not report.exists() and read_report(report) == []


def _cfg(tmp_path, **train) -> RunConfig:
    return from_dict(RunConfig, {"name": "r", "output_dir": str(tmp_path), "parallel": {"nproc_per_node": 2},
                                 "rollout": {"max_prompt_tokens": 48, "max_new_tokens": 8, "engines_per_node": 1},
                                 "train": {"token_budget": 4096, **train}})


def test_a_sigkilled_rank_is_explained_as_a_likely_oom_with_its_recorded_memory(tmp_path):
    cfg = _cfg(tmp_path)
    write_rank_record(cfg.run_dir, RankMemoryRecord(rank=1, pid=4242, host="h1", step=3, rss_gib=10.25,
                                                    peak_rss_gib=11.5, time=1000.0))
    text = explain([WorkerDeath(rank=1, local_rank=1, pid=4242, exitcode=-9, host="h1", time=1012.0)], cfg.run_dir, cfg)
    assert "rank 1 (local rank 1, pid 4242 on host h1) was killed by signal 9 (SIGKILL)" in text
    assert "out-of-memory (OOM) killer" in text
    assert "last recorded RSS 10.25 GiB, peak 11.50 GiB (after step 3, 12 s before" in text
    assert "GiB RAM" in text
    assert "train.token_budget (now 4096)" in text and "rollout.engines_per_node (now 1)" in text
    assert "agent.num_workers" not in text  # not an agent run


def test_a_record_of_another_process_or_none_is_not_passed_off_as_the_dead_ranks(tmp_path):
    cfg = _cfg(tmp_path)
    write_rank_record(cfg.run_dir, RankMemoryRecord(rank=0, pid=1, host="h1", step=2, rss_gib=1.0, peak_rss_gib=1.0,
                                                    time=time.time()))
    deaths = [WorkerDeath(rank=0, local_rank=0, pid=77, exitcode=-9, host="h1", time=time.time()),
              WorkerDeath(rank=1, local_rank=1, pid=78, exitcode=-9, host="h1", time=time.time())]
    text = explain(deaths, cfg.run_dir, cfg)
    assert "Rank 0: no RSS recorded by this process (the record of rank 0 is of an earlier process, pid 1)" in text
    assert "Rank 1: no RSS recorded for rank 1" in text


def test_other_signals_get_their_own_cause_and_failures_without_a_signal_none(tmp_path):
    cfg = _cfg(tmp_path)
    segv = explain([WorkerDeath(0, 0, 5, -11, "h", 0.0)], cfg.run_dir, cfg)
    assert "signal 11 (SIGSEGV)" in segv and "native code" in segv and "OOM" not in segv
    assert explain([WorkerDeath(0, 0, 5, 1, "h", 0.0)], cfg.run_dir, cfg) == ""


def test_a_malformed_kill_variable_is_refused(monkeypatch):
    monkeypatch.setenv(KILL_RANK_IN_STEP, "1:2")
    assert rank_to_kill() == (1, 2)
    monkeypatch.setenv(KILL_RANK_IN_STEP, "one")
    with pytest.raises(ValueError, match=r"HOLDERPO_KILL_RANK_IN_STEP='one' must be RANK:STEP"):
        rank_to_kill()


def test_the_workers_torchrun_stops_after_a_death_are_not_blamed(tmp_path):
    """torchrun SIGTERMs the other workers once one fails, within the same second it records."""
    cfg = _cfg(tmp_path)
    text = explain([WorkerDeath(1, 1, 8, -15, "h", 100.0), WorkerDeath(0, 0, 7, -9, "h", 100.0)], cfg.run_dir, cfg)
    assert text.index("rank 0 (local rank 0, pid 7 on host h) was killed by signal 9 (SIGKILL)") < text.index(
        "rank 1 (local rank 1, pid 8 on host h) then ended by SIGTERM: torchrun stops the other workers")
    assert "stopped from outside" not in text
    alone = explain([WorkerDeath(1, 1, 8, -15, "h", 100.0)], cfg.run_dir, cfg)  # a SIGTERM from outside, first
    assert "was killed by signal 15 (SIGTERM)" in alone and "stopped from outside" in alone
