"""EnvPool on a tiny real env (a counter game) and on envs that crash, hang or raise on cue:
the batch always completes, failures are counted and logged, timeouts are honoured, no worker
outlives the pool or its parent.

The env lives here at module level so that it pickles into the worker processes.
"""

import logging
import os
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import psutil
import pytest

from holderpo_megatron.envs import EnvObservation, EnvPool, EnvStep, EpisodeSpec, SerialEnvRunner, TextEnv

ROOT = Path(__file__).resolve().parents[2]


class CounterEnv(TextEnv):
    """Say "inc" ``target`` times to win; "stop" loses; anything else is invalid.

    ``game`` = "<target>" or "<target>:<fault>@<step>" with fault crash (os._exit), hang (sleep)
    or raise, at that step (0: during reset).
    """

    def __init__(self, max_steps: int = 10):
        self.max_steps = max_steps

    def reset(self, spec: EpisodeSpec) -> EnvObservation:
        target, _, fault = spec.game.partition(":")
        self.target, self.count, self.steps = int(target), 0, 0
        self.fault, _, at = fault.partition("@")
        self.fault_at = int(at) if at else -1
        self._maybe_fail()
        return EnvObservation(task=f"Count to {self.target}.", observation="count: 0",
                              admissible_actions=("inc", "stop"))

    def step(self, action: str) -> EnvStep:
        self.steps += 1
        self._maybe_fail()
        invalid = action not in ("inc", "stop")
        if action == "inc":
            self.count += 1
        won = self.count == self.target
        done = won or action == "stop" or self.steps >= self.max_steps
        return EnvStep(observation="Nothing happens." if invalid else f"count: {self.count}",
                       admissible_actions=("inc", "stop"), reward=float(won), done=done, won=won, invalid=invalid)

    def _maybe_fail(self) -> None:
        if self.steps != self.fault_at:
            return
        if self.fault == "crash":
            os._exit(3)
        if self.fault == "hang":
            time.sleep(3600)
        if self.fault == "raise":
            raise RuntimeError(f"boom at step {self.steps}")


def specs(*games: str) -> list[EpisodeSpec]:
    return [EpisodeSpec(game=g, task_type="count") for g in games]


def play(runner, games: list[str], actions_for=lambda i, t: "inc") -> dict[int, list]:
    """Drive every episode to its end; per episode, the results in order (reset's first)."""
    history = {i: [r] for i, r in enumerate(runner.reset(specs(*games)))}
    active = {i for i, h in history.items() if isinstance(h[0], EnvObservation)}
    t = 0
    while active:
        results = runner.step({i: actions_for(i, t) for i in sorted(active)})
        for i, r in results.items():
            history[i].append(r)
            if r.done:
                active.discard(i)
        t += 1
    return history


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_pool_plays_like_the_serial_runner_and_counts():
    games = ["1", "3", "2", "4", "2"]
    invalid_at_first = lambda i, t: "jump" if (i, t) == (1, 0) else "inc"  # noqa: E731
    with SerialEnvRunner(CounterEnv) as serial:
        expected = play(serial, games, invalid_at_first)
    with EnvPool(CounterEnv, num_workers=2) as pool:
        got = play(pool, games, invalid_at_first)
        assert got == expected
        assert all(h[-1].won and not h[-1].failed for h in got.values())
        assert got[1][1].invalid and got[1][1].observation == "Nothing happens."
        steps = sum(len(h) - 1 for h in got.values())
        assert pool.stats == {"episodes": 5, "steps": steps, "failed_crash": 0, "failed_timeout": 0,
                              "failed_error": 0, "worker_restarts": 0}
        # a second batch reuses the workers' envs and episode numbering starts afresh
        again = play(pool, ["2", "1"])
        assert [h[-1].won for h in again.values()] == [True, True]
        assert pool.stats["episodes"] == 7


def test_crash_fails_every_episode_of_that_worker_and_the_worker_is_replaced(caplog):
    caplog.set_level(logging.ERROR, logger="holderpo.envs")
    # 2 workers: episodes 0, 2, 4 on worker 0; 1, 3 on worker 1. Episode 1 crashes its worker at step 2.
    with EnvPool(CounterEnv, num_workers=2) as pool:
        firsts = pool.reset(specs("3", "5:crash@2", "3", "5", "3"))
        assert all(isinstance(f, EnvObservation) for f in firsts)
        old_pid = pool.worker_pids[1]
        pool.step({i: "inc" for i in range(5)})
        out = pool.step({i: "inc" for i in (0, 1, 2, 4)})  # episode 3 sits this one out
        assert out[1].failed and out[1].done and not out[1].won
        assert "died" in out[1].error and str(old_pid) in out[1].error
        assert not any(out[i].failed for i in (0, 2, 4))
        lost = pool.step({3: "inc"})[3]  # it shared the crashed worker: its state is gone
        assert lost.failed and lost.done and str(old_pid) in lost.error
        assert all(r.won for r in pool.step({0: "inc", 2: "inc", 4: "inc"}).values())  # worker 0's carry on
        assert pool.stats["failed_crash"] == 2 and pool.stats["worker_restarts"] == 1
        assert pool.worker_pids[1] != old_pid and alive([pool.worker_pids[1]])
        lines = [r.getMessage() for r in caplog.records]
        assert any("5:crash@2" in m and str(old_pid) in m and "died" in m for m in lines), lines
        # the replacement works; a crash during reset fails that slot and its worker's other
        # episodes (episode 0, reset just before on the same worker, lost its env too)
        firsts = pool.reset(specs("1", "1", "1:crash@0", "1"))
        assert [isinstance(f, EnvObservation) for f in firsts] == [False, True, False, True]
        assert firsts[2].failed and firsts[2].done and firsts[0].failed


