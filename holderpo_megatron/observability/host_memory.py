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
           "write_rank_record", "read_rank_records"]

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
