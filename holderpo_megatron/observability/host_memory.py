"""Host memory of this process (resident set size), and the per-rank record a launcher reads after a death.

Each training rank keeps ``<run_dir>/ranks/rank<R>.json`` up to date (written atomically: a reader
never sees half a file): its pid and host, the step it last finished, its current and peak RSS. When
the kernel's OOM killer ends a rank with SIGKILL the rank cannot say anything; the launcher reads
this record instead and names the rank, its last RSS and its peak.

Peak RSS is the kernel's high-water mark (``VmHWM``); :func:`reset_peak` restarts it (writing 5 to
``/proc/self/clear_refs``), so a peak can be taken per step.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["RankMemoryRecord", "rss_bytes", "peak_rss_bytes", "reset_peak", "rank_records_dir",
           "write_rank_record", "read_rank_records", "ChildrenMemory", "children_memory", "host_memory_metrics",
           "RankMemoryMonitor", "PER_RANK_KEYS_UP_TO"]

GIB = 2**30


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set size now (bytes); 0 where the platform does not say."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001 - a platform without either source: report nothing, never fail a run
        return 0


def peak_rss_bytes() -> int:
    """The kernel's high-water mark of this process's RSS since start or the last :func:`reset_peak`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak() -> bool:
    """Restart the high-water mark at the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class RankMemoryRecord:
    rank: int
    pid: int
    host: str
    step: int  # the last step this rank finished (0: none yet)
    rss_gib: float
    peak_rss_gib: float
    time: float  # unix seconds of the record

    @classmethod
    def now(cls, rank: int, step: int) -> RankMemoryRecord:
        return cls(rank, os.getpid(), socket.gethostname(), step, rss_bytes() / GIB, peak_rss_bytes() / GIB,
                   time.time())


def rank_records_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "ranks"


def write_rank_record(run_dir: str | os.PathLike, record: RankMemoryRecord) -> Path:
    """Atomically replace ``<run_dir>/ranks/rank<R>.json`` with ``record``."""
    d = rank_records_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"rank{record.rank}.json"
    tmp = d / f".rank{record.rank}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)
    return path


def read_rank_records(run_dir: str | os.PathLike) -> dict[int, RankMemoryRecord]:
    """Every rank's last record under ``run_dir`` (rank -> record); unreadable files are skipped."""
    out: dict[int, RankMemoryRecord] = {}
    d = rank_records_dir(run_dir)
    if not d.is_dir():
        return out
    for path in sorted(d.glob("rank*.json")):
        try:
            rec = RankMemoryRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        out[rec.rank] = rec
    return out


@dataclass
class ChildrenMemory:
    """RSS of this process's descendants (GiB), by kind: SGLang's processes (an embedded engine's scheduler
    and detokenizer: their titles start with ``sglang``) and the others (environment and reward workers).
    ``*_peak_gib`` sums each process's own high-water mark (VmHWM): at least the peak of their sum."""

    engine_gib: float = 0.0
    engine_peak_gib: float = 0.0
    workers_gib: float = 0.0
    workers_peak_gib: float = 0.0


def _proc_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:  # the process ended meanwhile
        return 0
    return 0


def children_memory() -> ChildrenMemory:
    """:class:`ChildrenMemory` now; all zero where psutil or /proc is missing."""
    try:
        import psutil

        kids = psutil.Process().children(recursive=True)
    except Exception:  # noqa: BLE001 - observability never fails a run
        return ChildrenMemory()
    out = ChildrenMemory()
    for k in kids:
        try:
            engine = k.name().startswith("sglang")
        except Exception:  # noqa: BLE001 - gone meanwhile
            continue
        rss, hwm = _proc_kib(k.pid, "VmRSS") / 2**20, _proc_kib(k.pid, "VmHWM") / 2**20
        if engine:
            out.engine_gib += rss
            out.engine_peak_gib += hwm
        else:
            out.workers_gib += rss
            out.workers_peak_gib += hwm
    return out


PER_RANK_KEYS_UP_TO = 16  # larger runs: max/min and the rank of the max only (a line per step stays short)


def host_memory_metrics(records: list[RankMemoryRecord], children: ChildrenMemory | None = None) -> dict[str, float]:
    """Step metrics from every rank's record: ``host/rss_gib/rank<R>``, ``host/rss_peak_gib/rank<R>`` (up to
    :data:`PER_RANK_KEYS_UP_TO` ranks), ``host/rss_peak_gib/max`` and its rank, ``host/rss_gib/max``, and
    rank 0's children (``host/engine_rss_gib``, ``host/workers_rss_gib`` and their peaks) when given."""
    out: dict[str, float] = {}
    if len(records) <= PER_RANK_KEYS_UP_TO:
        for r in records:
            out[f"host/rss_gib/rank{r.rank}"] = r.rss_gib
            out[f"host/rss_peak_gib/rank{r.rank}"] = r.peak_rss_gib
    top = max(records, key=lambda r: r.peak_rss_gib)
    out["host/rss_peak_gib/max"] = top.peak_rss_gib
    out["host/rss_peak_gib/max_rank"] = float(top.rank)
    out["host/rss_gib/max"] = max(r.rss_gib for r in records)
    if children is not None:
        out["host/engine_rss_gib"] = children.engine_gib
        out["host/engine_rss_peak_gib"] = children.engine_peak_gib
        out["host/workers_rss_gib"] = children.workers_gib
        out["host/workers_rss_peak_gib"] = children.workers_peak_gib
    return out


class RankMemoryMonitor:
    """One per rank. :meth:`record` writes this rank's :class:`RankMemoryRecord` to ``<run_dir>/ranks/``
    (at start-up and after every step); :meth:`end_step` writes it, gathers every rank's record to
    rank 0 (a collective: every rank calls it) and restarts this rank's peak, so each step's record
    holds that step's peak. Returns the step's ``host/...`` metrics on rank 0, ``{}`` elsewhere."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, group=None):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.group = group

    def record(self, step: int) -> RankMemoryRecord:
        rec = RankMemoryRecord.now(self.rank, step)
        write_rank_record(self.run_dir, rec)
        return rec

    def end_step(self, step: int) -> dict[str, float]:
        import torch.distributed as dist

        rec = self.record(step)
        if dist.is_initialized():  # all_gather: gather_object has no NCCL support; the records are tiny
            box: list = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(box, rec, group=self.group)
        else:
            box = [rec]
        reset_peak()
        if self.rank != 0:
            return {}
        return host_memory_metrics(sorted(box, key=lambda r: r.rank), children_memory())
