"""What a sweep's runs show: per run the curve and stability signals of its metrics.jsonl, per
config their mean and spread over seeds (``holderpo sweep`` writes ``DIR/summary.{json,md}``).

A sweep directory holds one run directory per (config, seed): ``DIR/<config>/seed<k>/metrics.jsonl``.
Confidence intervals are Student-t 95% intervals of the mean over seeds (mean +- t_{0.975, n-1} *
std / sqrt(n), std with n-1 degrees of freedom): with 3 seeds t = 4.30, so they are wide on
purpose; a single seed has none.

Configs are compared with the first one (the baseline, e.g. GRPO) seed by seed: runs of one seed share
their prompts and their first rollout, so the per-seed difference removes the part of the seed noise
they share (a paired t interval). A difference whose 95% interval excludes 0 is beyond seed noise.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .logger import METRICS_FILE, read_metrics

__all__ = ["RunSummary", "Aggregate", "ConfigSummary", "summarize_run", "summarize_sweep", "sweep_runs",
           "write_summary", "t_quantile_975", "Paired", "paired_differences", "SUMMARY_JSON", "SUMMARY_MD", "SPIKE_FACTOR"]

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SPIKE_FACTOR = 3.0  # a grad-norm spike: a step whose grad_norm exceeds this times the run's median
_SEED_DIR = re.compile(r"^seed(-?\d+)$")

# t_{0.975, df} for df = 1..30; beyond, the normal quantile is within 2% (no scipy dependency)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def _num(v) -> float | None:
    """A finite number, else None (the logger writes non-finite values as null)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


@dataclass
class RunSummary:
    """One run's record. ``held_out``: the last evaluation's suite average (``eval/average``, or the
    mean of ``eval/*/success_rate`` for agent runs); None when the run never evaluated."""

    config: str
    seed: int
    run_dir: str
    steps: int  # the last step logged
    held_out: float | None
    held_out_step: int | None
    final_reward: float | None
    mean_reward: float | None
    reward_curve: list[tuple[int, float]] = field(default_factory=list)
    grad_norm_spikes: int = 0
    clip_frac_mean: float | None = None
    clip_frac_max: float | None = None
    rho_min: float | None = None
    rho_max: float | None = None
    entropy_first: float | None = None
    entropy_last: float | None = None
    response_length_first: float | None = None
    response_length_last: float | None = None
    skipped_updates: int = 0
    nonfinite: int = 0  # steps with a non-finite loss or grad norm, plus non-finite sequences counted


def _held_out(rec: dict) -> float | None:
    if _num(rec.get("eval/average")) is not None:
        return float(rec["eval/average"])
    rates = [_num(v) for k, v in rec.items() if k.startswith("eval/") and k.endswith("/success_rate")]
    rates = [r for r in rates if r is not None]
    return sum(rates) / len(rates) if rates else None


def summarize_run(run_dir: str | os.PathLike, config: str = "", seed: int = 0) -> RunSummary:
    """The summary of one run directory's metrics.jsonl (ValueError when it has no records)."""
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: {METRICS_FILE} has no records")

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], float(r[key])) for r in records if _num(r.get(key)) is not None]

    train = [r for r in records if "reward_mean" in r or "grad_norm" in r]  # step records, not eval-only ones
    reward = series("reward_mean")
    grads = [v for _, v in series("grad_norm")]
    median = statistics.median(grads) if grads else None
    clip = [v for _, v in series("clip_frac")]
    entropy, length = series("entropy"), series("response_length_mean")
    rho_lo, rho_hi = [v for _, v in series("rho_min")], [v for _, v in series("rho_max")]
    held = [(r["step"], _held_out(r)) for r in records]
    held = [(s, v) for s, v in held if v is not None]
    nonfinite = sum(1 for r in train if any(k in r and _num(r[k]) is None for k in ("loss", "grad_norm")))
    nonfinite += int(sum(v for _, v in series("nonfinite_seqs")))
    return RunSummary(
        config=config, seed=seed, run_dir=str(run_dir), steps=records[-1]["step"],
        held_out=held[-1][1] if held else None, held_out_step=held[-1][0] if held else None,
        final_reward=reward[-1][1] if reward else None,
        mean_reward=sum(v for _, v in reward) / len(reward) if reward else None,
        reward_curve=reward,
        grad_norm_spikes=sum(1 for g in grads if median is not None and median > 0 and g > SPIKE_FACTOR * median),
        clip_frac_mean=sum(clip) / len(clip) if clip else None, clip_frac_max=max(clip) if clip else None,
        rho_min=min(rho_lo) if rho_lo else None, rho_max=max(rho_hi) if rho_hi else None,
        entropy_first=entropy[0][1] if entropy else None, entropy_last=entropy[-1][1] if entropy else None,
        response_length_first=length[0][1] if length else None,
        response_length_last=length[-1][1] if length else None,
        skipped_updates=int(sum(v for _, v in series("skipped_update"))), nonfinite=nonfinite,
    )


