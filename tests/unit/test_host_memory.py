"""observability/host_memory.py: RSS, per-step peak, the rank records and the step metrics built from them.
(The records of a real 2-rank run and its metrics: tests/integration/test_train_loop.py.)"""

import subprocess
import sys
import time

import pytest

from holderpo_megatron.observability.host_memory import (
    PER_RANK_KEYS_UP_TO, RankMemoryMonitor, RankMemoryRecord, children_memory, host_memory_metrics, peak_rss_bytes,
    read_rank_records, reset_peak, rss_bytes,
)


def _rec(rank, rss, peak):
    return RankMemoryRecord(rank, 100 + rank, "h", 3, rss, peak, 0.0)


def test_metrics_name_every_rank_and_the_max():
    m = host_memory_metrics([_rec(0, 2.0, 3.5), _rec(1, 1.0, 4.25)])
    assert m["host/rss_gib/rank0"] == 2.0 and m["host/rss_peak_gib/rank1"] == 4.25
    assert m["host/rss_peak_gib/max"] == 4.25 and m["host/rss_peak_gib/max_rank"] == 1.0
    assert m["host/rss_gib/max"] == 2.0 and "host/engine_rss_gib" not in m
    many = host_memory_metrics([_rec(r, 1.0, 1.0 + r) for r in range(PER_RANK_KEYS_UP_TO + 1)])
    assert not any("/rank" in k for k in many) and many["host/rss_peak_gib/max_rank"] == PER_RANK_KEYS_UP_TO


def test_peak_is_per_step_after_reset():
    blob = bytearray(300 * 2**20)  # touched: resident
    held = peak_rss_bytes()
    del blob
    if not reset_peak():
        pytest.skip("this kernel does not allow resetting VmHWM (/proc/self/clear_refs)")
    after = peak_rss_bytes()
    assert after < held - 200 * 2**20 and after >= rss_bytes() - 16 * 2**20


def test_monitor_writes_the_record_and_children_count(tmp_path):
    # a real child holding ~256 MiB: counted among the workers (its title is not sglang's)
    code = "b = bytearray(256 * 2**20); import sys; print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        kids = children_memory()
        assert kids.workers_gib > 0.24 and kids.workers_peak_gib >= kids.workers_gib and kids.engine_gib == 0
        t = time.time()
        m = RankMemoryMonitor(tmp_path, 0).end_step(5)  # no process group: this rank alone
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    rec = read_rank_records(tmp_path)[0]
    assert rec.step == 5 and rec.time >= t and rec.peak_rss_gib >= rec.rss_gib > 0
    assert m["host/rss_peak_gib/rank0"] == rec.peak_rss_gib and m["host/workers_rss_gib"] > 0.24
