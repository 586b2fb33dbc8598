"""ALFWorld environment throughput on CPU: SerialEnvRunner beside EnvPool with 1, 2 and 8 workers.

    .venv/bin/python bench/alfworld_throughput.py                    # 16 valid_seen games
    .venv/bin/python bench/alfworld_throughput.py --games 8 --workers 2 --repeats 1

Every runner replays the same episodes in lockstep rounds (one ``step`` call per round, all
active episodes at once, as an agent rollout does): each game's stored walkthrough with one
invalid action ("fly to the moon") after its first action. Timed from ``reset`` to the last
episode's end, after a warm-up reset that pays each process's start-up and imports. Reported:
env steps per second, mean episode wall time (reset to the round it ended in), the CPU seconds
the envs used (this process for serial, the workers for a pool) and the ratio to serial. Each
runner plays ``--repeats`` times, interleaved; the fastest counts (the machine may be shared).

Workers beyond the machine's cores cannot speed up CPU-bound games: compare 2 and 8 workers
with ``cpus`` in the JSON (written to bench/results/alfworld_throughput_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from holderpo_megatron.envs import (AlfworldEnv, AlfworldEnvConfig, EnvObservation, EnvPool,  # noqa: E402
                                    SerialEnvRunner, list_alfworld_games, prepare_alfworld_data)

INVALID_ACTION = "fly to the moon"


def cpu_seconds(runner) -> float:
    """User + system CPU seconds so far of the processes that run the envs."""
    pids = runner.worker_pids if isinstance(runner, EnvPool) else [os.getpid()]
    return sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)


def replay(runner, specs, plans) -> dict:
    """Play every plan to its end in lockstep rounds; wall time, steps, per-episode wall times."""
    cpu0, t0 = cpu_seconds(runner), time.perf_counter()
    firsts = runner.reset(specs)
    bad = [s.game for s, f in zip(specs, firsts) if not isinstance(f, EnvObservation)]
    if bad:
        raise RuntimeError(f"reset failed for {bad}")
    active, ended, wins, steps, t = set(range(len(specs))), {}, 0, 0, 0
    while active:
        results = runner.step({i: plans[i][t] for i in sorted(active)})
        now = time.perf_counter() - t0
        for i, r in results.items():
            if r.failed:
                raise RuntimeError(f"{specs[i].game}: {r.error}")
            steps += 1
            if r.done or t == len(plans[i]) - 1:
                active.discard(i)
                ended[i] = now
                wins += r.won
        t += 1
    wall = time.perf_counter() - t0
    if wins != len(specs):
        raise RuntimeError(f"only {wins}/{len(specs)} walkthroughs won")
    return {"wall_s": wall, "steps": steps, "steps_per_s": steps / wall,
            "mean_episode_s": sum(ended.values()) / len(ended), "env_cpu_s": cpu_seconds(runner) - cpu0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--games", type=int, default=16, help="valid_seen games (task types in turn)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "alfworld_throughput_cpu.json"))
    args = ap.parse_args()

    prepare_alfworld_data()
    specs = list_alfworld_games("valid_seen", limit=args.games)
    factory = partial(AlfworldEnv, AlfworldEnvConfig())
    plans = [w[:1] + [INVALID_ACTION] + w[1:] for w in (AlfworldEnv().walkthrough(s) for s in specs)]
    load_start = os.getloadavg()
    best: dict[int, dict] = {}
    for rep in range(args.repeats):
        for workers in [0] + args.workers:  # 0: the serial runner
            # a generous step timeout: on a shared machine with more workers than cores a reset can
            # take minutes of wall time, and this measures throughput, not hang detection
            runner = (SerialEnvRunner(factory) if workers == 0
                      else EnvPool(factory, num_workers=workers, step_timeout_s=900.0))
            with runner:
                runner.reset(specs[:max(1, workers)])  # warm-up: worker start-up and imports, a game each
                res = replay(runner, specs, plans)
            name = "serial" if workers == 0 else f"pool x{workers}"
            print(f"run {rep + 1}/{args.repeats} {name:<8} {res['wall_s']:.1f} s", flush=True)
            if workers not in best or res["wall_s"] < best[workers]["wall_s"]:
                best[workers] = {"runner": name, "workers": workers, **res}
    rows = list(best.values())
    for r in rows:
        r["speedup_vs_serial"] = r["steps_per_s"] / best[0]["steps_per_s"]

    print(f"\nALFWorld valid_seen, {len(specs)} games, {rows[0]['steps']} env steps ({len(specs)} invalid), "
          f"{os.cpu_count()} CPUs, load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}, "
          f"best of {args.repeats}")
    print(f"{'runner':<10}{'wall s':>8}{'steps/s':>9}{'episode s':>11}{'env CPU s':>11}{'vs serial':>11}")
    for r in rows:
        print(f"{r['runner']:<10}{r['wall_s']:>8.1f}{r['steps_per_s']:>9.2f}{r['mean_episode_s']:>11.1f}"
              f"{r['env_cpu_s']:>11.1f}{r['speedup_vs_serial']:>10.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"split": "valid_seen", "games": len(specs), "invalid_action": INVALID_ACTION,
                   "repeats": args.repeats, "cpus": os.cpu_count(), "load_average_start": load_start,
                   "load_average_end": os.getloadavg(), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
