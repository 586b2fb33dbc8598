"""Worker processes that run one request at a time, each request with its own wall-clock deadline.

A worker overrunning its deadline, or dying, is reported to the caller (:class:`Lost`), who
kills and replaces it (:meth:`SubprocessPool.replace`) and decides what the loss costs: a failed
episode (``envs.pool``), a timed-out verification (``rewards.pool``). Python offers no way to
interrupt a call stuck in C code (a SymPy simplification, a game engine), so a process that can be
SIGKILLed is the unit of isolation.

Workers are fresh interpreters (``python -c`` + ``subprocess``), not ``multiprocessing``
processes: spawn and forkserver re-import the parent's ``__main__`` in every worker (a trainer
script importing torch and Megatron: seconds and hundreds of MB each, and an unguarded script
recurses), and fork is unsafe in a torchrun parent with gloo, CUDA or threads. Popen execs at
once, so nothing of the parent's threads or process groups leaks in.

Protocol, over two pipes carrying pickled messages (``multiprocessing.connection.Connection``):

    parent -> worker   (sys.path, pickled WorkerProgram); then (seq, request) per request; None: stop
    worker -> parent   ("ready", pid, warning) once started; then (seq, ("ok", result) | ("error", text))

The program travels pickled by reference (its class must be importable at module level), after
the parent's ``sys.path``, so it may live in ``tests/``. Every worker watches its parent's pid and
exits within a second of the parent's death (SIGKILL, OOM kill), even while stuck in a request.

Not thread-safe: one caller at a time.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait as wait_for_connections
from pathlib import Path
from typing import Any, Sequence

__all__ = ["WorkerProgram", "WorkerProcess", "SubprocessPool", "Reply", "Lost", "error_text", "serve"]

# The directory holding the holderpo_megatron package, so the worker's bootstrap import works
# from a source checkout that is not pip-installed.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = ("import sys; from holderpo_megatron.workers.subprocess_pool import serve; "
              "serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))")
_ORPHAN_POLL_S = 1.0  # how often a worker checks that its parent is alive
_EXIT_WAIT_S = 5.0  # how long to wait for the exit status of a worker whose pipe closed


def error_text(exc: BaseException) -> str:
    """``"RuntimeError: boom"``: an exception as one line for a reply or a log."""
    return f"{type(exc).__name__}: {exc}"


class WorkerProgram:
    """What a worker process runs. Built and pickled in the parent, unpickled and run in the worker;
    a subclass must be a module-level class (pickled by reference) and keep its worker-side state
    out of ``__init__`` (set it in :meth:`start`)."""

    def start(self) -> str:
        """Called once in the worker before it reports ready: pay imports and set-up here, outside
        any request's deadline. Returns a warning for the parent's log ("" when none); raising
        ends the worker, which the parent sees as a death during start-up."""
        return ""

    def handle(self, request: Any) -> Any:
        """One request -> its result (pickled back to the parent). An exception is sent back as
        ``("error", self.describe_error(exc))``; the worker carries on."""
        raise NotImplementedError

    def describe_error(self, exc: Exception) -> str:
        return error_text(exc)

    def close(self) -> None:
        """Called when the parent stops the worker politely (never when it is killed)."""


# ----------------------------------------------------------------------------- worker process

def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker stuck inside a request never reads its pipe's EOF; this thread ends it within
    # _ORPHAN_POLL_S of the parent's death (the worker is re-parented, so getppid changes).
    while True:
        time.sleep(_ORPHAN_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def _answer(program: WorkerProgram, request: Any) -> tuple[str, Any]:
    try:
        return "ok", program.handle(request)
    except Exception as exc:  # reported to the parent, which counts it
        return "error", program.describe_error(exc)


def serve(read_fd: int, write_fd: int, parent_pid: int) -> None:
    """The worker's main loop (the bootstrap's entry point); see the module docstring's protocol."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True, name="orphan-watchdog").start()
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    sys_path, payload = inbox.recv()
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    program: WorkerProgram = pickle.loads(payload)  # after sys.path: its module may live in tests/
    outbox.send(("ready", os.getpid(), program.start()))
    while True:
        try:
            msg = inbox.recv()
        except EOFError:  # the parent closed the pipe (or died)
            break
        if msg is None:
            break
        seq, request = msg
        reply = _answer(program, request)
        try:
            outbox.send((seq, reply))
        except Exception as exc:  # pickling failed, nothing was written: say why instead
            outbox.send((seq, ("error", f"the result could not be sent back: {error_text(exc)}")))
    program.close()


# ----------------------------------------------------------------------------- parent side

