"""One node's share of a run: which node this is, where the rendezvous is, and the torchrun command.

    holderpo train --config R.yaml                                   # one node (parallel.nnodes = 1)
    holderpo train --config R.yaml --nnodes 4 --node-rank 2 --master-addr head --master-port 29500
    srun --nodes 4 --ntasks-per-node 1 holderpo train --config R.yaml  # SLURM: read from its variables

Flags win over SLURM's variables (``SLURM_NNODES``, ``SLURM_NODEID``, ``SLURM_JOB_NODELIST``), which win
over torchrun's (``MASTER_ADDR``, ``MASTER_PORT``). torchrun then runs with a static rendezvous (node
ranks fixed, so global rank ``r`` is on node ``r // nproc_per_node``, as the placement assumes) and
deliberate timeouts: joining waits at most ``join_timeout_s`` for every node, and a collective that a
dead node never answers fails after ``HOLDERPO_COLLECTIVE_TIMEOUT_S`` (NCCL tears the group down; gloo
fails at once when the peer's connection drops), so no node hangs when another one dies.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Mapping

__all__ = ["NodeLaunch", "first_slurm_host", "COLLECTIVE_TIMEOUT_ENV"]

COLLECTIVE_TIMEOUT_ENV = "HOLDERPO_COLLECTIVE_TIMEOUT_S"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[003-006,9],cpu1"`` -> ``"gpu003"``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m or not m.group(1):
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list like 'gpu[003-006]' or 'a,b'")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


@dataclass(frozen=True)
class NodeLaunch:
    """This node's place in the run. ``master_addr``/``master_port``: node 0's rendezvous."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    nproc_per_node: int
    join_timeout_s: int = 900
    collective_timeout_s: int = 1800

    @classmethod
    def resolve(cls, *, nnodes: int, nproc_per_node: int, flags: Mapping[str, object] | None = None,
                env: Mapping[str, str] | None = None, collective_timeout_s: int = 1800) -> "NodeLaunch":
        """From the recipe's ``parallel.nnodes``/``nproc_per_node``, the command-line ``flags``
        (nnodes, node_rank, master_addr, master_port; None when not given) and ``env``. Every bad
        value is a one-line ValueError naming it."""
        flags = {k: v for k, v in (flags or {}).items() if v is not None}
        env = os.environ if env is None else env
        slurm = "SLURM_JOB_ID" in env and "SLURM_NNODES" in env

        def pick(flag: str, slurm_key: str | None, env_key: str | None, default):
            if flag in flags:
                return flags[flag], f"--{flag.replace('_', '-')}"
            if slurm and slurm_key and slurm_key in env:
                return env[slurm_key], f"${slurm_key}"
            if env_key and env_key in env:
                return env[env_key], f"${env_key}"
            return default, "default"

        n, n_from = pick("nnodes", "SLURM_NNODES", None, nnodes)
        rank, rank_from = pick("node_rank", "SLURM_NODEID", None, 0)
        addr, _ = pick("master_addr", None, "MASTER_ADDR", None)
        if addr is None and slurm and "SLURM_JOB_NODELIST" in env:
            addr = first_slurm_host(env["SLURM_JOB_NODELIST"])
        port, port_from = pick("master_port", None, "MASTER_PORT", 29500)
        n, rank, port = _int(n, n_from), _int(rank, rank_from), _int(port, port_from)
        if n != nnodes:
            raise ValueError(f"{n_from}={n} nodes, but the recipe says parallel.nnodes={nnodes}; they must agree")
        if not 0 <= rank < n:
            raise ValueError(f"{rank_from}={rank} is not a node rank of {n} nodes; allowed: 0..{n - 1}")
        if not 1 <= port <= 65535:
            raise ValueError(f"{port_from}={port} is not a port; allowed: 1..65535")
        if n > 1 and not addr:
            raise ValueError("a run of several nodes needs node 0's address: --master-addr HOST (or $MASTER_ADDR, "
                             "or SLURM's $SLURM_JOB_NODELIST)")
        return cls(n, rank, str(addr or "127.0.0.1"), port, nproc_per_node, collective_timeout_s=collective_timeout_s)

    def torchrun_command(self, entry_args: list[str]) -> list[str]:
        """``python -m torch.distributed.run ... -m holderpo_megatron.trainer.main <entry_args>``."""
        if self.nnodes == 1:
            where = ["--standalone"]
        else:
            where = [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr}",
                     f"--master-port={self.master_port}", "--rdzv-backend=static",
                     f"--rdzv-conf=timeout={self.join_timeout_s}"]
        return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={self.nproc_per_node}",
                "--max-restarts=0", "-m", "holderpo_megatron.trainer.main", *entry_args]

    def worker_env(self) -> dict[str, str]:
        return {COLLECTIVE_TIMEOUT_ENV: str(self.collective_timeout_s)}


def _int(value, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r} is not an integer") from None