def test_a_hanging_step_is_cut_off_within_the_step_timeout(caplog):
    timeout = 1.5
    with EnvPool(CounterEnv, num_workers=2, step_timeout_s=timeout) as pool:
        pool.reset(specs("3", "3:hang@1", "3", "3"))
        hung_pid = pool.worker_pids[1]
        t0 = time.monotonic()
        out = pool.step({i: "inc" for i in range(4)})
        took = time.monotonic() - t0
        assert timeout <= took < timeout + 5.0, took
        assert out[1].failed and out[3].failed and "step_timeout_s=1.5" in out[1].error
        assert not out[0].failed and not out[2].failed
        assert pool.stats["failed_timeout"] == 2
        assert not alive([hung_pid])
        assert any("3:hang@1" in r.getMessage() and str(hung_pid) in r.getMessage() for r in caplog.records)
        # a hang during reset is cut off the same way
        t0 = time.monotonic()
        firsts = pool.reset(specs("1", "1:hang@0"))
        assert time.monotonic() - t0 < timeout + 5.0
        assert isinstance(firsts[0], EnvObservation) and firsts[1].failed


def test_an_env_that_raises_fails_only_its_episode():
    with EnvPool(CounterEnv, num_workers=2) as pool:
        firsts = pool.reset(specs("2", "2:raise@1", "2", "2", "1:raise@0"))
        assert firsts[4].failed and "RuntimeError: boom at step 0" in firsts[4].error
        out = pool.step({i: "inc" for i in range(4)})
        assert out[1].failed and out[1].done and "RuntimeError: boom at step 1" in out[1].error
        assert not out[3].failed  # same worker, unharmed: only a crash or hang costs the worker
        assert all(r.won for r in pool.step({0: "inc", 2: "inc", 3: "inc"}).values())
        assert pool.stats["failed_error"] == 2 and pool.stats["worker_restarts"] == 0
    with SerialEnvRunner(CounterEnv) as serial:
        firsts = serial.reset(specs("2:raise@1", "1"))
        out = serial.step({0: "inc", 1: "inc"})
        assert out[0].failed and "boom" in out[0].error and out[1].won
        assert serial.stats["failed_error"] == 1


def test_episode_timeout_ends_the_episode():
    with EnvPool(CounterEnv, num_workers=1, episode_timeout_s=0.5) as pool:
        pool.reset(specs("3", "3"))
        time.sleep(0.6)
        out = pool.step({0: "inc"})
        assert out[0].failed and "episode_timeout_s=0.5" in out[0].error
        assert pool.stats["failed_timeout"] == 1


def test_bad_arguments_and_bad_episode_keys_are_refused():
    for kwargs, match in [({"num_workers": 0}, "num_workers"),
                          ({"num_workers": 1, "step_timeout_s": 0}, "step_timeout_s"),
                          ({"num_workers": 1, "episode_timeout_s": -1.0}, "episode_timeout_s")]:
        with pytest.raises(ValueError, match=match):
            EnvPool(CounterEnv, **kwargs)
    with pytest.raises(TypeError, match="picklable"):
        EnvPool(lambda: CounterEnv(), num_workers=1)
    for runner in (EnvPool(partial(CounterEnv, max_steps=3), num_workers=1), SerialEnvRunner(CounterEnv)):
        with runner:
            with pytest.raises(TypeError, match=r"specs\[1\]"):
                runner.reset([EpisodeSpec("1"), "2"])
            runner.reset(specs("1", "2"))
            with pytest.raises(ValueError, match="unknown episode 7"):
                runner.step({7: "inc"})
            with pytest.raises(TypeError, match="episode 1 must be a str"):
                runner.step({1: 5})
            assert runner.step({0: "inc"})[0].won
            with pytest.raises(ValueError, match="episode 0 .* has already finished"):
                runner.step({0: "inc"})
    pool = EnvPool(CounterEnv, num_workers=1)
    pool.close()
    with pytest.raises(RuntimeError, match="after close"):
        pool.reset(specs("1"))


def test_no_worker_outlives_close():
    pool = EnvPool(CounterEnv, num_workers=3)
    pool.reset(specs("2", "2", "2:hang@1"))
    pids = pool.worker_pids
    assert len(alive(pids)) == 3
    pool.close()
    pool.close()  # idempotent
    assert alive(pids) == []


_ORPHAN_SCRIPT = textwrap.dedent("""
    import os, sys, threading, time
    import torch.distributed as dist
    from tests.unit.test_envs_pool import CounterEnv, specs
    from holderpo_megatron.envs import EnvPool

    # a torchrun-like parent: a gloo group initialised and a live thread before the pool starts
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
    pool = EnvPool(CounterEnv, num_workers=2)
    firsts = pool.reset(specs("1", "1", "5:hang@1"))
    assert pool.step({0: "inc", 1: "inc"})[0].won
    print(" ".join(map(str, pool.worker_pids)), flush=True)
    pool.step({2: "inc"})  # hangs in a worker until the step timeout; the parent is killed first
""")


def test_workers_exit_when_the_parent_dies_even_mid_step(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "gloo_store")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        line = parent.stdout.readline()
        assert line.strip(), parent.stderr.read()
        pids = [int(p) for p in line.split()]
        assert len(alive(pids)) == 2
        time.sleep(0.5)  # let the hanging step start
        parent.kill()  # SIGKILL: no atexit, no finalizer runs
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10.0
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(pids) == [], "env workers outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
