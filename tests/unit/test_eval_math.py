"""The math eval runner with fake generate functions: pass@k, output files, config validation."""

import itertools
import json
import re

import pytest

from holderpo_megatron.data.datasets import PAPER_EVAL_SUITE, load_math_dataset, math_data_dir
from holderpo_megatron.eval import BenchmarkSpec, MathEvalConfig, pass_at_k, paper_suite, run_math_eval


def brute_force_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def _write_set(root, name, n):
    d = root / name
    d.mkdir(parents=True)
    rows = [{"problem": f"[Q{i}] What is {i} + {i}?", "answer": str(2 * i)} for i in range(n)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _question_index(prompt):
    return int(re.search(r"\[Q(\d+)\]", prompt).group(1))


def test_runner_with_fake_generate(tmp_path):
    root = tmp_path / "math"
    _write_set(root, "toy_greedy", 6)
    _write_set(root, "toy_sampled", 4)
    calls = []

    def generate(prompts, n, temperature, max_new_tokens, seed):
        calls.append((len(prompts), n, temperature, max_new_tokens, seed))
        out = []
        for p in prompts:
            i = _question_index(p)
            if n == 1:  # greedy: the gold answer, boxed, for even questions only
                out.append([(f"Thinking... \\boxed{{{2 * i}}}", "stop") if i % 2 == 0 else ("I give up", "length")])
            else:       # sampled: question i gets exactly i correct samples out of n
                out.append([(f"\\boxed{{{2 * i}}}" if j < i else f"\\boxed{{{2 * i + 1}}}", "stop")
                            for j in range(n)])
        return out

    cfg = MathEvalConfig(
        benchmarks=["toy_greedy", {"name": "toy_sampled", "greedy": False, "n_samples": 4, "temperature": 0.6,
                                   "ks": [1, 2, 4]}],
        data_dir=str(root), max_new_tokens=64, seed=5, verify_timeout_s=20.0)
    out_dir = tmp_path / "eval"
    res = run_math_eval(cfg, generate, out_dir)

    assert calls == [(6, 1, 0.0, 64, 5), (4, 4, 0.6, 64, 5)]
    g = res["benchmarks"]["toy_greedy"]
    assert g["n_items"] == 6 and g["greedy_pass@1"] == pytest.approx(0.5)
    assert g["greedy_stats"]["finish_length"] == 3 and g["greedy_stats"]["no_answer"] == 3
    s = res["benchmarks"]["toy_sampled"]
    for k in (1, 2, 4):
        expected = sum(brute_force_pass_at_k(4, c, k) for c in range(4)) / 4
        assert s[f"pass@{k}"] == pytest.approx(expected), k
    assert s["headline"] == s["pass@4"] and s["mean_reward"] == pytest.approx(6 / 16)
    assert res["average"]["headline"] == pytest.approx((0.5 + s["pass@4"]) / 2)

    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk["benchmarks"]["toy_greedy"]["greedy_pass@1"] == pytest.approx(0.5)
    md = (out_dir / "results.md").read_text()
    assert "| toy_greedy | 6 | 50.0" in md and "**average**" in md and "pass@4" in md
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 + 4 * 4
    first = samples[0]
    assert first["benchmark"] == "toy_greedy" and first["mode"] == "greedy" and first["outcome"] == "correct"
    assert first["extracted"] == "0" and first["answers"] == ["0"] and "[Q0]" in first["prompt"]
    assert {r["mode"] for r in samples[6:]} == {"sampled"}


def test_runner_limit_and_bad_generate(tmp_path):
    root = tmp_path / "math"
    _write_set(root, "toy", 10)
    cfg = MathEvalConfig(benchmarks=["toy"], data_dir=str(root), limit=3)

    def short(prompts, n, temperature, max_new_tokens, seed):
        return [[("\\boxed{0}", "stop")]] * (len(prompts) - 1)

    with pytest.raises(ValueError, match="2 completion lists for 3 prompts"):
        run_math_eval(cfg, short, tmp_path / "out")
    res = run_math_eval(cfg, lambda p, n, t, m, s: [[("no", "stop")] * n for _ in p], tmp_path / "out")
    assert res["benchmarks"]["toy"]["n_items"] == 3 and res["benchmarks"]["toy"]["greedy_pass@1"] == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"prompt_template": "chat"}, r"'chat'.*qwen_math"),
    ({"answer_template": "latex"}, r"'latex'.*plain"),
    ({"benchmarks": ["a", "a"]}, "duplicate"),
    ({"benchmarks": []}, "empty"),
    ({"benchmarks": [{"name": "a", "n_samples": 2, "ks": [4]}]}, r"ks \[4\]"),
    ({"benchmarks": [{"name": "a", "greedy": False}]}, "nothing to evaluate"),
    ({"benchmarks": [{"name": "a", "n_samples": 2, "temperature": 0.0}]}, "temperature"),
    ({"limit": 0}, "limit"),
    ({"verify_workers": 0}, "workers"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MathEvalConfig(**kwargs)


def test_config_defaults_are_the_paper_suite():
    cfg = MathEvalConfig.from_dict({"limit": 2})
    assert [b.name for b in cfg.benchmarks] == list(PAPER_EVAL_SUITE)
    aime25 = [b for b in paper_suite() if b.name == "aime25"][0]
    assert (aime25.greedy, aime25.n_samples, aime25.temperature, aime25.headline) == (False, 8, 0.7, "pass@8")
    assert cfg.max_new_tokens == 4096 and cfg.resolved_answer_template() == "qwen_math"
    assert MathEvalConfig(prompt_template="r1").resolved_answer_template() == "r1"
    assert BenchmarkSpec("x", n_samples=4).ks == [1, 4]
    with pytest.raises(ValueError, match="unknown eval config keys"):
        MathEvalConfig.from_dict({"limt": 2})


def test_paper_suite_on_shared_data_half_right(tmp_path):
    d = math_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared math data not found at {d} (set HOLDERPO_DATA to the shared data folder)")
    limit = 4
    gold = {}
    for name in PAPER_EVAL_SUITE:
        for pos, item in enumerate(load_math_dataset(name, limit=limit)):
            gold[item.problem] = (pos, item.answer.replace("$", ""))

    def generate(prompts, n, temperature, max_new_tokens, seed):
        out = []
        for p in prompts:
            pos, answer = next(v for q, v in gold.items() if q in p)
            text = f"The final answer is $\\boxed{{{answer}}}$." if pos % 2 == 0 else "I am not sure."
            out.append([(text, "stop")] * n)
        return out

    res = run_math_eval(MathEvalConfig(limit=limit, verify_timeout_s=20.0), generate, tmp_path)
    for name in PAPER_EVAL_SUITE:
        assert res["benchmarks"][name]["n_items"] == limit
        assert res["benchmarks"][name]["headline"] == pytest.approx(0.5), name
    assert res["average"]["headline"] == pytest.approx(0.5)
    assert res["benchmarks"]["aime25"]["pass@8"] == pytest.approx(0.5)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == limit * 5 + limit * 8
