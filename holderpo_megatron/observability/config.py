"""What a run records and where: the typed, validated configuration of :class:`MetricsLogger`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["ObservabilityConfig", "WANDB_MODES"]

WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class ObservabilityConfig:
    """metrics.jsonl is always written (rank 0); the rest is optional.

    tensorboard: scalars under ``RUN_DIR/tensorboard`` (needs the ``tensorboard`` package).
    wandb: log to Weights & Biases (optional package ``wandb``); ``wandb_mode="offline"`` writes
      under ``RUN_DIR/wandb`` with no network (``wandb sync`` uploads it later).
    log_every: write a record every N steps (the first and the last step are always written).
    fsync: fsync metrics.jsonl after each record (survives a machine crash, not only a process crash).
    progress: the progress bar on stderr (rank 0).
    gpu_stats: GPU memory and utilisation via NVML when a GPU exists.
    quiet_console: third-party output (SGLang, Megatron, transformers, their warnings) goes to
      ``RUN_DIR/run.log`` instead of the console; false: everything on the console.
    """

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "holderpo"
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    wandb_mode: str = "offline"
    log_every: int = 1
    fsync: bool = False
    progress: bool = True
    gpu_stats: bool = True
    quiet_console: bool = True

    def __post_init__(self):
        for name in ("tensorboard", "wandb", "fsync", "progress", "gpu_stats", "quiet_console"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"logging.{name} must be true or false, got {v!r}")
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every < 1:
            raise ValueError(f"logging.log_every must be an int >= 1, got {self.log_every!r}")
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")
        if not isinstance(self.wandb_project, str) or not self.wandb_project.strip():
            raise ValueError(f"logging.wandb_project must be a non-empty string, got {self.wandb_project!r}")
        for name in ("wandb_entity", "wandb_run_name"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"logging.{name} must be a non-empty string or null, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "ObservabilityConfig":
        """From a YAML mapping; unknown keys are refused (a typo must not silently disable logging)."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown logging option(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)
