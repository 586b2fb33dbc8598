"""Which child processes an embedded engine's shutdown may kill: the ones its start created, never
this process's own helpers that happen to start at the same time."""

import multiprocessing.resource_tracker as resource_tracker
import subprocess
import sys

from holderpo_megatron.rollout.sglang_backends import _child_pids


def test_the_resource_tracker_is_never_counted_as_an_engine_process():
    before = _child_pids()
    resource_tracker.ensure_running()  # a real tracker, as SGLang's start-up launches one
    tracker = resource_tracker._resource_tracker._pid
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        new = _child_pids() - before
        assert tracker is not None and tracker not in new
        assert other.pid in new  # an ordinary child (an engine's scheduler) still is
    finally:
        other.kill()
        other.wait()