@dataclass
class Aggregate:
    """One quantity over a config's seeds: n values (None: a run without it), mean, sample std, the
    Student-t 95% CI of the mean (None for n < 2), min and max."""

    n: int
    mean: float | None
    std: float | None
    ci95: tuple[float, float] | None
    min: float | None
    max: float | None

    @classmethod
    def of(cls, values) -> "Aggregate":
        xs = [float(v) for v in values if v is not None]
        if not xs:
            return cls(0, None, None, None, None, None)
        mean = sum(xs) / len(xs)
        if len(xs) < 2:
            return cls(1, mean, None, None, xs[0], xs[0])
        std = statistics.stdev(xs)
        half = t_quantile_975(len(xs) - 1) * std / math.sqrt(len(xs))
        return cls(len(xs), mean, std, (mean - half, mean + half), min(xs), max(xs))


# summary columns: (RunSummary field, how it is aggregated over seeds, table header)
_COLUMNS = (
    ("held_out", "mean", "held-out acc"), ("final_reward", "mean", "final reward"),
    ("mean_reward", "mean", "mean reward"), ("grad_norm_spikes", "sum", "grad spikes"),
    ("clip_frac_mean", "mean", "clip frac mean"), ("clip_frac_max", "max", "clip frac max"),
    ("rho_min", "min", "rho min"), ("rho_max", "max", "rho max"),
    ("entropy_first", "mean", "entropy first"), ("entropy_last", "mean", "entropy last"),
    ("response_length_first", "mean", "length first"), ("response_length_last", "mean", "length last"),
    ("skipped_updates", "sum", "skipped"), ("nonfinite", "sum", "non-finite"),
)


@dataclass
class ConfigSummary:
    config: str
    seeds: list[int]
    stats: dict[str, Aggregate]
    reward_curve: list[tuple[int, float, float, float, int]]  # (step, mean, min, max, n seeds) per step


def _config_summary(config: str, runs: list[RunSummary]) -> ConfigSummary:
    stats = {name: Aggregate.of(getattr(r, name) for r in runs) for name, _, _ in _COLUMNS}
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for s, v in r.reward_curve:
            by_step.setdefault(s, []).append(v)
    curve = [(s, sum(v) / len(v), min(v), max(v), len(v)) for s, v in sorted(by_step.items())]
    return ConfigSummary(config=config, seeds=[r.seed for r in runs], stats=stats, reward_curve=curve)


# quantities compared with the baseline config, seed by seed: (RunSummary field, table header, in %)
_PAIRED = (("held_out", "Δ held-out acc (pp)", True), ("mean_reward", "Δ mean reward", False),
           ("final_reward", "Δ final reward", False))


@dataclass
class Paired:
    """One config against the baseline: per quantity the Aggregate of (config - baseline) over the seeds
    both ran."""

    config: str
    baseline: str
    seeds: list[int]
    diffs: dict[str, Aggregate]


def paired_differences(runs: list[RunSummary], baseline: str) -> list[Paired]:
    """Each other config's per-seed difference from ``baseline`` (seeds both have), in run order."""
    by = {(r.config, r.seed): r for r in runs}
    out = []
    for config in dict.fromkeys(r.config for r in runs):
        if config == baseline:
            continue
        seeds = sorted(s for c, s in by if c == config and (baseline, s) in by)
        diffs = {}
        for name, _, _ in _PAIRED:
            pairs = [(getattr(by[config, s], name), getattr(by[baseline, s], name)) for s in seeds]
            diffs[name] = Aggregate.of(a - b for a, b in pairs if a is not None and b is not None)
        out.append(Paired(config, baseline, seeds, diffs))
    return out


