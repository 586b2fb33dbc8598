"""Evaluation of a policy on the recipe's math suite through the rollout engine.

During training rank 0 calls :func:`evaluate_with_engine` with the live engine (which holds the
current weights); ``holderpo eval`` (:func:`eval_main`) starts an engine on the recipe's model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from holderpo_megatron.eval.math_eval import BenchmarkSpec, MathEvalConfig, run_math_eval
from holderpo_megatron.observability.progress import StepProgress
from holderpo_megatron.rollout.interface import SamplingParams

from .config import RunConfig, engine_config

__all__ = ["math_eval_config", "evaluate_with_engine", "agent_eval_with_engine", "eval_main"]


def math_eval_config(cfg: RunConfig) -> MathEvalConfig:
    e = cfg.eval
    specs = [BenchmarkSpec(name=b) for b in e.benchmarks]
    specs += [BenchmarkSpec(name=b, greedy=False, n_samples=e.sampled_n, temperature=e.sampled_temperature)
              for b in e.sampled_benchmarks]
    if not specs:
        raise ValueError("eval: no benchmarks (set eval.benchmarks and/or eval.sampled_benchmarks)")
    return MathEvalConfig(benchmarks=specs, data_dir=str(cfg.data.resolved_data_dir() / "math"),
                          prompt_template=cfg.data.prompt_template, answer_template=cfg.data.answer_template,
                          max_new_tokens=e.max_new_tokens, seed=cfg.train.seed, limit=e.limit,
                          verify_timeout_s=cfg.data.reward_timeout_s)


def engine_generate_fn(engine, tokenizer, on_done=None):
    """``generate_fn(prompts, n, temperature, max_new_tokens, seed)`` of the eval runner over an engine;
    ``on_done(k)`` after the k-th call (progress)."""
    calls = [0]

    def generate_fn(prompts, n, temperature, max_new_tokens, seed):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        params = SamplingParams(n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        groups = engine.generate(ids, params)
        calls[0] += 1
        if on_done is not None:
            on_done(calls[0])
        return [[(tokenizer.decode(s.output_ids, skip_special_tokens=True), s.finish_reason) for s in g] for g in groups]

    return generate_fn


def evaluate_with_engine(cfg: RunConfig, engine, tokenizer, out_dir: Path) -> dict:
    mcfg = math_eval_config(cfg)
    # one generation per benchmark and mode (greedy, sampled): the unit of progress
    sets = [f"{b.name} {mode}" for b in mcfg.benchmarks
            for mode, on in (("greedy", b.greedy), ("sampled", bool(b.n_samples))) if on]
    bar = StepProgress(len(sets), desc="eval", unit="set", show=(), enabled=cfg.logging.progress) if sets else None

    def done(k: int) -> None:
        if bar is not None and k <= len(sets):
            bar.update(k, note=sets[k - 1])

    try:
        results = run_math_eval(
            mcfg, engine_generate_fn(engine, tokenizer, done), out_dir,
            apply_chat_template=lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False,
                                                                           add_generation_prompt=True))
    finally:
        if bar is not None:
            bar.close()
    out = {"average": results["average"]["headline"]}
    out.update({name: r["headline"] for name, r in results["benchmarks"].items()})
    return out


def agent_eval_with_engine(cfg: RunConfig, engine, tokenizer, pool, out_dir: Path) -> dict:
    """Greedy play of every game of ``agent.eval_splits`` (first ``agent.eval_limit`` each);
    returns flat metrics: ``<split>/success_rate`` and ``<split>/<task type>``."""
    from holderpo_megatron.eval.agent_eval import run_agent_eval

    from .agent_loop import agent_games, chat_tokenizer

    a, r = cfg.agent, cfg.rollout
    splits = {s: agent_games(cfg, s, a.eval_limit) for s in a.eval_splits}
    tokenize, detokenize = chat_tokenizer(tokenizer)
    sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=r.max_new_tokens, stop=tuple(r.stop))
    summary = run_agent_eval(engine, pool, tokenize, detokenize, splits, sampling, a.play, r.max_prompt_tokens,
                             out_dir)
    flat = {}
    for split, s in summary.items():
        flat[f"{split}/success_rate"] = s["success_rate"]
        flat.update({f"{split}/{t}": v["success_rate"] for t, v in s["per_task_type"].items()})
    return flat


def eval_main(cfg: RunConfig, out: str | None) -> int:
    from transformers import AutoTokenizer

    from holderpo_megatron.models.builtin import resolve_model_path
    from holderpo_megatron.observability.console import RUN_LOG_NAME, QuietConsole
    from holderpo_megatron.rollout.sglang_engine import SGLangEngine

    hf_dir = resolve_model_path(cfg.model.hf_path, revision=cfg.model.revision)
    out_dir = Path(out) if out else cfg.run_dir / "eval"
    quiet = contextlib.nullcontext()
    if cfg.logging.quiet_console:
        quiet = QuietConsole(out_dir / RUN_LOG_NAME)
        print(f"log: SGLang and other third-party output goes to {quiet.log_path}", flush=True)
    with quiet:
        tok = AutoTokenizer.from_pretrained(hf_dir)
        engine = SGLangEngine(engine_config(cfg, hf_dir))
        pool = None
        try:
            if cfg.agent.enabled:
                from .agent_loop import build_env_pool

                pool = build_env_pool(cfg)
                summary = agent_eval_with_engine(cfg, engine, tok, pool, out_dir)
            else:
                summary = evaluate_with_engine(cfg, engine, tok, out_dir)
        finally:
            if pool is not None:
                pool.close()
            engine.shutdown()
    for k, v in summary.items():
        print(f"{k:>16}: {100 * v:.1f}")
    return 0
