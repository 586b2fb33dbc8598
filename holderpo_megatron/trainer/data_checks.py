"""Prompt lengths against the rollout engine's limits, with the recipe's tokenizer and template.

A training prompt longer than ``rollout.max_prompt_tokens`` would make SGLang reject the request
hours into a run; such prompts are dropped when the set loads (counted and logged) and a set
losing more than ``data.max_dropped_prompt_fraction`` of its prompts is refused. An evaluation
prompt is never dropped (that would change the benchmark): one that cannot fit the engine's
context with ``eval.max_new_tokens`` is refused before launch. Rows skipped for having no answer
are counted in the log too.

Generated arithmetic prompts (a few dozen tokens by construction) and agent games (each turn's
prompt is cut to ``rollout.max_prompt_tokens`` by the agent) are not counted.
"""

from __future__ import annotations

import logging
import os

from holderpo_megatron.data.datasets import MathItem, generate_arithmetic_problems, load_math_dataset, math_data_dir
from holderpo_megatron.data.templates import get_prompt_template, prompt_token_lengths

from .config import ConfigError, RunConfig

__all__ = ["check_prompt_lengths", "train_prompt_items"]

log = logging.getLogger("holderpo")


def _tokenizer(hf_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir)


def train_prompt_items(cfg: RunConfig, hf_dir: str | os.PathLike, *, tokenizer=None, announce: bool = True) -> list:
    """The training items of a prompt (non-agent) run, without prompts over the limit."""
    d = cfg.data
    if d.train == "arithmetic":
        return generate_arithmetic_problems(50_000, seed=cfg.train.seed, max_operand=d.arithmetic_max_operand,
                                            direct=d.arithmetic_direct).items
    ds = load_math_dataset(d.train, root=d.resolved_data_dir(), fields=d.row_fields)
    if announce and ds.skipped_no_answer:
        log.warning("data.train %s: %d of %d rows skipped (no usable answer): rows %s%s", ds.path,
                    ds.skipped_no_answer, ds.skipped_no_answer + len(ds.items), ds.skipped_rows[:10],
                    " ..." if len(ds.skipped_rows) > 10 else "")
    if not ds.items:
        raise ConfigError(f"data.train {d.train!r} ({ds.path}) has no usable items: {ds.describe_empty()}")
    tok = tokenizer if tokenizer is not None else _tokenizer(hf_dir)
    lengths = prompt_token_lengths(get_prompt_template(d.prompt_template), tok, [it.prompt for it in ds.items])
    limit = cfg.rollout.max_prompt_tokens
    kept = [it for it, n in zip(ds.items, lengths) if n <= limit]
    dropped = len(ds.items) - len(kept)
    if dropped:
        frac = dropped / len(ds.items)
        what = (f"data.train {d.train!r}: {dropped} of {len(ds.items)} prompts ({100 * frac:.2f}%) are longer than "
                f"rollout.max_prompt_tokens={limit} (longest {max(lengths)} tokens with data.prompt_template="
                f"{d.prompt_template!r})")
        if frac > d.max_dropped_prompt_fraction:
            raise ConfigError(f"{what}: more than data.max_dropped_prompt_fraction="
                              f"{d.max_dropped_prompt_fraction} would be dropped; raise rollout.max_prompt_tokens "
                              "or data.max_dropped_prompt_fraction")
        if announce:
            log.warning("%s: dropped (rows %s%s)", what, [it.index for it, n in zip(ds.items, lengths) if n > limit][:10],
                        " ..." if dropped > 10 else "")
    return kept


def _eval_items(cfg: RunConfig, name: str) -> list[MathItem]:
    ds = load_math_dataset(math_data_dir(cfg.data.resolved_data_dir()) / name, limit=cfg.eval.limit)
    if not ds.items:
        raise ConfigError(f"eval benchmark {name!r} ({ds.path}) has no usable items: {ds.describe_empty()}")
    return ds.items


def check_prompt_lengths(cfg: RunConfig, hf_dir: str | os.PathLike, *, tokenizer=None) -> None:
    """Before launch: the training set loads and loses at most the allowed fraction of its
    prompts, and every evaluation prompt fits the engine's context with eval.max_new_tokens."""
    if cfg.agent.enabled:
        return
    tok = tokenizer
    if cfg.data.train != "arithmetic":
        tok = tok if tok is not None else _tokenizer(hf_dir)
        train_prompt_items(cfg, hf_dir, tokenizer=tok, announce=True)
    if not cfg.evaluates:
        return
    tok = tok if tok is not None else _tokenizer(hf_dir)
    template = get_prompt_template(cfg.data.prompt_template)
    fits = cfg.engine_context_length - cfg.eval.max_new_tokens
    for key in ("benchmarks", "sampled_benchmarks"):
        for name in getattr(cfg.eval, key):
            lengths = prompt_token_lengths(template, tok, [it.problem for it in _eval_items(cfg, name)])
            over = [n for n in lengths if n > fits]
            if over:
                raise ConfigError(
                    f"eval.{key} entry {name!r}: {len(over)} of {len(lengths)} prompts are longer than {fits} tokens "
                    f"(longest {max(over)}), so with eval.max_new_tokens={cfg.eval.max_new_tokens} they exceed the "
                    f"engine's context of {cfg.engine_context_length} tokens; raise rollout.max_prompt_tokens to "
                    f"{max(over) - fits + cfg.rollout.max_prompt_tokens}, or lower eval.max_new_tokens")
