import os
import sys

import pytest

# Let tests import the shared references (tests/references.py) and run without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.process_leaks import (SESSION_ENV, become_subreaper, describe, kill_all, new_session_marker,  # noqa: E402
                                 own_helpers, reap_zombie_children, session_processes, wait_for_exit)

# How long processes still ending (a server given SIGTERM, a scheduler whose parent just died) may
# take before the session counts them as left behind.
LEFTOVER_GRACE_S = float(os.environ.get("HOLDERPO_LEFTOVER_GRACE_S", "15"))
_session_marker: str | None = None


def pytest_sessionstart(session):
    """The outermost session marks its descendants (a pytest run inside a test inherits the
    mark and leaves the check to the outer one) and adopts their orphans."""
    global _session_marker
    if SESSION_ENV in os.environ:
        return
    _session_marker = new_session_marker()
    os.environ[SESSION_ENV] = _session_marker
    become_subreaper()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a process it started outlives it (issue 15); kill them either way."""
    if _session_marker is None:
        return
    left = wait_for_exit(session_processes(_session_marker, exclude=own_helpers()), LEFTOVER_GRACE_S)
    leftovers = describe(left)
    kill_all(left)
    reap_zombie_children()
    if not leftovers:
        return
    lines = [f"{len(leftovers)} process(es) started by this test session still alive {LEFTOVER_GRACE_S:.0f} s "
             "after the last test (now killed):", *(f"  {x}" for x in leftovers)]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")  # after the progress line
        reporter.write_sep("=", "processes left behind", red=True, bold=True)
        for line in lines:
            reporter.write_line(line, red=True)
    else:
        print("\n".join(lines), file=sys.stderr)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
