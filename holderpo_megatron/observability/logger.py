"""The per-run metrics record: RUN_DIR/metrics.jsonl, TensorBoard, wandb, progress, GPU stats.

One :class:`MetricsLogger` per run; every rank may call it, rank 0 writes. Each step becomes one
JSON line, appended and flushed at once (a crashed run keeps every step it logged)::

    {"step": 12, "wall_time": 1718000000.1, "elapsed_s": 40.2, "reward": 0.41, "accuracy": 0.38,
     "response_length": 211.0, "p": 1.5, "rho_mean": 1.01, "rho_min": 0.2, "rho_max": 3.1,
     "clip_frac": 0.04, "kl": 0.002, "entropy": 0.61, "grad_norm": 0.9, "logprob_drift": 1e-3,
     "time/rollout": 20.1, "time/train": 9.3, "time/step": 31.0, "tokens": 51200,
     "tokens_per_s": 1651.6, "gpu/memory_used_gib": 61.2, "gpu/utilization_pct": 97.0}

Those names are the ones :func:`~holderpo_megatron.observability.plots.plot_run` draws; any other
scalar is recorded too. Non-finite numbers are written as ``null`` (strict JSON).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.distributed as dist

from .config import ObservabilityConfig
from .gpu import GpuMonitor
from .progress import StepProgress
from .timer import PhaseTimer

__all__ = ["MetricsLogger", "read_metrics", "METRICS_FILE"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
_RESERVED = ("step", "wall_time", "elapsed_s", "tokens_per_s")
_WANDB_ID_FILE = "wandb_run_id"


def read_metrics(path: str | os.PathLike, *, dedupe: bool = True) -> list[dict]:
    """The records of a metrics.jsonl (a run directory or the file). A last line cut short by a
    crash is skipped (logged); a bad line elsewhere raises. ``dedupe``: one record per step,
    sorted by step: the records of a step are merged (a later value of a key wins)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        raise ValueError(f"no {METRICS_FILE} at {str(p)!r}")
    records, _ = _parse(p)
    if not dedupe:
        return records
    by_step: dict[int, dict] = {}
    for r in records:
        by_step.setdefault(r["step"], {}).update(r)
    return [by_step[s] for s in sorted(by_step)]


