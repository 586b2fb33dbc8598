"""Math evaluation suite, independent of the generation engine.

``run_math_eval(cfg, generate_fn, out_dir)`` renders each benchmark's prompts, asks ``generate_fn``
for greedy and/or sampled completions, grades them with ``rewards.MathReward`` and writes
``out_dir/results.json``, ``out_dir/results.md`` (a table) and ``out_dir/samples.jsonl`` (every
sample: prompt, output, finish reason, extracted answer, outcome, reward).

``generate_fn(prompts, n, temperature, max_new_tokens, seed) -> list[list[(text, finish_reason)]]``:
``n`` completions per prompt, in prompt order; ``temperature == 0.0`` means greedy (then n == 1);
``finish_reason`` is "stop" or "length" (cut off by ``max_new_tokens``).

Metrics per benchmark: ``greedy_pass@1`` (accuracy of the greedy completion), and for sampled
benchmarks ``pass@k`` for each k (the unbiased estimator over n samples, averaged over problems) and
``mean_reward``. The suite average (``average.headline``) is the mean over benchmarks of each one's
headline metric: its greedy pass@1, or for a sampled-only benchmark pass@n (the paper's suite:
greedy everywhere, AIME25 pass@8 at temperature 0.7, 4096 new tokens).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from holderpo_megatron.data.datasets import MathItem, load_math_dataset, math_data_dir
from holderpo_megatron.data.templates import PROMPT_TEMPLATES, get_prompt_template
from holderpo_megatron.rewards import ANSWER_TEMPLATES, MathReward, RewardConfig

__all__ = ["BenchmarkSpec", "MathEvalConfig", "GenerateFn", "pass_at_k", "run_math_eval", "paper_suite",
           "format_markdown"]

log = logging.getLogger(__name__)

GenerateFn = Callable[[list[str], int, float, int, int], list[list[tuple[str, str]]]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n} c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k} n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class BenchmarkSpec:
    """One benchmark. ``path``: a .jsonl file or folder (default ``<data_dir>/<name>``).

    greedy: evaluate one greedy completion per problem.
    n_samples, temperature, ks: sampled completions per problem (0: none), their temperature, and
    the k of the pass@k to report (default: 1 and n_samples).
    """

    name: str
    path: str | None = None
    greedy: bool = True
    n_samples: int = 0
    temperature: float = 0.7
    ks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("benchmark name must be non-empty")
        if self.n_samples < 0:
            raise ValueError(f"{self.name}: n_samples must be >= 0, got {self.n_samples}")
        if not self.greedy and self.n_samples == 0:
            raise ValueError(f"{self.name}: neither greedy nor sampled (n_samples=0): nothing to evaluate")
        if self.n_samples:
            if not self.temperature > 0:
                raise ValueError(f"{self.name}: sampling needs temperature > 0, got {self.temperature}")
            if not self.ks:
                self.ks = sorted({1, self.n_samples})
            bad = [k for k in self.ks if not 1 <= k <= self.n_samples]
            if bad:
                raise ValueError(f"{self.name}: ks {bad} outside [1, n_samples={self.n_samples}]")
            self.ks = sorted(set(self.ks))
        elif self.ks:
            raise ValueError(f"{self.name}: ks {self.ks} given but n_samples=0")

    @property
    def headline(self) -> str:
        return "greedy_pass@1" if self.greedy else f"pass@{self.n_samples}"


def paper_suite() -> list[BenchmarkSpec]:
    """aime24, aime25 (pass@8, T=0.7), amc, math500, minerva, olympiadbench; the rest greedy."""
    return [BenchmarkSpec("aime24"), BenchmarkSpec("aime25", greedy=False, n_samples=8, temperature=0.7, ks=[1, 8]),
            BenchmarkSpec("amc"), BenchmarkSpec("math500"), BenchmarkSpec("minerva"), BenchmarkSpec("olympiadbench")]


@dataclass
class MathEvalConfig:
    """data_dir: folder holding one sub-folder per benchmark (default ``$HOLDERPO_DATA/math``).
    prompt_template: a ``data.templates`` name; answer_template: the reward's extraction format
    (default: the prompt template's). limit: first N problems of each benchmark. truncated_reward:
    None grades cut-off responses like any other (they rarely hold a final answer anyway)."""

    benchmarks: list[BenchmarkSpec] = field(default_factory=paper_suite)
    data_dir: str | None = None
    prompt_template: str = "qwen_math"
    answer_template: str | None = None
    max_new_tokens: int = 4096
    seed: int = 0
    limit: int | None = None
    verify_timeout_s: float = 5.0
    verify_workers: int = 2
    truncated_reward: float | None = None

    def __post_init__(self) -> None:
        self.benchmarks = [b if isinstance(b, BenchmarkSpec) else
                           BenchmarkSpec(b) if isinstance(b, str) else BenchmarkSpec(**b) for b in self.benchmarks]
        if not self.benchmarks:
            raise ValueError("benchmarks must not be empty")
        names = [b.name for b in self.benchmarks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate benchmark names {dup}")
        if self.prompt_template not in PROMPT_TEMPLATES:
            raise ValueError(f"unknown prompt template {self.prompt_template!r}; allowed: {sorted(PROMPT_TEMPLATES)}")
        if self.answer_template is not None and self.answer_template not in ANSWER_TEMPLATES:
            raise ValueError(f"unknown answer template {self.answer_template!r}; allowed: {sorted(ANSWER_TEMPLATES)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        # The reward settings are validated by the reward's own config.
        self.reward_config()

    @classmethod
    def from_dict(cls, d: dict) -> "MathEvalConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown eval config keys {sorted(unknown)}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved_answer_template(self) -> str:
        return self.answer_template or get_prompt_template(self.prompt_template).answer_template

    def reward_config(self) -> RewardConfig:
        return RewardConfig(kind="math", template=self.resolved_answer_template(), timeout_s=self.verify_timeout_s,
                            workers=self.verify_workers, truncated_reward=self.truncated_reward)


def _generate(generate_fn: GenerateFn, prompts: list[str], n: int, temperature: float, max_new_tokens: int,
              seed: int, bench: str) -> list[list[tuple[str, str]]]:
    out = generate_fn(prompts, n, temperature, max_new_tokens, seed)
    if len(out) != len(prompts):
        raise ValueError(f"{bench}: generate_fn returned {len(out)} completion lists for {len(prompts)} prompts")
    for i, comps in enumerate(out):
        if len(comps) != n:
            raise ValueError(f"{bench}: generate_fn returned {len(comps)} completions for prompt {i}, expected n={n}")
    return out


def _grade(reward: MathReward, items: Sequence[MathItem], completions: list[list[tuple[str, str]]]):
    texts, golds, reasons = [], [], []
    for item, comps in zip(items, completions):
        for text, reason in comps:
            texts.append(text)
            golds.append(list(item.answers))
            reasons.append(reason)
    return reward.score(texts, golds, reasons)


def run_math_eval(cfg: MathEvalConfig, generate_fn: GenerateFn, out_dir: str | os.PathLike, *,
                  apply_chat_template: Callable[[list[dict]], str] | None = None,
                  reward: MathReward | None = None) -> dict:
    """Evaluate every benchmark of ``cfg`` with ``generate_fn``; write results.json, results.md and
    samples.jsonl under ``out_dir``; return the results dict (the content of results.json).

    ``apply_chat_template`` renders chat prompts (default ChatML); ``reward`` reuses a caller's
    MathReward (its workers), else one is made from ``cfg`` and closed at the end.
    """
    t_start = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = get_prompt_template(cfg.prompt_template)
    data_dir = Path(cfg.data_dir) if cfg.data_dir is not None else math_data_dir()
    own_reward = reward is None
    reward = reward if reward is not None else MathReward(cfg.reward_config())
    results: dict = {"config": cfg.to_dict(), "benchmarks": {}}
    try:
        with open(out / "samples.jsonl", "w", encoding="utf-8") as samples_f:
            for spec in cfg.benchmarks:
                results["benchmarks"][spec.name] = _eval_benchmark(
                    spec, cfg, data_dir, template, apply_chat_template, generate_fn, reward, samples_f)
    finally:
        if own_reward:
            reward.close()
    results["average"] = _averages(cfg.benchmarks, results["benchmarks"])
    results["seconds"] = time.monotonic() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(format_markdown(results), encoding="utf-8")
    log.info("math eval: headline average %.4f over %d benchmarks -> %s",
             results["average"]["headline"], len(cfg.benchmarks), out)
    return results


def _eval_benchmark(spec, cfg, data_dir, template, apply_chat_template, generate_fn, reward, samples_f) -> dict:
    t0 = time.monotonic()
    ds = load_math_dataset(spec.path or (data_dir / spec.name), limit=cfg.limit)
    items = ds.items
    prompts = [template.render(it.problem, apply_chat_template) for it in items]
    res: dict = {"n_items": len(items), "skipped_no_answer": ds.skipped_no_answer, "path": ds.path,
                 "headline_metric": spec.headline}
    modes = []
    if spec.greedy:
        modes.append(("greedy", 1, 0.0))
    if spec.n_samples:
        modes.append(("sampled", spec.n_samples, spec.temperature))
    for mode, n, temperature in modes:
        completions = _generate(generate_fn, prompts, n, temperature, cfg.max_new_tokens, cfg.seed, spec.name) \
            if items else []
        graded = _grade(reward, items, completions)
        correct_per_item = []
        flat = 0
        for i, (item, comps) in enumerate(zip(items, completions)):
            c = 0
            for j, (text, reason) in enumerate(comps):
                r = graded.rewards[flat]
                c += graded.outcomes[flat] == "correct"
                samples_f.write(json.dumps({
                    "benchmark": spec.name, "index": item.index, "mode": mode, "sample": j,
                    "temperature": temperature, "prompt": prompts[i], "output": text, "finish_reason": reason,
                    "extracted": graded.extracted[flat], "outcome": graded.outcomes[flat], "reward": r,
                    "answers": list(item.answers)}, ensure_ascii=False) + "\n")
                flat += 1
            correct_per_item.append(c)
        stats = {k: graded.stats[k] for k in ("truncated", "no_answer", "too_long", "timeout", "error")}
        stats["finish_length"] = sum(r == "length" for comps in completions for _, r in comps)
        if mode == "greedy":
            res["greedy_pass@1"] = _mean([float(c > 0) for c in correct_per_item])
            res["greedy_stats"] = stats
        else:
            for k in spec.ks:
                res[f"pass@{k}"] = _mean([pass_at_k(n, c, k) for c in correct_per_item])
            res["mean_reward"] = _mean(graded.rewards)
            res["n_samples"], res["temperature"], res["sampled_stats"] = n, temperature, stats
    res["headline"] = res[spec.headline]
    res["seconds"] = time.monotonic() - t0
    log.info("math eval %s: %d items, %s=%.4f (%.1f s)", spec.name, len(items), spec.headline, res["headline"],
             res["seconds"])
    return res


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _metric_names(results: dict) -> list[str]:
    names = []
    for r in results.values():
        for k in r:
            if (k.startswith("pass@") or k == "greedy_pass@1") and k not in names:
                names.append(k)
    return sorted(names, key=lambda k: (k != "greedy_pass@1", int(k.split("@")[1])))


def _averages(specs, results: dict) -> dict:
    """Mean over benchmarks of the headline, and of each metric over the benchmarks reporting it."""
    avg = {"headline": _mean(results[s.name]["headline"] for s in specs)}
    for k in _metric_names(results):
        vals = [r[k] for r in results.values() if k in r]
        avg[k] = _mean(vals)
        avg[f"{k}_benchmarks"] = len(vals)
    return avg


def format_markdown(results: dict) -> str:
    """A markdown table: one row per benchmark (headline, every metric), then the average."""
    benches = results["benchmarks"]
    metrics = _metric_names(benches)
    head = ["benchmark", "items", "headline", *metrics, "cut off (length)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def pct(x):
        return "" if x is None else f"{100 * x:.1f}"

    for name, r in benches.items():
        n_resp = r["n_items"] * ((1 if "greedy_stats" in r else 0) + r.get("n_samples", 0))
        cut = sum(r.get(s, {}).get("finish_length", 0) for s in ("greedy_stats", "sampled_stats"))
        row = [name, str(r["n_items"]), f"{pct(r['headline'])} ({r['headline_metric']})",
               *[pct(r.get(m)) for m in metrics], f"{cut}/{n_resp}"]
        lines.append("| " + " | ".join(row) + " |")
    avg = results["average"]
    lines.append("| " + " | ".join(["**average**", "", pct(avg["headline"]), *[pct(avg.get(m)) for m in metrics], ""])
                 + " |")
    return "Math evaluation (accuracy, %)\n\n" + "\n".join(lines) + "\n"
