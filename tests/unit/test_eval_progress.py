"""Evaluation progress: one tqdm line per benchmark set (greedy, sampled) when the stream is not a
terminal, naming the set. The engine stands in for SGLang (answers "42" to everything); the
tokenizer and chat template are the builtin SmolLM2's, the benchmarks the shared data sets."""

import io
from pathlib import Path

import pytest
import torch

from holderpo_megatron.rollout.interface import Sample
from holderpo_megatron.trainer.config import RunConfig, from_dict
from holderpo_megatron.trainer.evaluate import evaluate_with_engine

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


class AnswersFortyTwo:
    def __init__(self, tokenizer):
        self.ids = tokenizer("The answer is \\boxed{42}.", add_special_tokens=False)["input_ids"]
        self.calls = []

    def generate(self, prompts, params):
        self.calls.append((len(prompts), params.n, params.temperature))
        return [[Sample(prompt_index=i, sample_index=j, prompt_ids=list(p), output_ids=list(self.ids),
                        logprobs=torch.zeros(len(self.ids)), finish_reason="stop", weight_version=0)
                 for j in range(params.n)] for i, p in enumerate(prompts)]


def test_evaluation_prints_one_progress_line_per_set(tmp_path, monkeypatch):
    if not (DATA / "math" / "gsm8k_test").is_dir():
        pytest.skip(f"shared data sets not found under {DATA}")
    from transformers import AutoTokenizer

    from holderpo_megatron.models.builtin import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct"))
    cfg = from_dict(RunConfig, {"data": {"train": "arithmetic", "data_dir": str(DATA)},
                                "eval": {"benchmarks": ["gsm8k_test", "amc23_40"], "sampled_benchmarks": ["aime25"],
                                         "sampled_n": 2, "limit": 3, "max_new_tokens": 16}})
    out = io.StringIO()
    # where the bar draws: the console (here a StringIO, not a terminal)
    monkeypatch.setattr("holderpo_megatron.observability.progress.console_stream", lambda: out)
    engine = AnswersFortyTwo(tok)
    summary = evaluate_with_engine(cfg, engine, tok, tmp_path)
    assert engine.calls == [(3, 1, 0.0), (3, 1, 0.0), (3, 2, 0.7)]
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue(), lines
    for k, (line, name) in enumerate(zip(lines, ["gsm8k_test greedy", "amc23_40 greedy", "aime25 sampled"]), 1):
        assert line.startswith("eval:") and f"{k}/3 [" in line and line.endswith(f", {name}]"), line
    assert set(summary) == {"average", "gsm8k_test", "amc23_40", "aime25"}
