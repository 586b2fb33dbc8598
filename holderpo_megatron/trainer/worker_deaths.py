"""A training worker killed by a signal, explained (issue 15).

A rank the kernel's OOM killer ends gets SIGKILL: it can say nothing, and torchrun's traceback ends
in ``Signal 9 (SIGKILL) received by PID ...`` with no word about memory. ``holderpo train`` runs
torchrun through :func:`run_torchrun` (torchrun's own ``main``, same arguments, same output),
which writes the elastic agent's failures (global rank, local rank, pid, exit code) to a report
file before torchrun's error propagates. After torchrun exits, the launcher reads it and prints
:func:`explain` below the traceback: which rank died of which signal, SIGKILL's usual cause, the
rank's last recorded RSS and peak (``<run_dir>/ranks/rank<R>.json``, written by every rank:
:mod:`holderpo_megatron.observability.host_memory`), the machine's RAM, and what to lower.

``python -m holderpo_megatron.trainer.worker_deaths REPORT [torchrun arguments]``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["WorkerDeath", "run_torchrun", "read_report", "explain", "machine_memory"]

GIB = 2**30
_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # what a user, a scheduler or torchrun sends to stop


@dataclass(frozen=True)
class WorkerDeath:
    """One failed torchrun worker, as its elastic agent saw it."""

    rank: int  # global rank
    local_rank: int
    pid: int
    exitcode: int  # negative: killed by signal -exitcode
    host: str
    time: float  # unix seconds torchrun noticed it

    @property
    def signal(self) -> int | None:
        return -self.exitcode if self.exitcode < 0 else None

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signal).name
        except (ValueError, TypeError):
            return f"signal {self.signal}"


def run_torchrun(report: str | os.PathLike, argv: list[str]) -> None:
    """torchrun (``torch.distributed.run``) with ``argv``; when workers fail, their failures are
    written to ``report`` (a JSON list of :class:`WorkerDeath`) and torchrun's error propagates."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(argv)
    except ChildFailedError as e:
        host = socket.gethostname()  # the agent runs this node's workers
        deaths = [WorkerDeath(rank, f.local_rank, f.pid, f.exitcode, host, float(f.timestamp))
                  for rank, f in sorted(e.failures.items(), key=lambda kv: kv[1].timestamp)]
        tmp = Path(f"{report}.tmp")
        tmp.write_text(json.dumps([asdict(d) for d in deaths]))
        os.replace(tmp, report)
        raise


def read_report(report: str | os.PathLike) -> list[WorkerDeath]:
    """The deaths :func:`run_torchrun` wrote, first first; [] when it wrote none (no worker failed)."""
    try:
        return [WorkerDeath(**d) for d in json.loads(Path(report).read_text())]
    except FileNotFoundError:
        return []


def _cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), if any."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v1 writes a huge number for "no limit"
            return int(text)
    return None


def machine_memory() -> str:
    import psutil

    vm = psutil.virtual_memory()
    out = f"this machine has {vm.total / GIB:.1f} GiB RAM ({vm.available / GIB:.1f} GiB available now)"
    limit = _cgroup_limit_bytes()
    if limit is not None and limit < vm.total:
        out += f"; this container may use {limit / GIB:.1f} GiB"
    return out


def _cause(sig: int | None) -> str:
    if sig == signal.SIGKILL:
        return ("SIGKILL is what the kernel's out-of-memory (OOM) killer sends: most likely the host ran out "
                "of memory (RAM, not GPU memory) and the kernel chose this rank. Confirm with "
                "`dmesg -T | grep -iE 'out of memory|killed process'` (or `journalctl -k`)")
    if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE):
        return "a crash in native code (a C++/CUDA library); its stack, if any, is in the rank's output above"
    if sig in _STOPS:
        return "it was stopped from outside (a user, a scheduler's time limit or pre-emption)"
    return "a signal sent from outside this run, or by the kernel"


def _record_line(death: WorkerDeath, records: dict) -> str:
    rec = records.get(death.rank)
    if rec is None:
        return f"no RSS recorded for rank {death.rank}"
    if rec.pid != death.pid:
        return f"no RSS recorded by this process (the record of rank {death.rank} is of an earlier process, pid {rec.pid})"
    ago = max(0.0, death.time - rec.time)
    return (f"last recorded RSS {rec.rss_gib:.2f} GiB, peak {rec.peak_rss_gib:.2f} GiB "
            f"(after step {rec.step}, {ago:.0f} s before torchrun saw it die)")


def explain(deaths: list[WorkerDeath], run_dir: str | os.PathLike, cfg=None) -> str:
    """The block printed after torchrun's traceback; '' when no worker died of a signal.
    ``cfg``: the run's :class:`~.config.RunConfig`, to name the current values of what to lower."""
    from holderpo_megatron.observability.host_memory import read_rank_records

    # first the first death; on a tie (torchrun times them to the second) a stop signal is the
    # consequence, not the cause: once one worker fails torchrun stops the others with SIGTERM
    killed = sorted((d for d in deaths if d.signal is not None), key=lambda d: (d.time, d.signal in _STOPS))
    if not killed:
        return ""
    records = read_rank_records(run_dir)
    lines = ["=" * 100]
    for d in killed:
        who = f"rank {d.rank} (local rank {d.local_rank}, pid {d.pid} on host {d.host})"
        if d is not killed[0] and d.signal in _STOPS and killed[0].signal not in _STOPS:
            lines.append(f"holderpo train: {who} then ended by {d.signal_name}: torchrun stops the other workers "
                         "once one has failed.")
            continue
        lines += [f"holderpo train: {who} was killed by signal {d.signal} ({d.signal_name}).",
                  f"  Likely cause: {_cause(d.signal)}.",
                  f"  Rank {d.rank}: {_record_line(d, records)}."]
    lines.append(f"  Memory: {machine_memory()}.")
    if any(d.signal == signal.SIGKILL for d in killed):
        lines += ["  To use less host memory, lower one of:", *(f"    - {x}" for x in _what_to_lower(cfg))]
    lines.append("=" * 100)
    return "\n".join(lines)


def _what_to_lower(cfg) -> list[str]:
    def now(value) -> str:
        if cfg is None:
            return ""
        return f" (now {'null: the default' if value is None else value})"

    r = cfg.rollout if cfg is not None else None
    out = [f"train.token_budget{now(cfg and cfg.train.token_budget)}: tokens per microbatch, the activations a rank holds",
           f"rollout.engines_per_node{now(r and r.engines_per_node)} or rollout.mode: each SGLang engine holds the model "
           "and its KV cache",
           f"rollout.mem_fraction_static{now(r and r.mem_fraction_static)}: the share of memory an engine reserves "
           "for its KV cache (CPU: of the host's RAM)",
           f"parallel.nproc_per_node{now(cfg and cfg.parallel.nproc_per_node)}: each rank holds its model shard, "
           "gradients and optimizer state"]
    if cfg is None or cfg.agent.env != "none":
        out.append(f"agent.num_workers{now(cfg and cfg.agent.num_workers)}: environment worker processes")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit("usage: python -m holderpo_megatron.trainer.worker_deaths REPORT [torchrun arguments]")
    sys.argv = ["torchrun", *argv[1:]]  # torchrun's messages name itself
    run_torchrun(argv[0], argv[1:])


if __name__ == "__main__":
    main()