@dataclass
class _Call:
    """The request a worker is running: ``sent_at``/``deadline`` in ``time.monotonic()`` seconds."""

    seq: int
    tag: Any
    sent_at: float
    deadline: float


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class WorkerProcess:
    """One worker process and its pipes, as the parent sees it.

    ``ready``: it reported ready (start-up done); ``call``: the request in flight (one at most);
    ``started_at``: ``time.monotonic()`` at spawn."""

    def __init__(self, payload: bytes):
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(p2c_r), str(c2p_w), str(os.getpid())],
                                         pass_fds=(p2c_r, c2p_w), stdin=subprocess.DEVNULL, env=env)
        finally:  # the worker's ends: the parent must not hold them, or it would never see EOF
            os.close(p2c_r)
            os.close(c2p_w)
        self.send_conn = Connection(p2c_w, readable=False)
        self.conn = Connection(c2p_r, writable=False)  # what the parent waits on
        self.send_conn.send((list(sys.path), payload))
        self.pid = self.proc.pid
        self.started_at = time.monotonic()
        self.ready = False
        self.call: _Call | None = None

    @property
    def busy(self) -> bool:
        return self.call is not None

    def exit_code(self, timeout_s: float = _EXIT_WAIT_S) -> int | None:
        """The exit status once it has exited (negative: the signal); None if still alive after ``timeout_s``."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int | None:
        """SIGKILL (if alive), reap, close the pipes; the exit status."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(timeout=10.0)
        for c in (self.send_conn, self.conn):
            if not c.closed:
                c.close()
        return code


@dataclass(frozen=True)
class Reply:
    """A worker answered: ``ok`` and the result as ``value``, or not ``ok`` and the worker's error
    text as ``value``. ``seconds``: wall time since the request was sent."""

    worker: WorkerProcess
    tag: Any
    ok: bool
    value: Any
    seconds: float


@dataclass(frozen=True)
class Lost:
    """A worker to be replaced. ``cause``: "died" (its pipe closed; ``how`` says how it exited),
    "timeout" (its request overran the deadline; the worker is still alive, stuck) or
    "start_timeout" (it never reported ready). ``tag``: the request it was running (None: none).
    ``seconds``: wall time since that request was sent (0 without one)."""

    worker: WorkerProcess
    tag: Any
    cause: str
    seconds: float = 0.0
    how: str = ""
    startup_timeout_s: float = 0.0

    @property
    def during_startup(self) -> bool:
        return not self.worker.ready

    @property
    def reason(self) -> str:
        """A sentence fragment after "worker pid N": why it was lost."""
        if self.cause == "died":
            when = " during start-up" if self.during_startup else ""
            hint = "; its stderr says why" if self.during_startup else ""
            return f"died{when} ({self.how}{hint})"
        if self.cause == "start_timeout":
            return f"did not start within {self.startup_timeout_s:g} s"
        return f"exceeded its deadline after {self.seconds:.1f} s"


def _stop_all(workers: list[WorkerProcess], grace_s: float, name: str, log: logging.Logger) -> None:
    # Idle workers get None (they close their program and exit); busy or still-starting ones, and
    # any that ignore None past grace_s, are killed.
    polite = []
    for w in workers:
        if w.ready and w.call is None and w.proc.poll() is None:
            try:
                w.send_conn.send(None)
                polite.append(w)
                continue
            except (OSError, ValueError):  # its pipe is closed: it is gone or going
                pass
        w.kill()
    for w in polite:
        if w.exit_code(grace_s) is None:
            log.warning("%s worker pid %d did not exit within %g s of being stopped; killed", name, w.pid, grace_s)
        w.kill()
    workers.clear()


