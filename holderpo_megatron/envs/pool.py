"""Text environments in worker processes, with per-step and per-episode timeouts.

    with EnvPool(partial(AlfworldEnv, cfg), num_workers=8) as pool:
        firsts = pool.reset(specs)              # episode i plays specs[i]
        results = pool.step({0: "go to desk 1", 3: "look"})

Episode ``i`` lives on worker ``i % num_workers`` for its whole life (its game state is in that
process). The parent sends each worker one command at a time, so every reset/step has its own
deadline; a worker that overruns it, or dies, is SIGKILLed and replaced, and every unfinished
episode it hosted ends ``failed`` (its state died with it). The batch never stalls on one game.

The worker processes (fresh interpreters, deadlines, kill, orphan exit) are
:mod:`holderpo_megatron.workers.subprocess_pool`'s; this module decides which worker runs what and
what a lost worker costs. The factory travels pickled (by reference: a module-level class or
``functools.partial``) with the parent's ``sys.path``.

Not thread-safe: one ``reset``/``step`` at a time.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Mapping, Sequence

from holderpo_megatron.envs.interface import EnvFactory, EnvObservation, EnvStep, EpisodeSpec, TextEnv
from holderpo_megatron.workers.subprocess_pool import Lost, Reply, SubprocessPool, WorkerProgram, error_text

__all__ = ["EnvPool", "SerialEnvRunner"]

log = logging.getLogger("holderpo.envs")

# Interpreter start + the env's imports (textworld: ~1 s) on a loaded machine; not charged to
# the first reset, which is dispatched only once the worker says it is ready.
_START_TIMEOUT_S = 120.0
_FAILURE_KINDS = ("crash", "timeout", "error")


def _failed(reason: str) -> EnvStep:
    return EnvStep(observation="", admissible_actions=(), reward=0.0, done=True, failed=True, error=reason)


# ----------------------------------------------------------------------------- worker side

class _EnvProgram(WorkerProgram):
    """What each worker runs: the envs of the episodes it hosts, one env per episode.

    A request is ``(generation, kind, episode, arg)`` with kind "reset" (arg: the EpisodeSpec) or
    "step" (arg: the action). A new ``generation`` (a new pool ``reset``) frees every env of the
    previous one for reuse."""

    def __init__(self, factory: EnvFactory):
        self.factory = factory

    def __repr__(self) -> str:
        return f"_EnvProgram(factory={self.factory!r})"

    def start(self) -> str:
        self.idle: list[TextEnv] = []
        self.envs: dict[int, TextEnv] = {}
        self.generation = 0
        try:
            self.idle.append(self.factory())  # pays the env's imports now, outside the first reset's deadline
        except Exception as exc:  # logged by the parent; each reset will retry and fail
            return f"could not build an env at start-up: {error_text(exc)}"
        return ""

    def handle(self, request):
        generation, kind, episode, arg = request
        if generation != self.generation:
            self.idle.extend(self.envs.values())
            self.envs.clear()
            self.generation = generation
        try:
            if kind == "reset":
                env = self.envs.pop(episode, None) or (self.idle.pop() if self.idle else self.factory())
                self.envs[episode] = env
                return env.reset(arg)
            return self.envs[episode].step(arg)
        except Exception:
            self.envs.pop(episode, None)  # its state is unknown after a raise: never reused
            raise

    def close(self) -> None:
        for env in [*self.envs.values(), *self.idle]:
            env.close()


# ----------------------------------------------------------------------------- parent side

@dataclass
class _Episode:
    spec: EpisodeSpec
    worker: int  # slot in EnvPool's worker list (SerialEnvRunner: unused)
    started_at: float
    finished: bool = False
    lost: EnvStep | None = None  # its worker died while it was not being stepped: told at its next step


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
        self.num_workers = num_workers
        self.step_timeout_s = float(step_timeout_s)
        self.episode_timeout_s = float(episode_timeout_s)
        # an unpicklable factory (a lambda, a local class) fails here, with a TypeError
        self._pool = SubprocessPool(_EnvProgram(factory), num_workers, name="env", log=log,
                                    startup_timeout_s=_START_TIMEOUT_S)
        # per worker slot: commands of the current call not yet sent, (episode, kind, arg); one in flight at most
        self._queues: list[deque[tuple[int, str, object]]] = [deque() for _ in range(num_workers)]
        self._episodes: dict[int, _Episode] = {}
        self._generation = 0
        self._stats = _new_stats()
        self._closed = False

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    @property
    def worker_pids(self) -> list[int]:
        return self._pool.pids

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
        self._pool.abandon_calls()  # anything left by an interrupted call: its late reply is dropped
        for q in self._queues:
            q.clear()
        for cmd in commands:
            self._queues[self._episodes[cmd[0]].worker].append(cmd)
        results: dict[int, EnvObservation | EnvStep] = {}
        while True:
            self._dispatch(results)
            # a starting worker is waited on only if it has work queued (else nothing is owed)
            waiting = [w for w, q in zip(self._pool.workers, self._queues) if w.busy or (q and not w.ready)]
            if not waiting:
                return results
            for event in self._pool.wait(waiting):
                slot = self._pool.workers.index(event.worker)
                if isinstance(event, Reply):
                    self._take_reply(event, results)
                else:
                    self._lose_worker(slot, event, results)

    def _dispatch(self, results: dict) -> None:
        """Each ready, idle worker gets the next command of its queue."""
        for slot, (w, q) in enumerate(zip(self._pool.workers, self._queues)):
            if not (w.ready and not w.busy and q):
                continue
            i, kind, arg = q.popleft()
            if not self._pool.submit(w, (self._generation, kind, i, arg), (i, kind), self.step_timeout_s):
                self._lose_worker(slot, f"could not be sent the {kind} (its pipe is closed)", results,
                                  in_flight=i)

    def _take_reply(self, event: Reply, results: dict) -> None:
        i, kind = event.tag
        if not event.ok:
            results[i] = self._fail(i, "error", f"the env raised {event.value}")
            return
        results[i] = event.value
        if kind == "step":
            self._stats["steps"] += 1
            self._episodes[i].finished = event.value.done

    def _lose_worker(self, slot: int, why: Lost | str, results: dict, in_flight: int | None = None) -> None:
        """Kill and replace the worker in ``slot``; each unfinished episode it hosted ends failed
        (now if part of this call, else at its next step). ``why``: the pool's event, or a reason
        (a crash)."""
        if isinstance(why, Lost):
            kind = "timeout" if why.cause == "timeout" else "crash"
            reason = (f"exceeded step_timeout_s={self.step_timeout_s:g} on a {why.tag[1]}" if why.cause == "timeout"
                      else why.reason)
            in_flight = why.tag[0] if why.tag else None
        else:
            kind, reason = "crash", why
        w = self._pool.workers[slot]
        in_call = {cmd[0] for cmd in self._queues[slot]} | ({in_flight} if in_flight is not None else set())
        self._queues[slot].clear()
        self._pool.replace(w)
        self._stats["worker_restarts"] += 1
        for i, ep in self._episodes.items():
            if ep.worker != slot or ep.finished or ep.lost is not None:
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
        self._pool.close()

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
                out.append(self._fail(i, f"the env raised {error_text(exc)}"))
        return out

    def step(self, actions: Mapping[int, str]) -> dict[int, EnvStep]:
        _check_step_args(actions, self._episodes)
        out: dict[int, EnvStep] = {}
        for i, action in actions.items():
            try:
                res = self._envs[i].step(action)
            except Exception as exc:
                out[i] = self._fail(i, f"the env raised {error_text(exc)}")
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
