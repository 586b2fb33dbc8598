"""`holderpo train` on one node: validate the recipe, then start torchrun with one worker per GPU
(or per CPU rank under gloo). Multi-node runs use torchrun directly on each node (README).

Before any process starts: the recipe is validated (:func:`validate_run`, the data sets and their
prompt lengths), the run directory's lock is taken (held by this process for the whole run; a
second run on the directory is refused), and a resume is checked (an ambiguous checkpoint root
is refused; a run that is already complete says so and starts nothing). torchrun is started so
that it dies with this process, and its workers die with it (:mod:`.run_guard`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .config import ConfigError, RunConfig, validate_run
from .run_guard import LOCK_OWNER_ENV, RunDirectoryBusy, acquire_run_lock


def launch_training(config_path: str, overrides: list[str], cfg: RunConfig, *, resume: bool = False,
                    dry_run: bool = False) -> int:
    from holderpo_megatron.models.builtin import resolve_model_path

    from .data_checks import check_prompt_lengths
    from .plan import arch_for_plan

    if cfg.parallel.nnodes != 1:
        raise ConfigError(
            f"parallel.nnodes={cfg.parallel.nnodes}: `holderpo train` starts one node; on a cluster run "
            "`torchrun --nnodes ... -m holderpo_megatron.trainer.main --config ...` on every node"
        )
    # Materialise a builtin model once, here, so the workers do not race to build it.
    if cfg.model.hf_path.startswith("builtin:") and not dry_run:
        resolve_model_path(cfg.model.hf_path)
    validate_run(cfg, arch_for_plan(cfg))  # every error before any worker starts
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={cfg.parallel.nproc_per_node}",
           "-m", "holderpo_megatron.trainer.main", "--config", config_path, *overrides]
    if resume:
        cmd.append("checkpoint.resume=true")
    if dry_run:
        if not cfg.model.hf_path.startswith("builtin:"):  # (a builtin model is not built by a dry run)
            check_prompt_lengths(cfg, cfg.model.hf_path)
        print("launching:", " ".join(cmd), flush=True)
        return 0
    try:
        lock = acquire_run_lock(cfg.run_dir)
    except RunDirectoryBusy as e:
        print(f"holderpo train: {e}", file=sys.stderr)
        return 2
    with lock:
        if resume or cfg.checkpoint.resume:
            done = _resume_check(cfg)
            if done is not None:
                return done
        check_prompt_lengths(cfg, resolve_model_path(cfg.model.hf_path))
        print("launching:", " ".join(cmd), flush=True)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // cfg.parallel.nproc_per_node)))
        env[LOCK_OWNER_ENV] = str(os.getpid())
        return _run_dying_with_us(cmd, env)


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
