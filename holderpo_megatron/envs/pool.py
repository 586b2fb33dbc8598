"""Text environments in worker processes, with per-step and per-episode timeouts.

    with EnvPool(partial(AlfworldEnv, cfg), num_workers=8) as pool:
        firsts = pool.reset(specs)              # episode i plays specs[i]
        results = pool.step({0: "go to desk 1", 3: "look"})

Episode ``i`` lives on worker ``i % num_workers`` for its whole life (its game state is in that
process). The parent sends each worker one command at a time, so every reset/step has its own
deadline; a worker that overruns it, or dies, is SIGKILLed and replaced, and every unfinished
episode it hosted ends ``failed`` (its state died with it). The batch never stalls on one game.

Workers are fresh interpreters (``python -c`` + ``subprocess``), not ``multiprocessing``
processes: spawn and forkserver re-import the parent's ``__main__`` in every worker (a trainer
script importing torch and Megatron: seconds and hundreds of MB each, and an unguarded script
recurses), and fork is unsafe in a torchrun parent with gloo and threads. Popen execs at once, so
nothing of the parent's threads or process groups leaks in. The factory travels pickled (by
reference: a module-level class or ``functools.partial``) with the parent's ``sys.path``.

Not thread-safe: one ``reset``/``step`` at a time.
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
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Mapping, Sequence

from holderpo_megatron.envs.interface import EnvFactory, EnvObservation, EnvStep, EpisodeSpec, TextEnv

__all__ = ["EnvPool", "SerialEnvRunner"]

log = logging.getLogger("holderpo.envs")

# The directory holding the holderpo_megatron package, so the worker's bootstrap import works
# from a source checkout that is not pip-installed.
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_BOOTSTRAP = ("import sys; from holderpo_megatron.envs.pool import _worker_main; "
              "_worker_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))")
# Interpreter start + the env's imports (textworld: ~1 s) on a loaded machine; not charged to
# the first reset, which is dispatched only once the worker says it is ready.
_START_TIMEOUT_S = 120.0
_FAILURE_KINDS = ("crash", "timeout", "error")


def _failed(reason: str) -> EnvStep:
    return EnvStep(observation="", admissible_actions=(), reward=0.0, done=True, failed=True, error=reason)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- worker process

def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker stuck inside a game never reads its pipe's EOF; this thread ends it within a
    # second of the parent's death (SIGKILL, OOM kill), so no worker outlives its trainer.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_main(read_fd: int, write_fd: int, parent_pid: int) -> None:
    """Worker loop: (sys.path, pickled factory) first, then one command per message.

    A command is ``(seq, generation, kind, episode, arg)``; the reply ``(seq, ("ok", result))``
    or ``(seq, ("error", text))``. A new ``generation`` (a new pool ``reset``) frees every env
    of the previous one for reuse.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    sys_path, payload = inbox.recv()
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    factory = pickle.loads(payload)  # after sys.path: the factory's module may live in tests/
    idle: list[TextEnv] = []
    boot_error = ""
    try:
        idle.append(factory())  # pays the env's imports now, outside the first reset's deadline
    except Exception as exc:  # reported to the parent (logged); each reset will retry and fail
        boot_error = _error_text(exc)
    outbox.send(("ready", os.getpid(), boot_error))
    envs: dict[int, TextEnv] = {}
    generation = 0
    while True:
        try:
            msg = inbox.recv()
        except EOFError:  # the parent went away
            break
        if msg is None:
            break
        seq, gen, kind, episode, arg = msg
        if gen != generation:
            idle.extend(envs.values())
            envs.clear()
            generation = gen
        try:
            if kind == "reset":
                env = envs.pop(episode, None) or (idle.pop() if idle else factory())
                envs[episode] = env
                out = ("ok", env.reset(arg))
            else:
                out = ("ok", envs[episode].step(arg))
        except Exception as exc:
            envs.pop(episode, None)  # its state is unknown after a raise: never reused
            out = ("error", _error_text(exc))
        try:
            outbox.send((seq, out))
        except Exception as exc:  # pickling failed, nothing was written: say why instead
            outbox.send((seq, ("error", f"the env's result could not be sent back: {_error_text(exc)}")))
    for env in [*envs.values(), *idle]:
        env.close()


