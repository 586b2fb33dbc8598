"""`holderpo train` on one node: validate the recipe, then start torchrun with one worker per GPU
(or per CPU rank under gloo). Multi-node runs use torchrun directly on each node (README)."""

from __future__ import annotations

import os
import subprocess
import sys

from .config import ConfigError, RunConfig, validate_run


def launch_training(config_path: str, overrides: list[str], cfg: RunConfig, *, resume: bool = False,
                    dry_run: bool = False) -> int:
    from holderpo_megatron.models.builtin import resolve_model_path

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
    print("launching:", " ".join(cmd), flush=True)
    if dry_run:
        return 0
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // cfg.parallel.nproc_per_node)))
    return subprocess.call(cmd, env=env)
