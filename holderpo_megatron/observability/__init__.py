"""What a run records: metrics.jsonl, TensorBoard, wandb, NVML GPU stats, phase timers, progress, plots."""

from .config import ObservabilityConfig
from .gpu import GpuMonitor
from .logger import METRICS_FILE, MetricsLogger, read_metrics
from .plots import PLOTS, plot_run
from .progress import StepProgress
from .timer import PhaseTimer

__all__ = [
    "GpuMonitor", "METRICS_FILE", "MetricsLogger", "ObservabilityConfig", "PLOTS", "PhaseTimer", "StepProgress",
    "plot_run", "read_metrics",
]
