"""Agent evaluation: play each game of each split once, report the success rate.

Writes into ``out_dir``: ``summary.json`` (per split: success rate with a 95% Wilson interval,
per task type, invalid actions and turns per episode), ``results.md`` (the same as a table) and
``<split>.jsonl`` (every episode's transcript).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Mapping, Sequence

from holderpo_megatron.envs.interface import EpisodeSpec
from holderpo_megatron.rollout.agent import AgentConfig, Episode, run_agent_episodes, write_transcripts
from holderpo_megatron.rollout.interface import RolloutEngine, SamplingParams

__all__ = ["wilson_interval", "summarise_episodes", "run_agent_eval"]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); (0, 1) for n = 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise_episodes(episodes: Sequence[Episode]) -> dict:
    n = len(episodes)
    wins = sum(e.won for e in episodes)
    lo, hi = wilson_interval(wins, n)
    by_type: dict[str, list[Episode]] = defaultdict(list)
    for e in episodes:
        by_type[e.spec.task_type or "unknown"].append(e)
    return {
        "episodes": n, "success_rate": wins / n if n else 0.0, "ci95": [lo, hi],
        "env_failures": sum(e.failed for e in episodes),
        "invalid_actions_mean": sum(e.invalid_actions for e in episodes) / max(1, n),
        "turns_mean": sum(len(e.turns) for e in episodes) / max(1, n),
        "per_task_type": {t: {"episodes": len(es), "success_rate": sum(e.won for e in es) / len(es)}
                          for t, es in sorted(by_type.items())},
    }


def run_agent_eval(engine: RolloutEngine, pool, tokenize: Callable[[str], list[int]],
                   detokenize: Callable[[list[int]], str], splits: Mapping[str, Sequence[EpisodeSpec]],
                   sampling: SamplingParams, cfg: AgentConfig, max_prompt_tokens: int, out_dir: str | Path) -> dict:
    """Every game of every split once (greedy unless ``sampling`` says otherwise); returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, specs in splits.items():
        episodes = run_agent_episodes(engine, pool, tokenize, detokenize, specs, sampling, cfg, max_prompt_tokens)
        write_transcripts(out / f"{split}.jsonl", episodes)
        summary[split] = summarise_episodes(episodes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(summary))
    return summary


def _markdown(summary: dict) -> str:
    types = sorted({t for s in summary.values() for t in s["per_task_type"]})
    head = "| split | episodes | success | 95% CI | " + " | ".join(types) + " |"
    rows = [head, "|" + "---|" * (4 + len(types))]
    for split, s in summary.items():
        per = [f"{100 * s['per_task_type'][t]['success_rate']:.1f}" if t in s["per_task_type"] else "-" for t in types]
        rows.append(f"| {split} | {s['episodes']} | {100 * s['success_rate']:.1f} | "
                    f"{100 * s['ci95'][0]:.1f}-{100 * s['ci95'][1]:.1f} | " + " | ".join(per) + " |")
    return "\n".join(rows) + "\n"
