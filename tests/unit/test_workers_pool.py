"""The shared subprocess worker pool on real worker processes: a request that returns, one that
raises, one that hangs past its deadline (killed, replaced), a crash, start-up failures, the
orphan watchdog when the parent is SIGKILLed, and no process left after close.

The programs live here at module level so that they pickle (by reference) into the workers; this
module imports no pytest so that each worker imports it quickly.
"""

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from holderpo_megatron.workers import Lost, Reply, SubprocessPool, WorkerProgram
from tests.unit.test_envs_pool import alive

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("test.workers")


class Calculator(WorkerProgram):
    """Requests: ("add", a, b) -> a + b; ("raise", text); ("hang", seconds); ("exit", code); ("pid",)."""

    def __init__(self, close_marker: str = ""):
        self.close_marker = close_marker

    def handle(self, request):
        op, *args = request
        if op == "add":
            return args[0] + args[1]
        if op == "raise":
            raise ValueError(args[0])
        if op == "hang":
            time.sleep(args[0])
            return "woke"
        if op == "exit":
            os._exit(args[0])  # a crash the worker cannot report (segfault, OOM kill)
        if op == "pid":
            return os.getpid()
        if op == "unpicklable":
            return lambda: None
        raise KeyError(op)

    def close(self):
        if self.close_marker:
            Path(self.close_marker, str(os.getpid())).write_text("closed")


class BrokenStart(WorkerProgram):
    def start(self):
        raise ImportError("backend missing")


class SlowStart(WorkerProgram):
    def start(self):
        time.sleep(3600)
        return ""


class WarnsAtStart(Calculator):
    def start(self):
        return "could not warm its cache"


