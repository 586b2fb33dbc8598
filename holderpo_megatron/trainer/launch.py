"""`holderpo train`: this node's share of a run. Validate the recipe, then start torchrun with one
worker per GPU (or per CPU rank under gloo); on several nodes every node runs the same command with
its node rank (flags, or SLURM's variables: :mod:`.nodes`), and the exact torchrun command is printed.

Before any process starts: the recipe is validated (:func:`validate_run`, the data sets and their
prompt lengths), the run directory's lock is taken on node 0 (held by this process for the whole
run; a second run on the directory is refused), and a resume is checked (an ambiguous checkpoint root
is refused; a run that is already complete says so and starts nothing). torchrun is started so
that it dies with this process, and its workers die with it (:mod:`.run_guard`). A worker killed by
a signal is explained after torchrun's traceback (:mod:`.worker_deaths`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from holderpo_megatron.observability.console import RUN_LOG_ENV, RUN_LOG_NAME
from holderpo_megatron.rollout.sglang_launcher import log_tail

from .config import ConfigError, RunConfig, validate_run
from .nodes import NodeLaunch
from .run_guard import LOCK_OWNER_ENV, RunDirectoryBusy, acquire_run_lock


def launch_training(config_path: str, overrides: list[str], cfg: RunConfig, *, resume: bool = False,
                    dry_run: bool = False, nodes: dict | None = None) -> int:
    """``nodes``: the command line's ``nnodes``/``node_rank``/``master_addr``/``master_port`` (None:
    not given; then SLURM's or torchrun's variables, else one node)."""
    from holderpo_megatron.models.builtin import resolve_model_path
    from holderpo_megatron.models.hub import cached_hub_file, is_hub_id

    from .data_checks import check_prompt_lengths
    from .faults import rank_to_kill
    from .plan import arch_for_plan, check_host_memory

    try:
        node = NodeLaunch.resolve(nnodes=cfg.parallel.nnodes, nproc_per_node=cfg.parallel.nproc_per_node,
                                  flags=nodes, collective_timeout_s=cfg.parallel.collective_timeout_s)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    m = cfg.model
    hub = is_hub_id(m.hf_path)
    # Materialise a builtin model, or download a Hub model, once per node, here: this process runs
    # once per node and before the workers, which then only read it (no race, no rank downloading alone)
    if (hub or m.hf_path.startswith("builtin:")) and not dry_run:
        try:
            resolve_model_path(m.hf_path, revision=m.revision)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    arch = arch_for_plan(cfg)
    validate_run(cfg, arch)  # every error before any worker starts
    check_host_memory(cfg, arch)  # a CPU run that would meet the OOM killer: refused, naming what to lower
    try:
        rank_to_kill()  # a malformed fault-injection variable, before any worker starts
    except ValueError as e:
        raise ConfigError(str(e)) from e
    cmd = node.torchrun_command(["--config", config_path, *overrides, *(["checkpoint.resume=true"] if resume else [])])
    where = f"node {node.node_rank} of {node.nnodes}"
    if dry_run:
        # a builtin model is not built, nor a Hub model downloaded, by a dry run
        if hub and cached_hub_file(m.hf_path, "config.json", m.revision) is not None:
            check_prompt_lengths(cfg, resolve_model_path(m.hf_path, revision=m.revision, download=False))
        elif not hub and not m.hf_path.startswith("builtin:"):
            check_prompt_lengths(cfg, m.hf_path)
        print(f"launching ({where}):", " ".join(cmd), flush=True)
        return 0
    try:  # node 0 holds the run directory (shared by every node on a cluster)
        lock = acquire_run_lock(cfg.run_dir) if node.node_rank == 0 else contextlib.nullcontext()
    except RunDirectoryBusy as e:
        print(f"holderpo train: {e}", file=sys.stderr)
        return 2
    with lock:
        if resume or cfg.checkpoint.resume:
            done = _resume_check(cfg)
            if done is not None:
                return done
        check_prompt_lengths(cfg, resolve_model_path(m.hf_path, revision=m.revision, download=False))
        print(f"launching ({where}):", " ".join(cmd), flush=True)
        env = dict(os.environ, **node.worker_env())
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // cfg.parallel.nproc_per_node)))
        if node.node_rank == 0:
            env[LOCK_OWNER_ENV] = str(os.getpid())
        run_log = None
        if cfg.logging.quiet_console:
            run_log = cfg.run_dir.absolute() / RUN_LOG_NAME
            env[RUN_LOG_ENV] = str(run_log)
            print(f"log: SGLang, Megatron and other third-party output goes to {run_log} "
                  "(logging.quiet_console=false keeps it on the console)", flush=True)
        return _run_torchrun_explaining_deaths(cmd, env, cfg, run_log)


def _run_torchrun_explaining_deaths(cmd: list[str], env: dict, cfg: RunConfig, run_log: Path | None) -> int:
    """Run torchrun (``cmd``) through :mod:`.worker_deaths`: its output as is, then, when a worker
    died of a signal (a SIGKILL is most often the OOM killer), which rank, its memory, what to lower.
    On failure the run log's last lines come first, the explanation last (what the user reads)."""
    from .worker_deaths import explain, read_report

    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"], cmd
    with tempfile.TemporaryDirectory(prefix="holderpo-torchrun-") as tmp:
        report = Path(tmp) / "failures.json"
        code = _run_dying_with_us([sys.executable, "-m", "holderpo_megatron.trainer.worker_deaths", str(report),
                                   *cmd[3:]], env)
        if code != 0 and run_log is not None:
            print(f"holderpo train: the workers ended with exit code {code}; the last lines of {run_log}:\n"
                  f"{log_tail(run_log, 30)}", file=sys.stderr, flush=True)
        if code != 0:
            why = explain(read_report(report), cfg.run_dir, cfg)
            if why:
                print(why, file=sys.stderr, flush=True)
    return code


def _resume_check(cfg: RunConfig) -> int | None:
    """None: go on. An exit code: the checkpoint root is ambiguous (2), or the run is complete (0)."""
    from holderpo_megatron.checkpoint.train_state import TrainStateDirectory

    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else cfg.run_dir / "checkpoints"
    d = TrainStateDirectory(root)
    try:
        found = d.resolve_latest(finish_interrupted=False)
    except ValueError as e:
        print(f"holderpo train: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if found is None:
        return None
    step = int(d.read_marker(found)["step"])
    export = cfg.run_dir / "hf"
    exported = (export / "config.json").is_file()
    if step >= cfg.train.steps and (exported or not cfg.checkpoint.export_hf_at_end):
        what = f"; its model is exported to {export}" if exported else ""
        print(f"holderpo train: run {cfg.run_dir} is complete: its last state {found.name} is step {step} of "
              f"train.steps={cfg.train.steps}{what}. Nothing to do (raise train.steps to train further)", flush=True)
        return 0
    print(f"resuming {cfg.run_dir} from {found.name} (step {step} of {cfg.train.steps})", flush=True)
    return None


def _run_dying_with_us(cmd: list[str], env: dict) -> int:
    """Run ``python -m MODULE ...`` (``cmd``); the kernel kills it (SIGKILL) if this process dies first."""
    from holderpo_megatron.rollout.sglang_launcher import module_command_dying_with_us

    assert cmd[:2] == [sys.executable, "-m"], cmd
    with subprocess.Popen(module_command_dying_with_us(cmd[2], *cmd[3:]), env=env) as proc:
        try:
            return proc.wait()
        except BaseException:  # Ctrl-C: torchrun got the SIGINT too; give it time to stop its workers
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