def _parse(p: Path) -> tuple[list[dict], bool]:
    """(records, whether the file needs rewriting: a torn or unterminated last line)."""
    lines = p.read_bytes().split(b"\n")
    unterminated = lines[-1] != b""  # a writer died mid-line (or before the newline)
    if not unterminated:
        lines.pop()
    records = []
    dirty = unterminated
    for i, line in enumerate(lines):
        try:
            r = json.loads(line)
            if not isinstance(r, dict) or not isinstance(r.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as e:
            if i == len(lines) - 1:
                log.warning("%s: dropping its last line (cut short by a crash?): %s", p, e)
                dirty = True
                continue
            raise ValueError(f"{p} line {i + 1} is not a metrics record: {e}") from e
        records.append(r)
    return records, dirty


def _check_step(step) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")


def _scalar(key: str, v):
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    elif isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    raise ValueError(f"metric {key!r} must be a number, bool, string or None, got {type(v).__name__}")


class MetricsLogger:
    """Records one training run.

    run_dir: the run's directory (created). config: what to write besides metrics.jsonl.
    resume_step: None for a new run (refuses a run_dir whose metrics.jsonl already has records);
      the step a resumed run restarts after: records with a larger step leave metrics.jsonl (they
      will be logged again), unless ``truncate=False``; the previous file is first copied, whole,
      to ``metrics.jsonl.before-restart-<UTC time>`` (a WARNING names it): nothing is deleted.
    total_steps: for the progress bar and to always record the last step.
    run_config: the run's configuration (JSON-able), given to wandb.
    """

    def __init__(self, run_dir: str | os.PathLike, config: ObservabilityConfig | None = None, *,
                 resume_step: int | None = None, truncate: bool = True, total_steps: int | None = None,
                 run_config: dict | None = None, rank: int | None = None, progress_stream: TextIO | None = None):
        self.config = config or ObservabilityConfig()
        self.run_dir = Path(run_dir).absolute()
        self.path = self.run_dir / METRICS_FILE
        self.rank = rank if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)
        self.writes = self.rank == 0
        self.total_steps = total_steps
        if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int)
                                        or resume_step < 0):
            raise ValueError(f"resume_step must be None or an int >= 0, got {resume_step!r}")
        self.resume_step = resume_step
        cuda = torch.cuda.is_available()
        self.timer = PhaseTimer(synchronize=torch.cuda.synchronize if cuda else None)
        self._t0 = time.time()
        self._last = time.perf_counter()
        self._file = None
        self._written = False
        self._last_step: int | None = None
        self._tb = None
        self._wandb = None
        self._gpu = None
        self.progress = None
        if not self.writes:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_file(truncate)
        self._file = open(self.path, "a", encoding="utf-8")
        if self.config.tensorboard:
            self._tb = self._open_tensorboard()
        if self.config.wandb and self.config.wandb_mode != "disabled":
            self._wandb = self._open_wandb(run_config)
        self._gpu = GpuMonitor(enabled=self.config.gpu_stats)
        if self.config.progress and total_steps is not None:
            self.progress = StepProgress(total_steps, start_step=resume_step or 0, stream=progress_stream)

    # ------------------------------------------------------------------ setup
    def _prepare_file(self, truncate: bool) -> None:
        if not self.path.exists():
            return
        records, dirty = _parse(self.path)
        if self.resume_step is None:
            if records:
                raise ValueError(
                    f"{self.path} already holds {len(records)} records (steps {records[0]['step']}.."
                    f"{records[-1]['step']}): "
                    "pass resume_step=<the step resumed from> to continue this run, or use a new run directory")
            keep = []
        elif truncate:
            keep = [r for r in records if r["step"] <= self.resume_step]
        else:
            keep = records
        if len(keep) != len(records) or dirty:
            if len(keep) != len(records):
                # never delete what this run cannot log again: the whole old file stays, renamed
                kept_as = self._set_aside()
                log.warning("%s: this run restarts after step %s; the %d records of later steps (up to step %d) "
                            "will be logged again. The previous file, with every record, is kept as %s",
                            self.path, self.resume_step, len(records) - len(keep), records[-1]["step"], kept_as)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for r in keep:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def _set_aside(self) -> Path:
        """Copy metrics.jsonl to a new ``metrics.jsonl.before-restart-<UTC time>[-N]``; returns its path."""
        import shutil

        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for n in range(1000):
            kept = self.path.with_name(f"{self.path.name}.before-restart-{stamp}" + (f"-{n}" if n else ""))
            try:
                with open(kept, "xb") as out, open(self.path, "rb") as src:
                    shutil.copyfileobj(src, out)
                    out.flush()
                    os.fsync(out.fileno())
                return kept
            except FileExistsError:
                continue
        raise RuntimeError(f"{self.path}: no free name to keep the previous records under")

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("logging.tensorboard is true but the tensorboard package is not installed: "
                              "pip install 'tensorboard>=2.14', or set logging.tensorboard: false") from e
        # purge_step hides the events a resumed run will log again
        purge = None if self.resume_step is None else self.resume_step + 1
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge)

    def _open_wandb(self, run_config: dict | None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logging.wandb is true but the wandb package is not installed: pip install wandb "
                              "(offline mode needs no account or network), or set logging.wandb: false") from e
        c = self.config
        id_file = self.run_dir / _WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:16]  # kept in RUN_DIR so a resumed run continues the same wandb run
            id_file.write_text(run_id + "\n")
        return wandb.init(project=c.wandb_project, entity=c.wandb_entity, name=c.wandb_run_name,
                          dir=str(self.run_dir), mode=c.wandb_mode, config=run_config or {}, id=run_id,
                          resume="allow")

    # ------------------------------------------------------------------ per step
    def log(self, step: int, metrics: dict, *, tokens: int | None = None) -> dict | None:
        """Record training step ``step`` (once per step): ``metrics`` (scalars: numbers, 0-dim
        tensors, bools, strings, None) plus the phase times of :attr:`timer` since the last step
        (``time/<phase>``, seconds), the wall time since the last step (``time/step``),
        ``tokens_per_s`` when ``tokens`` is given, GPU stats; advances the progress bar.
        Returns the record written (rank 0), or None (other ranks, or a step ``log_every`` skips).
        Called again with the same step, it behaves as :meth:`log_extra`.
        """
        _check_step(step)
        if step == self._last_step:
            return self.log_extra(step, metrics)
        self._last_step = step
        now = time.perf_counter()
        step_time, self._last = now - self._last, now
        phases = self.timer.pop()
        if not self.writes:
            return None
        record = self._record(step, metrics)
        for phase, secs in phases.items():
            record[f"time/{phase}"] = secs
        record["time/step"] = step_time
        if tokens is not None:
            record["tokens"] = int(tokens)
            record["tokens_per_s"] = tokens / step_time if step_time > 0 else None
        if self.progress is not None:
            self.progress.update(step, record)
        last = self.total_steps is not None and step >= self.total_steps
        if step % self.config.log_every and self._written and not last:
            return None
        self._written = True
        if self._gpu is not None:
            record.update(self._gpu.sample())
        self._write(record)
        return record

    def log_extra(self, step: int, metrics: dict) -> dict | None:
        """Record metrics measured outside the step (evaluation: ``eval/accuracy``, ...) at
        ``step``, always (``log_every`` does not apply), without touching the timer, the step
        clock or the progress bar. :func:`read_metrics` merges the records of one step."""
        _check_step(step)
        if not self.writes:
            return None
        record = self._record(step, metrics)
        self._write(record)
        return record

    def _record(self, step: int, metrics: dict) -> dict:
        record = {"step": step, "wall_time": time.time(), "elapsed_s": time.time() - self._t0}
        for k, v in metrics.items():
            if not isinstance(k, str) or k in _RESERVED:
                raise ValueError(f"metric name {k!r} is not allowed (reserved: {_RESERVED})")
            record[k] = _scalar(k, v)
        return record

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self.config.fsync:
            os.fsync(self._file.fileno())
        step = record["step"]
        numeric = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and v is not None}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._gpu is not None:
            self._gpu.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
