"""PNG curves of a run: ``plot_run(RUN_DIR)`` (``holderpo plot RUN_DIR``); of a sweep:
``plot_sweep(SWEEP_DIR)`` (``holderpo plot SWEEP_DIR``: one PNG, a curve per config with a seed band).

One PNG per quantity, each drawing the metrics.jsonl keys that match its patterns (so
``reward_std`` joins ``reward``, every ``time/<phase>`` joins the time plot). A quantity the run
never logged gets no file. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import math
import os
import sys
from pathlib import Path

from .logger import read_metrics

__all__ = ["PLOTS", "plot_run", "plot_sweep", "SWEEP_PANELS", "main"]

log = logging.getLogger(__name__)

# file stem -> (title, y label, key patterns); drawn in this order
PLOTS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "reward": ("Reward", "reward", ("reward", "reward_*", "eval/*reward*")),
    "accuracy": ("Accuracy", "fraction correct", ("accuracy", "accuracy_*", "eval/*accuracy*")),
    "p": ("Hölder exponent p", "p", ("p",)),
    "rho": ("Importance ratio rho", "rho", ("rho_mean", "rho_min", "rho_max")),
    "clip_fraction": ("Clip fraction", "fraction", ("clip_frac", "token_clip_frac", "zero_grad_frac")),
    "response_length": ("Response length", "tokens", ("response_length", "response_length_*")),
    "kl": ("KL divergence", "nats", ("kl", "kl_*")),
    "entropy": ("Entropy", "nats", ("entropy", "entropy_*")),
    "grad_norm": ("Gradient norm", "L2 norm", ("grad_norm",)),
    "logprob_drift": ("Log-prob drift (trainer vs rollout engine)", "nats", ("logprob_drift", "logprob_drift_*")),
    "time": ("Time per phase", "seconds", ("time/*",)),
    "throughput": ("Throughput", "tokens / s", ("tokens_per_s",)),
    "gpu_memory": ("GPU memory", "GiB", ("gpu/memory_used_gib", "gpu/torch_max_allocated_gib")),
}


def _series(records: list[dict], patterns: tuple[str, ...]) -> dict[str, tuple[list[int], list[float]]]:
    keys: list[str] = []
    for r in records:
        for k in r:
            if k not in keys and any(fnmatch.fnmatchcase(k, pat) for pat in patterns):
                keys.append(k)
    out = {}
    for k in keys:
        xs, ys = [], []
        for r in records:
            v = r.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(r["step"])
                ys.append(float(v))
        if xs:
            out[k] = (xs, ys)
    return out


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``<name>.png`` for each quantity of :data:`PLOTS` the run logged into ``out_dir``
    (default ``RUN_DIR/plots``); returns the files written, in :data:`PLOTS` order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: metrics.jsonl has no records to plot")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (title, ylabel, patterns) in PLOTS.items():
        series = _series(records, patterns)
        if not series:
            continue
        # Figure + Agg canvas directly: no pyplot state, no backend switch in the caller's process
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for key, (xs, ys) in series.items():
            ax.plot(xs, ys, label=key, marker="." if len(xs) < 50 else None, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(series) > 1 or next(iter(series)) != stem:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, format="png")
        written.append(path)
    if not written:
        log.warning("%s: none of the plotted metrics (%s) were logged", run_dir, ", ".join(PLOTS))
    return written


# sweep panels: (metrics.jsonl key, title, y label); a panel no run logged is left out
SWEEP_PANELS = (("reward_mean", "Training reward", "reward (mean over the step's samples)"),
                ("eval/average", "Held-out accuracy", "fraction correct"))


def plot_sweep(sweep_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """``SWEEP_DIR/sweep.png`` (or ``out``): per config the mean over seeds of each panel's key, with
    a min..max band over seeds (a line alone where one seed ran)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .sweep_summary import sweep_runs

    sweep_dir = Path(sweep_dir)
    found = sweep_runs(sweep_dir)
    if not found:
        raise ValueError(f"{sweep_dir}: no run directories <config>/seed<k>/metrics.jsonl to plot")
    curves: dict[str, dict[str, list[tuple[int, float, float, float, int]]]] = {}
    for key, _, _ in SWEEP_PANELS:
        for config, runs in found.items():
            by_step: dict[int, list[float]] = {}
            for _, run_dir in runs:
                for step, v in zip(*(_series(read_metrics(run_dir), (key,)).get(key, ([], [])))):
                    by_step.setdefault(step, []).append(v)
            if by_step:
                curves.setdefault(key, {})[config] = [(s, sum(v) / len(v), min(v), max(v), len(v))
                                                      for s, v in sorted(by_step.items())]
    panels = [p for p in SWEEP_PANELS if p[0] in curves]
    if not panels:
        raise ValueError(f"{sweep_dir}: no run logged any of {', '.join(k for k, _, _ in SWEEP_PANELS)}")
    fig = Figure(figsize=(7 * len(panels), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    for i, (key, title, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        if all(len(pts) == 1 for pts in curves[key].values()):
            # one point per config (e.g. held-out accuracy at the end only): configs side by side, the
            # mean with a min..max bar over seeds, instead of a band of zero width
            for j, (config, ((step, mean, lo, hi, n),)) in enumerate(curves[key].items()):
                ax.errorbar([j], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", capsize=5,
                            label=f"{config} ({n} seed{'s' if n > 1 else ''})")
            ax.set_xticks(range(len(curves[key])), list(curves[key]), rotation=20, fontsize=8)
            ax.set_title(f"{title} at step {step}: mean over seeds, bar min..max")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            continue
        for config, pts in curves[key].items():
            xs = [p[0] for p in pts]
            seeds = max(p[4] for p in pts)
            line, = ax.plot(xs, [p[1] for p in pts], label=f"{config} ({seeds} seed{'s' if seeds > 1 else ''})",
                            marker="." if len(xs) < 50 else None, linewidth=1.4)
            if seeds > 1:
                ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.2,
                                linewidth=0)
        ax.set_title(f"{title}: mean over seeds, band min..max")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out) if out is not None else sweep_dir / "sweep.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def is_sweep_dir(path: str | os.PathLike) -> bool:
    """A directory without its own metrics.jsonl whose subfolders hold ``<config>/seed<k>`` runs."""
    from .logger import METRICS_FILE
    from .sweep_summary import sweep_runs

    p = Path(path)
    return p.is_dir() and not (p / METRICS_FILE).exists() and bool(sweep_runs(p))


def main(argv: list[str] | None = None) -> int:
    """``holderpo plot RUN_DIR [--out DIR]`` (also ``python -m holderpo_megatron.observability.plots``)."""
    parser = argparse.ArgumentParser(prog="holderpo plot",
                                     description="write PNG curves of a run directory, or one PNG of a sweep")
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl, or a `holderpo sweep` directory")
    parser.add_argument("--out", default=None,
                        help="output directory (default RUN_DIR/plots); for a sweep the PNG (default SWEEP_DIR/sweep.png)")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        print(f"holderpo plot: run directory {args.run_dir!r} does not exist", file=sys.stderr)
        return 2
    try:
        files = [plot_sweep(args.run_dir, args.out)] if is_sweep_dir(args.run_dir) else plot_run(args.run_dir, args.out)
    except (ValueError, OSError) as e:
        print(f"holderpo plot: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
