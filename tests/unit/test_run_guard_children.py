"""multiprocessing children of a training worker die with it (issue 15): a real parent marks
itself, spawns a child (as Megatron's checkpoint writer starts its Manager) and SIGKILLs itself."""

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import multiprocessing as mp, os, signal, sys, time

from holderpo_megatron.trainer.run_guard import die_with_multiprocessing_parent, mark_multiprocessing_parent


def child(guarded, ready):
    if guarded:
        die_with_multiprocessing_parent()
    ready.set()
    time.sleep(120)


if __name__ == "__main__":
    mark_multiprocessing_parent()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=child, args=(sys.argv[1] == "guarded", ready))
    p.start()
    assert ready.wait(60)
    with open(sys.argv[2], "w") as f:
        f.write(str(p.pid))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _orphan(tmp_path, mode: str) -> psutil.Process:
    script = tmp_path / "parent.py"
    script.write_text(SCRIPT)
    pid_file, log = tmp_path / "child.pid", tmp_path / "parent.log"
    with open(log, "w") as f:  # a file, not a pipe: the orphan would hold a pipe open
        rc = subprocess.run([sys.executable, str(script), mode, str(pid_file)], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=f, stderr=subprocess.STDOUT, timeout=120).returncode
    assert rc == -9, log.read_text()
    return psutil.Process(int(pid_file.read_text()))


def _gone_within(p: psutil.Process, timeout_s: float) -> bool:
    try:
        p.wait(timeout_s)  # works for a non-child too (polls)
        return True
    except psutil.TimeoutExpired:
        return False


@pytest.mark.parametrize("mode", ["guarded", "unguarded"])
def test_a_spawned_child_dies_with_its_sigkilled_parent_only_when_guarded(tmp_path, mode):
    try:
        child = _orphan(tmp_path, mode)
    except psutil.NoSuchProcess:
        assert mode == "guarded"  # already gone: the kernel's signal was that quick
        return
    try:
        assert _gone_within(child, 10) == (mode == "guarded")  # unguarded: the orphan a rank used to leave
    finally:
        try:
            child.kill()
            child.wait(10)
        except psutil.Error:
            pass
