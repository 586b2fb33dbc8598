"""The session-end check of tests/conftest.py (issue 15) finds real processes, by either net."""

import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from tests.process_leaks import SESSION_ENV, become_subreaper, kill_all, session_processes

SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


def _sleeper(marker: str) -> subprocess.Popen:
    return subprocess.Popen(SLEEP, env=dict(os.environ, **{SESSION_ENV: marker}))


def _wait_for(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_finds_marked_processes_only_of_its_own_session():
    mine, other = uuid.uuid4().hex, uuid.uuid4().hex
    a, b, root = _sleeper(mine), _sleeper(other), subprocess.Popen(SLEEP)  # root: a process without children
    try:
        _wait_for(lambda: psutil.Process(a.pid).environ().get(SESSION_ENV) == mine)
        found = [p.pid for p in session_processes(mine, root_pid=root.pid)]
        assert found == [a.pid]
        a.kill()
        a.wait()
        assert session_processes(mine, root_pid=root.pid) == []  # dead (and reaped): not reported
    finally:
        for p in (a, b, root):
            p.kill()
            p.wait()


def test_finds_an_orphan_whose_title_overwrote_its_environment():
    """An orphan (its parent exited) that called setproctitle, as SGLang's scheduler does: its
    /proc environ no longer shows the marker, so only descent (this session adopts orphans) finds it."""
    pytest.importorskip("setproctitle")
    if not become_subreaper():
        pytest.skip("no PR_SET_CHILD_SUBREAPER on this platform")
    marker = uuid.uuid4().hex
    grandchild = ("import setproctitle, time; setproctitle.setproctitle('holderpo-test::orphan'); "
                  "print('titled', flush=True); time.sleep(120)")
    starter = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', sys.argv[1]], "
               "stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True); assert p.stdout.readline() == 'titled\\n'; print(p.pid)")
    out = subprocess.run([sys.executable, "-c", starter, grandchild], env=dict(os.environ, **{SESSION_ENV: marker}),
                         capture_output=True, text=True, timeout=60, check=True)
    orphan = psutil.Process(int(out.stdout))
    try:
        _wait_for(lambda: orphan.ppid() == os.getpid())  # adopted by this session, not by PID 1
        assert orphan.environ().get(SESSION_ENV) != marker  # the title wrote over it
        assert orphan.pid in [p.pid for p in session_processes(marker)]
        kill_all([orphan])
        assert orphan.pid not in [p.pid for p in session_processes(marker)]
    finally:
        kill_all([orphan])
        try:
            os.waitpid(orphan.pid, 0)  # ours now: reap it
        except ChildProcessError:
            pass
