"""Learning parity: reward and response-length curves of our loop vs TRL's ``GRPOTrainer`` over seeds.

    python bench/learning_vs_trl.py [--seeds 1234,1235,1236] [--steps 12] [--sides ours,trl]
        [--variant baseline] [--ours-override KEY=VALUE ...] [--launcher "nice -n 10 flock -s /tmp/quiet.lock"]

The same two runs as ``bench/e2e_vs_trl.py`` (same model, prompts, reward, GSPO loss, optimiser and
batch; its docstring lists what each side does and what still differs), repeated for several seeds.
The seed is the run's ``train.seed``: it picks the prompts (the same ones on both sides, in the same
order) and seeds each side's sampling (SGLang per-request seeds derived from it; TRL ``seed``), so
for one seed both sides see the same prompts but draw different completions: only the distributions
over seeds are comparable, step by step.

Each (variant, side, seed) is its own subprocess run (``--launcher`` prefixes it, e.g. with
``nice``/``flock``), and its result is kept under ``--runs-dir/<variant>/<side>_seed<seed>.json``: a
rerun skips what is already there (``--force`` reruns). A variant is a named set of extra overrides
of our side (``--ours-override``), for swapping one difference at a time; TRL runs are shared by all
variants (read from the ``baseline`` variant). Timing is not the point here: the machine may be shared,
so the TRL worker runs single-threaded by default (``--trl-threads``; ours sets one thread per rank
itself): on a busy machine a two-thread OpenMP team waits at every barrier for a descheduled thread.

Writes ``--out`` (JSON: every run's per-step rows + the per-step statistics over seeds) and a markdown
table beside it (same stem, ``.md``): per step, for each side, the mean and min..max over seeds of
``reward_mean`` and of the mean response length (sampled tokens per completion, EOS included where
one was sampled). Text after the ``<!-- notes -->`` line of an existing markdown file is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e_vs_trl as e2e  # noqa: E402 - the bench's sibling module: same runs, one code path

ROOT = e2e.ROOT
DEFAULT_OUT = ROOT / "bench" / "results" / "learning_vs_trl_cpu.json"
DEFAULT_RUNS = ROOT / "bench" / "results" / "learning_vs_trl_cpu_runs"
NOTES_MARK = "<!-- notes -->"
# Our side only: the KV cache size does not change what is sampled, and a small one saves RAM.
OURS_DEFAULT_EXTRA = ("rollout.mem_fraction_static=0.1",)
# Overrides that size the engine's memory only (all 32 requests of a step fit either way): runs that
# differ only in these are the same experiment (e.g. a larger fraction where another job holds RAM).
MEMORY_ONLY = ("rollout.mem_fraction_static", "rollout.kv_cache_tokens")


def sampling_overrides(extra: list[str]) -> list[str]:
    """``extra`` without the memory-only overrides: what must match for two runs to be compared."""
    return [o for o in extra if o.split("=", 1)[0] not in MEMORY_ONLY]


def permutation_test(a: list[float], b: list[float]) -> float:
    """Two-sided exact permutation p-value of mean(a) - mean(b): the share of all relabellings of the
    pooled values into groups of len(a) and len(b) whose |difference| is at least the observed one."""
    import itertools

    pooled, n, m = a + b, len(a), len(b)
    total = sum(pooled)

    def diff(sum_a: float) -> float:  # |mean(a) - mean(b)| from the sum of the values labelled a
        return abs(sum_a / n - (total - sum_a) / m)

    observed = diff(sum(a))
    splits = list(itertools.combinations(pooled, n))
    return sum(diff(sum(x)) >= observed - 1e-12 for x in splits) / len(splits)


def run_one(side: str, seed: int, steps: int, extra: list[str], out: Path) -> int:
    """One (side, seed) run in this process's subprocesses; writes its per-step rows to ``out``."""
    workdir = Path(tempfile.mkdtemp(prefix=f"learning_{side}_{seed}_"))
    try:
        settings = e2e.shared_settings(steps, workdir, seed=seed, extra=tuple(extra))
        n = settings["prompts_per_step"] * settings["group_size"]
        t0 = time.time()
        if side == "ours":
            r = e2e.run_ours(settings, workdir)
            from holderpo_megatron.observability import read_metrics
            # every metric the loop logged (lr actually applied, log-prob drift, clip fractions, ...)
            r["metrics"] = [m for m in read_metrics(workdir / "ours") if "time/step" in m]
        else:
            r = e2e.run_trl(settings, workdir)
        rows = [{"step": x["step"], "reward_mean": x["reward_mean"], "response_length": x["gen_tokens"] / n,
                 "truncated_frac": x.get("truncated_frac"), "time": x["time"]} for x in r["steps"]]
        res = {"side": side, "seed": seed, "steps": steps, "extra": extra if side == "ours" else [], "wall_s": time.time() - t0, "load": r["load"],
               "settings": {k: v for k, v in settings.items() if k != "problems"}, "rows": rows,
               "raw": {k: v for k, v in r.items() if k not in ("steps", "load")}}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
        tmp.replace(out)  # atomic: a killed run leaves no half result to be skipped on rerun
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _stats(vals: list[float]) -> dict:
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def aggregate(runs: dict[str, list[dict]], steps: int) -> dict:
    """side -> metric -> per step {mean, min, max, std, n} over seeds."""
    out = {}
    for side, rs in runs.items():
        out[side] = {}
        for key in ("reward_mean", "response_length", "truncated_frac"):
            per_step = []
            for i in range(steps):
                vals = [r["rows"][i][key] for r in rs if i < len(r["rows"]) and r["rows"][i].get(key) is not None]
                per_step.append(_stats(vals) if vals else None)
            out[side][key] = per_step
        out[side]["seeds"] = [r["seed"] for r in rs]
        # one number per seed: its mean reward over all steps (the area under its curve)
        out[side]["seed_mean_reward"] = {r["seed"]: statistics.fmean(x["reward_mean"] for x in r["rows"][:steps])
                                         for r in rs}
    return out