class SubprocessPool:
    """``size`` worker processes running ``program``; the caller dispatches and reads events.

    ``workers`` is a list with stable slots: :meth:`replace` puts the new worker where the old one
    was (a caller may pin work to a slot). ``startup_timeout_s``: how long a worker may take to
    report ready (interpreter start + the program's imports on a loaded machine), in seconds;
    ``stop_grace_s``: how long a stopped idle worker may take to exit before it is killed.
    ``start=False``: no worker until :meth:`fill`. ``name``: how logs and errors call a worker.
    """

    def __init__(self, program: WorkerProgram, size: int, *, name: str, log: logging.Logger,
                 startup_timeout_s: float = 120.0, stop_grace_s: float = 5.0, start: bool = True):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        try:  # once, here: an unpicklable program (a lambda inside, a local class) fails now, not in a worker
            self._payload = pickle.dumps(program)
        except Exception as exc:
            raise TypeError(f"the {name} worker program {program!r} must be picklable (module-level classes and "
                            f"functions, or functools.partial of them): {error_text(exc)}") from exc
        self.size = size
        self.name = name
        self.log = log
        self.startup_timeout_s = float(startup_timeout_s)
        self.stop_grace_s = float(stop_grace_s)
        self.workers: list[WorkerProcess] = []
        self._seq = 0
        # stops the workers when the pool is closed, garbage-collected, or the interpreter exits
        self._finalizer = weakref.finalize(self, _stop_all, self.workers, self.stop_grace_s, name, log)
        if start:
            self.fill()

    # -- the workers ---------------------------------------------------------------------------
    def fill(self) -> None:
        """Start workers until there are ``size``."""
        while len(self.workers) < self.size:
            self.workers.append(WorkerProcess(self._payload))

    def replace(self, w: WorkerProcess) -> WorkerProcess:
        """Kill ``w`` and start a new worker in its slot; the new one."""
        idx = self.workers.index(w)
        w.kill()
        self.workers[idx] = WorkerProcess(self._payload)
        return self.workers[idx]

    def discard(self, w: WorkerProcess) -> None:
        """Kill ``w`` and drop its slot (:meth:`fill` starts a new one)."""
        w.kill()
        self.workers.remove(w)

    def stop(self) -> None:
        """Stop every worker (the pool stays usable: :meth:`fill` starts new ones)."""
        _stop_all(self.workers, self.stop_grace_s, self.name, self.log)

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        self._finalizer()

    def __enter__(self) -> "SubprocessPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def idle(self) -> list[WorkerProcess]:
        """Workers ready for a request."""
        return [w for w in self.workers if w.ready and w.call is None]

    def waiting(self) -> list[WorkerProcess]:
        """Workers with something to wait for: a request in flight or a start-up."""
        return [w for w in self.workers if w.call is not None or not w.ready]

    # -- requests ------------------------------------------------------------------------------
    def submit(self, w: WorkerProcess, request: Any, tag: Any, timeout_s: float) -> bool:
        """Send ``request`` to the ready, idle worker ``w`` with a deadline ``timeout_s`` seconds
        from now; ``tag`` comes back with its event. False: ``w``'s pipe is closed (it died while
        idle), nothing was sent; replace it."""
        self._seq += 1
        try:
            w.send_conn.send((self._seq, request))
        except (OSError, ValueError):  # BrokenPipeError, or the connection already closed
            return False
        now = time.monotonic()
        w.call = _Call(self._seq, tag, now, now + timeout_s)
        return True

    def abandon_calls(self) -> None:
        """Forget every request in flight (a caller interrupted mid-batch): their late replies are
        dropped by sequence number, and each worker takes its next request behind its old one."""
        for w in self.workers:
            w.call = None

    def wait(self, workers: Sequence[WorkerProcess]) -> list[Reply | Lost]:
        """Block until one of ``workers`` replies or dies, or the earliest of their deadlines (a
        request's, or a start-up's) passes. At most one event per worker; a ready message is
        consumed here (its start-up warning logged) and yields none. A :class:`Lost` worker
        stays in its slot until the caller replaces it."""
        wake = min((self._wake_time(w) for w in workers), default=None)
        timeout = None if wake is None else max(0.0, wake - time.monotonic())
        by_conn = {id(w.conn): w for w in workers}
        events: dict[int, Reply | Lost] = {}
        for conn in wait_for_connections([w.conn for w in workers], timeout=timeout):
            w = by_conn[id(conn)]
            event = self._receive(w)
            if event is not None:
                events[id(w)] = event
        now = time.monotonic()
        for w in workers:
            if id(w) not in events:
                event = self._check_deadline(w, now)
                if event is not None:
                    events[id(w)] = event
        return list(events.values())

    def _wake_time(self, w: WorkerProcess) -> float:
        if w.call is not None:
            return w.call.deadline
        if not w.ready:
            return w.started_at + self.startup_timeout_s
        return float("inf")

    def _receive(self, w: WorkerProcess) -> Reply | Lost | None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):  # the worker is gone (crash, OOM kill, os._exit)
            call, w.call = w.call, None
            seconds = time.monotonic() - call.sent_at if call else 0.0
            return Lost(w, call.tag if call else None, "died", seconds, how=_describe_exit(w.exit_code()))
        if msg[0] == "ready":
            w.ready = True
            if msg[2]:
                self.log.warning("%s worker pid %d %s", self.name, w.pid, msg[2])
            return None
        seq, (status, payload) = msg
        if w.call is None or seq != w.call.seq:
            return None  # the late reply to an abandoned request
        call, w.call = w.call, None
        return Reply(w, call.tag, status == "ok", payload, time.monotonic() - call.sent_at)

    def _check_deadline(self, w: WorkerProcess, now: float) -> Lost | None:
        if w.call is not None and now >= w.call.deadline:
            call, w.call = w.call, None
            return Lost(w, call.tag, "timeout", now - call.sent_at)
        if not w.ready and now >= w.started_at + self.startup_timeout_s:
            return Lost(w, None, "start_timeout", startup_timeout_s=self.startup_timeout_s)
        return None