def wait_all_ready(pool: SubprocessPool, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while pool.waiting():
        assert time.monotonic() < deadline, "workers did not start"
        assert pool.wait(pool.waiting()) == []


def started(program: WorkerProgram, size: int) -> SubprocessPool:
    """A pool whose workers have all reported ready."""
    pool = SubprocessPool(program, size, name="calc", log=log)
    wait_all_ready(pool)
    return pool


def run_one(pool: SubprocessPool, w, request, timeout_s: float = 30.0):
    """Submit one request and wait for its event."""
    assert pool.submit(w, request, tag=request[0], timeout_s=timeout_s)
    while True:
        events = pool.wait([w])
        if events:
            (event,) = events
            return event


def test_a_request_returns_and_one_that_raises_leaves_the_worker_running():
    with started(Calculator(), 2) as pool:
        w = pool.workers[0]
        event = run_one(pool, w, ("add", 2, 3))
        assert isinstance(event, Reply) and event.ok and event.value == 5 and event.tag == "add"
        assert event.worker is w and 0 <= event.seconds < 30.0
        event = run_one(pool, w, ("raise", "bad input"))
        assert isinstance(event, Reply) and not event.ok and event.value == "ValueError: bad input"
        event = run_one(pool, w, ("unpicklable",))
        assert not event.ok and "could not be sent back" in event.value
        assert run_one(pool, w, ("pid",)).value == w.pid  # the same process served all four
        assert pool.idle() == pool.workers and pool.waiting() == []


def test_a_hanging_request_is_lost_at_its_deadline_and_the_worker_replaced():
    timeout = 1.0
    with started(Calculator(), 2) as pool:
        hung, other = pool.workers
        t0 = time.monotonic()
        assert pool.submit(hung, ("hang", 3600), tag="h", timeout_s=timeout)
        assert pool.submit(other, ("add", 1, 1), tag="a", timeout_s=timeout)
        events = []
        while len(events) < 2:
            events += pool.wait(pool.waiting())
        took = time.monotonic() - t0
        by_tag = {e.tag: e for e in events}
        assert isinstance(by_tag["a"], Reply) and by_tag["a"].value == 2
        lost = by_tag["h"]
        assert isinstance(lost, Lost) and lost.cause == "timeout" and lost.worker is hung
        assert timeout <= lost.seconds < timeout + 2.0 and took < timeout + 5.0, (lost.seconds, took)
        assert alive([hung.pid]) == [hung.pid]  # still stuck: the caller decides
        new = pool.replace(hung)
        assert pool.workers == [new, other] and new.pid != hung.pid
        assert alive([hung.pid]) == []
        wait_all_ready(pool)
        assert run_one(pool, new, ("add", 4, 5)).value == 9


def test_a_crash_is_lost_with_its_exit_code_and_a_dead_idle_worker_refuses_requests():
    with started(Calculator(), 1) as pool:
        (w,) = pool.workers
        lost = run_one(pool, w, ("exit", 3))
        assert isinstance(lost, Lost) and lost.cause == "died" and lost.how == "exit code 3"
        assert lost.tag == "exit" and not lost.during_startup and lost.reason == "died (exit code 3)"
        w = pool.replace(w)
        wait_all_ready(pool)
        w.proc.kill()  # dies while idle
        w.proc.wait()
        assert not pool.submit(w, ("add", 1, 2), tag="x", timeout_s=5.0) and not w.busy


def test_start_up_failures_are_lost_not_stalled(caplog):
    with SubprocessPool(BrokenStart(), 1, name="broken", log=log) as pool:
        (event,) = pool.wait(pool.waiting())
        assert isinstance(event, Lost) and event.cause == "died" and event.during_startup
        assert "during start-up (exit code 1; its stderr says why)" in event.reason
    with SubprocessPool(SlowStart(), 1, name="slow", log=log, startup_timeout_s=1.0) as pool:
        t0 = time.monotonic()
        events = []
        while not events:
            events = pool.wait(pool.waiting())
        assert 1.0 <= time.monotonic() - t0 < 10.0
        assert events[0].cause == "start_timeout" and events[0].reason == "did not start within 1 s"
    caplog.set_level(logging.WARNING, logger="test.workers")
    with started(WarnsAtStart(), 1) as pool:
        assert any(f"calc worker pid {pool.workers[0].pid} could not warm its cache" in r.getMessage()
                   for r in caplog.records)


def test_a_late_reply_to_an_abandoned_request_is_dropped():
    with started(Calculator(), 1) as pool:
        (w,) = pool.workers
        assert pool.submit(w, ("hang", 0.5), tag="old", timeout_s=30.0)
        pool.abandon_calls()  # an interrupted caller
        event = run_one(pool, w, ("add", 1, 2))
        assert event.tag == "add" and event.value == 3  # "woke" of the old request never surfaced


def test_an_unpicklable_program_is_refused_at_construction():
    class Local(WorkerProgram):  # not importable by a worker
        pass

    try:
        SubprocessPool(Local(), 1, name="local", log=log)
    except TypeError as exc:
        assert "must be picklable" in str(exc)
    else:
        raise AssertionError("a local class cannot travel to a worker; the pool must refuse it")
    for bad in (0, -1, True, 1.5):
        try:
            SubprocessPool(Calculator(), bad, name="calc", log=log)
        except ValueError as exc:
            assert "size must be an int >= 1" in str(exc)
        else:
            raise AssertionError(f"size={bad!r} must be refused")


def test_no_process_is_left_after_close(tmp_path):
    pool = SubprocessPool(Calculator(close_marker=str(tmp_path)), 3, name="calc", log=log, start=False)
    assert pool.workers == []
    pool.fill()
    wait_all_ready(pool)
    busy = pool.workers[2]
    assert pool.submit(busy, ("hang", 3600), tag="h", timeout_s=3600)
    pids = pool.pids
    assert alive(pids) == pids
    pool.close()
    pool.close()  # idempotent
    assert alive(pids) == []
    assert pool.workers == []
    # the idle workers were stopped politely (their program closed); the busy one was killed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(str(p) for p in pids[:2])


_ORPHAN_SCRIPT = textwrap.dedent("""
    import logging
    from holderpo_megatron.workers import SubprocessPool
    from tests.unit.test_workers_pool import Calculator, wait_all_ready

    pool = SubprocessPool(Calculator(), 2, name="calc", log=logging.getLogger("orphan"))
    wait_all_ready(pool)
    pool.submit(pool.workers[0], ("hang", 3600), tag="h", timeout_s=3600)  # stuck: never reads EOF
    print(" ".join(map(str, pool.pids)), flush=True)
    import time; time.sleep(3600)
""")


def test_workers_exit_when_the_parent_dies_even_mid_request(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env)
    try:
        line = parent.stdout.readline()
        assert line.strip(), parent.stderr.read()
        pids = [int(p) for p in line.split()]
        assert len(alive(pids)) == 2
        parent.kill()  # SIGKILL: no atexit, no finalizer runs
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10.0
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(pids) == [], "workers outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