def markdown(stats: dict, steps: int, cmd: str, overrides: dict[str, list[str]]) -> str:
    def cell(s, fmt):
        return "-" if s is None else f"{s['mean']:{fmt}} ({s['min']:{fmt}}..{s['max']:{fmt}})"

    sides = list(stats)
    lines = ["# Learning parity vs TRL (CPU): mean (min..max) over seeds per step", "", f"Command: `{cmd}`", ""]
    for side in sides:
        extra = overrides.get(side)
        lines.append(f"- `{side}`: seeds {stats[side]['seeds']}"
                     + (", extra overrides " + " / ".join(f"`{e}`" for e in extra) if extra else ""))
    lines += ["", "| step | " + " | ".join(f"{s} reward" for s in sides) + " | "
              + " | ".join(f"{s} length" for s in sides) + " |",
              "|---|" + "---|" * (2 * len(sides))]
    for i in range(steps):
        lines.append(f"| {i + 1} | " + " | ".join(cell(stats[s]["reward_mean"][i], ".3f") for s in sides) + " | "
                     + " | ".join(cell(stats[s]["response_length"][i], ".1f") for s in sides) + " |")
    lines.append("")
    for side in sides:
        r = [x for x in stats[side]["reward_mean"] if x]
        if r:
            last = r[-3:]
            lines.append(f"- `{side}` mean reward over the last {len(last)} steps: "
                         f"{statistics.fmean(x['mean'] for x in last):.3f}")
    # per seed, the mean reward over all steps; each side's seeds against the first side's
    lines += ["", f"Per seed, the mean reward over steps 1..{steps} (one number per run):", ""]
    for side in sides:
        per = stats[side].get("seed_mean_reward", {})
        if per:
            vals = list(per.values())
            lines.append(f"- `{side}`: " + ", ".join(f"{s}: {v:.3f}" for s, v in per.items())
                         + f"; mean {statistics.fmean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f} (std)" if len(vals) > 1 else ""))
    base = sides[0] if sides else None
    for side in sides[1:]:
        a, b = list(stats[side].get("seed_mean_reward", {}).values()), list(stats[base].get("seed_mean_reward", {}).values())
        if len(a) > 1 and len(b) > 1:
            lines.append(f"- `{side}` - `{base}`: {statistics.fmean(a) - statistics.fmean(b):+.3f}; exact two-sided "
                         f"permutation test over the {len(a)} + {len(b)} seeds: p = {permutation_test(a, b):.3f}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1234,1235,1236", help="comma list of train.seed values")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--sides", default="ours,trl", help="comma list of ours,trl")
    ap.add_argument("--variant", default="baseline", help="name of our side's override set (runs-dir subfolder)")
    ap.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override of our side for this variant (repeatable)")
    ap.add_argument("--launcher", default="", help='prefix of each run\'s command, e.g. "nice -n 10 flock -s /tmp/quiet.lock"')
    ap.add_argument("--runs-dir", default=str(DEFAULT_RUNS))
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result; the markdown table goes beside it (.md)")
    ap.add_argument("--trl-threads", type=int, default=1,
                    help="OMP_NUM_THREADS of the TRL worker (ours sets its own: cores / ranks per rank); 1 keeps a "
                         "shared machine from stalling a multi-threaded team at every barrier; 0 = torch's default")
    ap.add_argument("--force", action="store_true", help="rerun (side, seed) results already kept")
    ap.add_argument("--no-run", action="store_true", help="only aggregate the kept results")
    ap.add_argument("--_one", nargs=4, metavar=("SIDE", "SEED", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    extra = [*OURS_DEFAULT_EXTRA, *args.ours_override]
    if args._one:
        side, seed, steps, out = args._one
        return run_one(side, int(seed), int(steps), extra, Path(out))
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds takes a comma list of integers, got {args.seeds!r}")
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if not sides or not set(sides) <= {"ours", "trl"}:
        ap.error(f"--sides takes ours, trl or ours,trl, got {args.sides!r}")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.variant != "baseline" and "trl" in sides and not args.ours_override:
        ap.error("a non-baseline variant needs --ours-override (TRL runs are shared with the baseline)")
    runs_dir = Path(args.runs_dir)

    def path(side, seed):
        return runs_dir / ("baseline" if side == "trl" else args.variant) / f"{side}_seed{seed}.json"

    for seed in seeds:
        for side in sides:
            p = path(side, seed)
            if p.exists() and not args.force:
                kept = json.loads(p.read_text())
                if kept["steps"] != args.steps or (side == "ours" and sampling_overrides(kept["extra"])
                                                   != sampling_overrides(extra)):
                    raise SystemExit(f"{p} holds a run with other settings ({kept['steps']} steps, overrides "
                                     f"{kept['extra']}); pass --force or another --variant")
                print(f"[{side} seed {seed}] kept: {p}", flush=True)
                continue
            if args.no_run:
                continue
            cmd = [*shlex.split(args.launcher), sys.executable, str(Path(__file__).resolve()),
                   "--_one", side, str(seed), str(args.steps), str(p),
                   *(f"--ours-override={o}" for o in args.ours_override)]
            print(f"[{side} seed {seed}] {' '.join(cmd)}", flush=True)
            env = dict(os.environ)
            if side == "trl" and args.trl_threads > 0:
                env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.trl_threads)
            rc = subprocess.call(cmd, cwd=ROOT, env=env)
            if rc != 0:
                raise SystemExit(f"[{side} seed {seed}] failed with exit code {rc}")

    # Every variant kept so far goes into the table (baseline first): the record of each swap.
    runs = {}
    variants = ["baseline"] + sorted(d.name for d in runs_dir.glob("*") if d.is_dir() and d.name != "baseline")
    for name, side in [("trl", "trl")] + [("ours" if v == "baseline" else f"ours[{v}]", ("ours", v)) for v in variants]:
        folder = runs_dir / ("baseline" if side == "trl" else side[1])
        sname = "trl" if side == "trl" else "ours"
        got = [json.loads(p.read_text()) for p in (folder / f"{sname}_seed{s}.json" for s in seeds) if p.exists()]
        got = [g for g in got if g["steps"] == args.steps]
        if got:
            runs[name] = got
    stats = aggregate(runs, args.steps)
    # each distinct set of overrides of a side (memory-only ones may differ between its seeds)
    overrides = {k: list(dict.fromkeys(" ".join(r["extra"]) for r in v)) for k, v in runs.items() if k.startswith("ours")}
    cmd = "python bench/learning_vs_trl.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "learning_vs_trl", "command": cmd, "variant": args.variant,
                               "seeds": seeds, "steps": args.steps, "stats": stats, "runs": runs},
                              indent=1, default=str) + "\n")
    md_path = out.with_suffix(".md")
    notes = ""
    if md_path.exists() and NOTES_MARK in md_path.read_text():
        notes = md_path.read_text().split(NOTES_MARK, 1)[1]
    text = markdown(stats, args.steps, cmd, overrides)
    md_path.write_text(text + "\n" + NOTES_MARK + (notes or "\n"))
    print("\n" + text, flush=True)
    print(f"wrote {out} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
