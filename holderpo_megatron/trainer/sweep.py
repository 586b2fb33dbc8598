"""`holderpo sweep`: one recipe, a grid of overrides, several seeds; each run a `holderpo train`.

    holderpo sweep --config RECIPE --grid GRID.yaml [--grid key=v1,v2 ...] --seeds 1,2,3 --out DIR \\
                   [--parallel N] [key=value ...]

The grid is the cartesian product of its parts: a YAML file of named configs (``name: {dotted.key:
value, ...}``) and ``key=v1,v2`` lists, each list a factor; each config runs once per seed
(``train.seed``) in ``DIR/<config>/seed<k>`` (``output_dir=DIR/<config>``, ``name=seed<k>``).
Overrides apply in this order: the recipe, the command line's ``key=value``, the config's own, then
what the sweep sets (run directory, seed, ``checkpoint.every``, ``checkpoint.resume=true``).

Every run's configuration is loaded and validated before the first run starts. Resumable: a run
whose ``sweep_done.json`` exists is skipped; any other resumes from its last checkpoint (saved every
``checkpoint.every`` steps, 1 by default, so a killed sweep loses at most the step in flight). A run's
overrides are kept in ``sweep_run.json``; a restart with other overrides for that directory is
refused. ``DIR/summary.{json,md}`` are written at the end (and whenever asked: ``--summary-only``).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ConfigError, RunConfig, load_run_config, validate_run
from .config_loader import _parse_yaml

__all__ = ["SweepRun", "parse_grid", "parse_seeds", "plan_sweep", "run_sweep", "override_string", "DONE_FILE",
           "RUN_FILE", "SWEEP_OWNED"]

DONE_FILE = "sweep_done.json"
RUN_FILE = "sweep_run.json"
LOG_FILE = "train.log"
# keys the sweep sets itself: a grid entry or override naming one is refused
SWEEP_OWNED = ("name", "output_dir", "train.seed", "checkpoint.resume")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


def override_string(key: str, value) -> str:
    """``key=value`` that :func:`~.config_loader.apply_overrides` parses back to ``value``."""
    if isinstance(value, str):
        try:
            if _parse_yaml(value) == value:
                return f"{key}={value}"
        except yaml.YAMLError:
            pass
    return f"{key}={json.dumps(value)}"  # JSON is YAML: quoted strings, numbers, lists, mappings


def _check_name(name, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: config name {name!r} is not a directory name; allowed: letters, digits and "
                          "._=+- (not starting with a punctuation mark)")
    return name


def _grid_file(path: Path) -> list[tuple[str, list[str]]]:
    from .config_loader import load_yaml_with_defaults

    data = load_yaml_with_defaults(path)
    if not data:
        raise ConfigError(f"grid {path}: no configs; expected a mapping of config names to overrides, e.g. "
                          "grpo: {algorithm.loss: grpo}")
    out = []
    for name, over in data.items():
        _check_name(name, f"grid {path}")
        if over is None:
            over = {}
        if not isinstance(over, dict):
            raise ConfigError(f"grid {path}: config {name!r} must be a mapping of overrides (dotted.key: value), "
                              f"got {type(over).__name__} {over!r}")
        for k in over:
            if not isinstance(k, str) or not k.strip():
                raise ConfigError(f"grid {path}: config {name!r}: key {k!r} must be a dotted key (train.steps)")
        # each entry is one override: a mapping value replaces the section whole, as key={...} would
        out.append((name, [override_string(k, v) for k, v in over.items()]))
    return out


def _grid_list(item: str) -> list[tuple[str, list[str]]]:
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        values = _parse_yaml(f"[{raw}]")
    except yaml.YAMLError:
        raise ConfigError(f"grid {item!r}: {raw!r} is not a comma-separated list of values") from None
    if not key or not raw.strip() or not values:
        raise ConfigError(f"grid {item!r} must look like key.sub=v1,v2")
    short = key.rsplit(".", 1)[-1]
    out = []
    for v in values:
        label = v if isinstance(v, str) else json.dumps(v)
        name = re.sub(r"[^A-Za-z0-9._=+-]", "", f"{short}={label}")
        out.append((_check_name(name, f"grid {item!r}"), [override_string(key, v)]))
    return out


def parse_grid(parts: list[str]) -> list[tuple[str, list[str]]]:
    """The configs of a grid: ``[(name, [key=value, ...]), ...]``, the cartesian product of the
    parts (a YAML file of named configs, or ``key=v1,v2``), names joined by ``_``. No parts: one
    config, ``base``, with no overrides."""
    factors = []
    for part in parts:
        if "=" in part and not Path(part).is_file():
            factors.append(_grid_list(part))
        elif Path(part).is_file():
            factors.append(_grid_file(Path(part)))
        elif Path(part).suffix in (".yaml", ".yml"):
            raise ConfigError(f"grid file {part!r} does not exist")
        else:
            raise ConfigError(f"grid {part!r} is neither a YAML file of named configs nor key=v1,v2")
    if not factors:
        return [("base", [])]
    configs = []
    for combo in itertools.product(*factors):
        configs.append(("_".join(n for n, _ in combo), [o for _, over in combo for o in over]))
    names = [n for n, _ in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"grid: config names repeat: {', '.join(dup)}; give each config its own name")
    return configs


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} must be comma-separated integers, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} must name at least one seed, each once")
    return seeds


@dataclass
class SweepRun:
    config: str
    seed: int
    overrides: list[str]  # everything after the recipe, in order: the command line, the config, the sweep's
    cfg: RunConfig

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def label(self) -> str:
        return f"{self.config}/seed{self.seed}"


def _owned(overrides: list[str], where: str) -> None:
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key in SWEEP_OWNED:
            raise ConfigError(f"{where}: {key!r} is set by the sweep (run directory DIR/<config>/seed<k>, "
                              f"train.seed from --seeds, resume on); remove {o!r}")


def plan_sweep(recipe: str, grid: list[tuple[str, list[str]]], seeds: list[int], out: str | os.PathLike,
               overrides: list[str], checkpoint_every: int = 1, check_paths: bool = True) -> list[SweepRun]:
    """Every run of the sweep, loaded and validated (a ConfigError naming the config, seed and bad
    key before anything starts). Seed-major: every config's first seed, then the second, ... so a
    sweep stopped early has compared every config."""
    if checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
    _owned(overrides, "overrides")
    out = Path(out).absolute()
    runs = []
    for seed in seeds:
        for name, over in grid:
            _owned(over, f"grid config {name!r}")
            sweep = [override_string("output_dir", str(out / name)), f"name=seed{seed}", f"train.seed={seed}",
                     "checkpoint.resume=true"]
            try:
                base = load_run_config(recipe, [*overrides, *over])
                # keep a recipe's denser checkpoints; never fewer than one every checkpoint_every steps
                every = base.checkpoint.every
                if not every or every > checkpoint_every:
                    sweep.append(f"checkpoint.every={checkpoint_every}")
                full = [*overrides, *over, *sweep]
                cfg = load_run_config(recipe, full)
                validate_run(cfg, check_paths=check_paths)
            except ConfigError as e:
                raise ConfigError(f"config {name!r} seed {seed}: {e}") from None
            runs.append(SweepRun(name, seed, full, cfg))
    return runs


def _check_previous(run: SweepRun, recipe: str) -> None:
    f = run.run_dir / RUN_FILE
    if not f.is_file():
        return
    before = json.loads(f.read_text())
    if before.get("overrides") != run.overrides or before.get("recipe") != str(Path(recipe).absolute()):
        raise ConfigError(f"{run.label}: {run.run_dir} was started by a sweep with other settings (recipe "
                          f"{before.get('recipe')}, overrides {before.get('overrides')}); use another --out, "
                          f"or delete that run directory to start it again")


def _final_step(run_dir: Path) -> int | None:
    from holderpo_megatron.observability.logger import read_metrics

    try:
        records = read_metrics(run_dir)
    except ValueError:
        return None
    return records[-1]["step"] if records else None


class _Runner:
    """Runs `holderpo train` per run; each child dies with this process (SIGKILL from the kernel), so
    a sweep killed with SIGKILL leaves no training behind, and SIGTERM/Ctrl-C stop them first."""

    def __init__(self, recipe: str):
        self.recipe = str(Path(recipe).absolute())
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def run(self, run: SweepRun) -> tuple[SweepRun, int]:
        from holderpo_megatron.rollout.sglang_launcher import module_command_dying_with_us

        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / RUN_FILE).write_text(json.dumps({"recipe": self.recipe, "overrides": run.overrides}, indent=1))
        cmd = module_command_dying_with_us("holderpo_megatron.cli", "train", "--config", self.recipe, *run.overrides)
        shown = " ".join(shlex.quote(c) for c in ["holderpo", "train", "--config", self.recipe, *run.overrides])
        print(f"sweep: {run.label}: starting ({run.run_dir / LOG_FILE})\n  {shown}", flush=True)
        t0 = time.time()
        with open(run.run_dir / LOG_FILE, "a") as log:
            log.write(f"\n==== holderpo sweep {time.strftime('%Y-%m-%d %H:%M:%S')}: {shown}\n")
            log.flush()
            with self.lock:
                if self.stopping:
                    return run, 130
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                self.procs.add(proc)
            rc = proc.wait()  # interrupted (Ctrl-C, SIGTERM): it stays in self.procs for stop()
            with self.lock:
                self.procs.discard(proc)
        last = _final_step(run.run_dir)
        if rc == 0 and last is not None and last >= run.cfg.train.steps:
            (run.run_dir / DONE_FILE).write_text(json.dumps({"steps": last, "seconds": time.time() - t0}))
            print(f"sweep: {run.label}: done ({time.time() - t0:.0f} s)", flush=True)
        else:
            if rc == 0:  # `holderpo train` said nothing was left, but the record stops short
                rc = 1
            from holderpo_megatron.rollout.sglang_launcher import log_tail

            print(f"sweep: {run.label}: FAILED (exit code {rc}; last logged step {last}); the end of "
                  f"{run.run_dir / LOG_FILE}:\n{log_tail(run.run_dir / LOG_FILE, 15)}", flush=True)
        return run, rc

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()


PLAN_FILE = "sweep.json"  # DIR/sweep.json: the recipe, the command and every run, in order


def summary_order(out: str | os.PathLike) -> tuple[list[str] | None, str | None]:
    """The configs of the sweep in ``out`` in its own order (the first is the summary's baseline) and
    its command, from ``DIR/sweep.json``; (None, None) where the sweep wrote none."""
    plan = Path(out) / PLAN_FILE
    known = json.loads(plan.read_text()) if plan.is_file() else {}
    return list(dict.fromkeys(r["config"] for r in known.get("runs", []))) or None, known.get("command")


def run_sweep(recipe: str, runs: list[SweepRun], out: str | os.PathLike, parallel: int = 1,
              command: str | None = None) -> int:
    """Run what is not done yet (``parallel`` at a time), then write the summary. 0: every run finished."""
    import signal

    from holderpo_megatron.observability.sweep_summary import write_summary

    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    out = Path(out)
    for run in runs:
        _check_previous(run, recipe)
    todo = [r for r in runs if not (r.run_dir / DONE_FILE).is_file()]
    for r in runs:
        if r not in todo:
            print(f"sweep: {r.label}: finished earlier, skipped", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(json.dumps({"recipe": str(Path(recipe).absolute()), "command": command,
                                                "runs": [{"config": r.config, "seed": r.seed, "run_dir": str(r.run_dir),
                                                          "overrides": r.overrides} for r in runs]}, indent=1))
    runner = _Runner(recipe)
    failed: list[tuple[SweepRun, int]] = []
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # stop the runs (they keep their checkpoints), then end as Ctrl-C does
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    # worker threads live until the pool shuts down: each child's death signal follows its thread
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="sweep") if parallel > 1 else None
    try:
        results = pool.map(runner.run, todo) if pool is not None else map(runner.run, todo)
        for r, rc in results:
            if rc:
                failed.append((r, rc))
    except KeyboardInterrupt:
        print("sweep: stopping the runs in flight (they resume from their last checkpoint when the sweep "
              "is started again)", file=sys.stderr, flush=True)
        runner.stop()
        return 130
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    configs = list(dict.fromkeys(r.config for r in runs))
    jpath, mpath = write_summary(out, configs, command)
    print(f"sweep: summary: {mpath} and {jpath}", flush=True)
    print(mpath.read_text(), flush=True)
    if failed:
        print("sweep: these runs did not finish (start the sweep again to resume them):\n" +
              "\n".join(f"  {r.label}: exit code {rc}, log {r.run_dir / LOG_FILE}" for r, rc in failed),
              file=sys.stderr, flush=True)
        return 1
    return 0