def paired_table(paired: list[Paired]) -> str:
    head = ["config", "seeds"] + [h for _, h, _ in _PAIRED] + ["beyond seed noise"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in paired:
        cells, beyond = [p.config, str(len(p.seeds))], []
        for name, header, pct in _PAIRED:
            a = p.diffs[name]
            cell = _cell(a, "mean", pct)
            if a.ci95:
                cell += f" [{_fmt(a.ci95[0], pct)}, {_fmt(a.ci95[1], pct)}]"
                if a.ci95[0] > 0 or a.ci95[1] < 0:
                    beyond.append(header.removeprefix("Δ ").removesuffix(" (pp)"))
            cells.append(cell)
        cells.append(", ".join(beyond) or ("no" if any(p.diffs[n].ci95 for n, _, _ in _PAIRED) else "-"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_runs(sweep_dir: str | os.PathLike) -> dict[str, list[tuple[int, Path]]]:
    """``{config: [(seed, run_dir), ...]}`` of the run directories under a sweep directory that hold
    metrics (configs in name order, seeds ascending)."""
    root = Path(sweep_dir)
    out: dict[str, list[tuple[int, Path]]] = {}
    for cdir in sorted(p for p in root.iterdir() if p.is_dir()):
        runs = []
        for rdir in cdir.iterdir():
            m = _SEED_DIR.match(rdir.name)
            # a run that died before its first step has a file without records: nothing to summarise
            if m and (rdir / METRICS_FILE).is_file() and (rdir / METRICS_FILE).stat().st_size > 0:
                runs.append((int(m.group(1)), rdir))
        if runs:
            out[cdir.name] = sorted(runs)
    return out


def summarize_sweep(sweep_dir: str | os.PathLike, configs: list[str] | None = None
                    ) -> tuple[list[RunSummary], list[ConfigSummary]]:
    """Every run of the sweep directory (or of ``configs``, in that order) and each config's aggregate."""
    found = sweep_runs(sweep_dir)
    names = list(found) if configs is None else [c for c in configs if c in found]
    runs, per_config = [], []
    for name in names:
        mine = [summarize_run(d, name, seed) for seed, d in found[name]]
        runs += mine
        per_config.append(_config_summary(name, mine))
    return runs, per_config


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}")


def _cell(a: Aggregate, how: str, pct: bool) -> str:
    if a.n == 0:
        return "-"
    if how == "sum":
        return str(int(round(a.mean * a.n)))
    if how == "min":
        return _fmt(a.min)
    if how == "max":
        return _fmt(a.max)
    if a.n == 1:
        return _fmt(a.mean, pct)
    return f"{_fmt(a.mean, pct)} ± {_fmt(a.std, pct)}"


def markdown_table(per_config: list[ConfigSummary]) -> str:
    head = ["config", "seeds"] + [h for _, _, h in _COLUMNS] + ["held-out 95% CI"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in per_config:
        cells = [c.config, str(len(c.seeds))]
        for name, how, _ in _COLUMNS:
            cells.append(_cell(c.stats[name], how, pct=name == "held_out"))
        ci = c.stats["held_out"].ci95
        cells.append(f"[{_fmt(ci[0], True)}, {_fmt(ci[1], True)}]" if ci else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(sweep_dir: str | os.PathLike, configs: list[str] | None = None,
                  command: str | None = None) -> tuple[Path, Path]:
    """Write ``summary.json`` (every run, every config's aggregates) and ``summary.md`` (the table)."""
    root = Path(sweep_dir)
    runs, per_config = summarize_sweep(root, configs)
    paired = paired_differences(runs, per_config[0].config) if per_config else []
    data = {"spike_factor": SPIKE_FACTOR, "ci": "Student-t 95% interval of the mean over seeds",
            "command": command, "configs": [asdict(c) for c in per_config], "runs": [asdict(r) for r in runs],
            "paired": [asdict(p) for p in paired]}
    jpath, mpath = root / SUMMARY_JSON, root / SUMMARY_MD
    jpath.write_text(json.dumps(data, indent=1) + "\n")
    md = [f"# Sweep {root.name}", ""]
    if command:
        md += ["```", command, "```", ""]
    md += [markdown_table(per_config), "",
           "Cells: mean ± std over seeds (sample std); held-out accuracy in %, from each run's last evaluation "
           "(`eval/average`). The CI is the Student-t 95% interval of the mean over seeds. grad spikes: steps "
           f"with grad_norm > {SPIKE_FACTOR:g}x the run's median, summed over seeds; rho min/max, clip frac max: "
           "the extreme over every step and seed; skipped / non-finite: skipped updates and non-finite losses, "
           "grad norms or sequences, summed over seeds. first/last: the first and last logged step.", ""]
    if paired:
        md += [f"## Against {paired[0].baseline}, seed by seed", "", paired_table(paired), "",
               f"Each cell: the mean ± std over seeds of (config - {paired[0].baseline}) in runs of the same seed, "
               "and its paired Student-t 95% interval; beyond seed noise: the quantities whose interval excludes 0.",
               ""]
    mpath.write_text("\n".join(md))
    return jpath, mpath