# ----------------------------------------------------------------------------- parent side

@dataclass
class _Episode:
    spec: EpisodeSpec
    worker: int  # index in EnvPool._workers (SerialEnvRunner: unused)
    started_at: float
    finished: bool = False
    lost: EnvStep | None = None  # its worker died while it was not being stepped: told at its next step


class _Worker:
    """One worker process and its pipes; ``queue`` holds commands not yet sent (one in flight at most)."""

    def __init__(self, payload: bytes):
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(p2c_r), str(c2p_w), str(os.getpid())],
                                         pass_fds=(p2c_r, c2p_w), stdin=subprocess.DEVNULL, env=env)
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
        self.send_conn = Connection(p2c_w, readable=False)
        self.conn = Connection(c2p_r, writable=False)
        self.send_conn.send((list(sys.path), payload))
        self.pid = self.proc.pid
        self.started_at = time.monotonic()
        self.ready = False
        self.queue: deque[tuple[int, str, object]] = deque()  # (episode, kind, arg)
        self.inflight: tuple[int, int, str] | None = None  # (seq, episode, kind)
        self.deadline = 0.0

    def kill(self) -> int | None:
        """SIGKILL (if alive) and reap; the exit code (negative: the signal)."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(timeout=10.0)
        for c in (self.send_conn, self.conn):
            if not c.closed:
                c.close()
        return code


def _shutdown(workers: list[_Worker]) -> None:
    # Idle workers close their envs and exit on a None message; busy or stuck ones are killed.
    polite = []
    for w in workers:
        if w.ready and w.inflight is None and w.proc.poll() is None:
            try:
                w.send_conn.send(None)
                polite.append(w)
                continue
            except (OSError, ValueError):
                pass
        w.kill()
    for w in polite:
        try:
            w.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            log.warning("env worker pid %d did not exit within 5 s of close(); killed", w.pid)
        w.kill()
    workers.clear()


def _check_step_args(actions: Mapping[int, str], episodes: dict[int, _Episode]) -> None:
    """Every key an episode of the last reset that has not finished; every action a str."""
    for i, action in actions.items():
        if i not in episodes:
            raise ValueError(f"unknown episode {i!r}: the last reset started episodes 0..{len(episodes) - 1}")
        if episodes[i].finished:
            raise ValueError(f"episode {i} (game {episodes[i].spec.game!r}) has already finished; "
                             "step only episodes whose last result had done=False")
        if not isinstance(action, str):
            raise TypeError(f"the action for episode {i} must be a str, got {type(action).__name__}: {action!r}")


def _check_specs(specs: Sequence[EpisodeSpec]) -> None:
    for i, s in enumerate(specs):
        if not isinstance(s, EpisodeSpec):
            raise TypeError(f"specs[{i}] must be an EpisodeSpec, got {type(s).__name__}: {s!r}")


def _new_stats() -> dict[str, int]:
    return {"episodes": 0, "steps": 0, **{f"failed_{k}": 0 for k in _FAILURE_KINDS}, "worker_restarts": 0}


class EnvPool:
    """``num_workers`` processes, each hosting the envs of the episodes it owns (one env per episode).

    step_timeout_s: wall-clock limit of one reset or step (the worker is killed past it);
    episode_timeout_s: wall-clock limit of an episode from its reset (agent time included),
    checked before each of its steps. ``stats``: episodes started, env steps answered, failed
    episodes by kind (crash: the worker died; timeout: step or episode limit; error: the env
    raised) and worker restarts.
    """

    def __init__(self, factory: EnvFactory, num_workers: int, step_timeout_s: float = 60.0,
                 episode_timeout_s: float = 1800.0):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        for name, value in (("step_timeout_s", step_timeout_s), ("episode_timeout_s", episode_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0 (seconds), got {value!r}")
        try:  # once, here: an unpicklable factory (a lambda, a local class) fails now, not in a worker
            self._payload = pickle.dumps(factory)
        except Exception as exc:
            raise TypeError(f"factory must be picklable (a module-level class or functools.partial of one), "
                            f"got {factory!r}: {_error_text(exc)}") from exc
        self.num_workers = num_workers
        self.step_timeout_s = float(step_timeout_s)
        self.episode_timeout_s = float(episode_timeout_s)
        self._workers: list[_Worker] = [_Worker(self._payload) for _ in range(num_workers)]
        self._episodes: dict[int, _Episode] = {}
        self._generation = 0
        self._seq = 0
        self._stats = _new_stats()
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def reset(self, specs: Sequence[EpisodeSpec]) -> list[EnvObservation | EnvStep]:
        """Start one episode per spec (episode i plays ``specs[i]``); earlier episodes are dropped.
        A slot whose reset failed holds ``EnvStep(failed=True, done=True, error=...)``."""
        self._check_open()
        _check_specs(specs)
        self._generation += 1
        now = time.monotonic()
        self._episodes = {i: _Episode(s, i % self.num_workers, now) for i, s in enumerate(specs)}
        self._stats["episodes"] += len(specs)
        results = self._run([(i, "reset", s) for i, s in enumerate(specs)])
        return [results[i] for i in range(len(specs))]

    def step(self, actions: Mapping[int, str]) -> dict[int, EnvStep]:
        """Step the given episodes (keys: episode indices of the last reset) in parallel."""
        self._check_open()
        _check_step_args(actions, self._episodes)
        results: dict[int, EnvStep] = {}
        commands = []
        now = time.monotonic()
        for i, action in actions.items():
            ep = self._episodes[i]
            if ep.lost is not None:
                results[i], ep.finished = ep.lost, True
            elif now - ep.started_at > self.episode_timeout_s:
                reason = f"episode exceeded episode_timeout_s={self.episode_timeout_s:g} ({now - ep.started_at:.1f} s)"
                results[i] = self._fail(i, "timeout", reason)
            else:
                commands.append((i, "step", action))
        results.update(self._run(commands))
        return {i: results[i] for i in actions}

    def _fail(self, i: int, kind: str, reason: str) -> EnvStep:
        ep = self._episodes[i]
        ep.finished = True
        self._stats[f"failed_{kind}"] += 1
        log.error("env episode %d (game %s) failed: %s", i, ep.spec.game, reason)
        return _failed(reason)

    def _run(self, commands: list[tuple[int, str, object]]) -> dict[int, EnvObservation | EnvStep]:
        """Send every command to its episode's worker (one in flight per worker), collect replies."""
        for w in self._workers:  # anything left by an interrupted call: its late reply is dropped (seq)
            w.queue.clear()
            w.inflight = None
        for cmd in commands:
            self._workers[self._episodes[cmd[0]].worker].queue.append(cmd)
        results: dict[int, EnvObservation | EnvStep] = {}
        while True:
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.inflight is None and w.queue:
                    i, kind, arg = w.queue.popleft()
                    self._seq += 1
                    try:
                        w.send_conn.send((self._seq, self._generation, kind, i, arg))
                    except (OSError, ValueError) as exc:  # died while idle
                        self._lose_worker(w, "crash", f"could not be sent the {kind} ({_error_text(exc)})", results)
                        continue
                    w.inflight, w.deadline = (self._seq, i, kind), now + self.step_timeout_s
            waiting = [w for w in self._workers if w.inflight is not None or (w.queue and not w.ready)]
            if not waiting:
                return results
            wake = min(w.deadline if w.ready else w.started_at + _START_TIMEOUT_S for w in waiting)
            by_conn = {id(w.conn): w for w in waiting}
            for conn in wait([w.conn for w in waiting], timeout=max(0.0, wake - time.monotonic())):
                self._receive(by_conn[id(conn)], results)
            now = time.monotonic()
            for w in waiting:
                if w not in self._workers:
                    continue  # already replaced while receiving
                if w.inflight is not None and now >= w.deadline:
                    kind = w.inflight[2]
                    self._lose_worker(w, "timeout", f"exceeded step_timeout_s={self.step_timeout_s:g} on a {kind}",
                                      results)
                elif not w.ready and now >= w.started_at + _START_TIMEOUT_S:
                    self._lose_worker(w, "crash", f"did not start within {_START_TIMEOUT_S:g} s", results)

    def _receive(self, w: _Worker, results: dict) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            try:
                code = w.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:  # pipe closed but still alive: killed below
                code = None
            how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            when = "" if w.ready else " during start-up (its stderr says why)"
            self._lose_worker(w, "crash", f"died{when} ({how})", results)
            return
        if msg[0] == "ready":
            w.ready = True
            if msg[2]:
                log.warning("env worker pid %d could not build an env at start-up: %s", w.pid, msg[2])
            return
        seq, (status, payload) = msg
        if w.inflight is None or seq != w.inflight[0]:
            return  # the reply to a command of an interrupted earlier call
        _, i, kind = w.inflight
        w.inflight = None
        if status == "ok":
            results[i] = payload
            if kind == "step":
                self._stats["steps"] += 1
                self._episodes[i].finished = payload.done
        else:
            results[i] = self._fail(i, "error", f"the env raised {payload}")

    def _lose_worker(self, w: _Worker, kind: str, reason: str, results: dict) -> None:
        """Kill and replace ``w``; each unfinished episode it hosted ends failed (now if part of
        this call, else at its next step)."""
        idx = self._workers.index(w)
        in_call = {cmd[0] for cmd in w.queue} | ({w.inflight[1]} if w.inflight else set())
        w.kill()
        self._workers[idx] = _Worker(self._payload)
        self._stats["worker_restarts"] += 1
        for i, ep in self._episodes.items():
            if ep.worker != idx or ep.finished or ep.lost is not None:
                continue
            step = self._fail(i, kind, f"env worker pid {w.pid} {reason}")
            # an episode answered earlier in this call (``i in results``) lost its state as well
            if i in in_call or i in results:
                results[i] = step
            else:
                ep.lost, ep.finished = step, False  # still steppable once, to be told

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EnvPool used after close()")

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SerialEnvRunner:
    """EnvPool's API in this process, one env per episode, no timeouts (nothing can interrupt an
    in-process step): the single-process baseline, and the easy thing to debug an env under."""

    def __init__(self, factory: EnvFactory):
        self._factory = factory
        self._envs: dict[int, TextEnv] = {}  # episode slot -> env, reused by the next reset
        self._episodes: dict[int, _Episode] = {}
        self._stats = _new_stats()

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def reset(self, specs: Sequence[EpisodeSpec]) -> list[EnvObservation | EnvStep]:
        _check_specs(specs)
        now = time.monotonic()
        self._episodes = {i: _Episode(s, 0, now) for i, s in enumerate(specs)}
        self._stats["episodes"] += len(specs)
        out: list[EnvObservation | EnvStep] = []
        for i, spec in enumerate(specs):
            try:
                env = self._envs[i] = self._envs.get(i) or self._factory()
                out.append(env.reset(spec))
            except Exception as exc:
                out.append(self._fail(i, f"the env raised {_error_text(exc)}"))
        return out

    def step(self, actions: Mapping[int, str]) -> dict[int, EnvStep]:
        _check_step_args(actions, self._episodes)
        out: dict[int, EnvStep] = {}
        for i, action in actions.items():
            try:
                res = self._envs[i].step(action)
            except Exception as exc:
                out[i] = self._fail(i, f"the env raised {_error_text(exc)}")
                continue
            self._stats["steps"] += 1
            self._episodes[i].finished = res.done
            out[i] = res
        return out

    def _fail(self, i: int, reason: str) -> EnvStep:
        self._envs.pop(i, None)  # its state is unknown after a raise: never reused
        self._episodes[i].finished = True
        self._stats["failed_error"] += 1
        log.error("env episode %d (game %s) failed: %s", i, self._episodes[i].spec.game, reason)
        return _failed(reason)

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()

    def __enter__(self) -> "SerialEnvRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
