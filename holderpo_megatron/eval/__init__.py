"""Evaluation suites (may import rollout, rewards, data)."""

from holderpo_megatron.eval.math_eval import (BenchmarkSpec, GenerateFn, MathEvalConfig, pass_at_k, paper_suite,
                                              run_math_eval)

__all__ = ["BenchmarkSpec", "GenerateFn", "MathEvalConfig", "pass_at_k", "paper_suite", "run_math_eval"]
