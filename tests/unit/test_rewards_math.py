"""MathReward / ExactIntReward: a table of answer forms through the real math-verify, truncation,
adversarial input, a real hanging verification cut off (injected hangs: test_rewards_timeouts.py)."""

import time

import pytest

from holderpo_megatron.rewards import ExactIntReward, MathReward, RewardConfig, build_reward

pytest.importorskip("math_verify", reason="math-verify not installed: pip install 'math-verify[antlr4_13_2]==0.9.0'")


@pytest.fixture(scope="module")
def qwen_reward():
    with MathReward(template="qwen_math", timeout_s=20.0, workers=2) as r:
        yield r


# (gold answers, response, expected reward)
ANSWER_FORMS = [
    # fractions and decimals
    (["\\frac{1}{2}"], r"\boxed{0.5}", 1.0),
    (["0.5"], r"\boxed{\frac{1}{2}}", 1.0),
    (["\\frac{1}{2}"], r"\boxed{1/2}", 1.0),
    (["\\frac{1}{2}"], r"\boxed{\dfrac{1}{2}}", 1.0),
    (["\\frac12"], r"\boxed{\tfrac{1}{2}}", 1.0),
    (["\\frac{1}{2}"], r"\boxed{\frac{1}{3}}", 0.0),
    (["\\frac{1}{2}"], r"\boxed{0.51}", 0.0),
    (["142.0"], r"\boxed{142}", 1.0),
    # intervals
    (["[1,2)"], r"\boxed{[1,2)}", 1.0),
    (["[1,2)"], r"\boxed{[1, 2)}", 1.0),
    (["[1,2)"], r"\boxed{[1,2]}", 0.0),
    (["[1,2)"], r"\boxed{(1,2)}", 0.0),
    (["(-\\infty, 3]"], r"\boxed{(-\infty,3]}", 1.0),
    # units
    (["5"], r"\boxed{5 \text{ cm}}", 1.0),
    (["5"], r"\boxed{5 cm}", 1.0),
    (["5"], r"\boxed{6 \text{ cm}}", 0.0),
    (["41.8^\\circ"], r"\boxed{41.8}", 1.0),
    # several answers / sets
    (["1, 2"], r"\boxed{2, 1}", 1.0),
    (["\\{1,2\\}"], r"\boxed{1, 2}", 1.0),
    (["1,2"], r"\boxed{1}", 0.0),
    (["1,2"], r"\boxed{1,3}", 0.0),
    (["$69$,$84$"], r"\boxed{69, 84}", 1.0),          # OlympiadBench golds come $-wrapped
    # nested braces and equivalent forms
    (["\\frac{\\sqrt{2}}{2}"], r"\boxed{\frac{\sqrt{2}}{2}}", 1.0),
    (["\\frac{\\sqrt{2}}{2}"], r"\boxed{\frac{1}{\sqrt{2}}}", 1.0),
    (["\\left( 3, \\frac{\\pi}{2} \\right)"], r"\boxed{(3, \frac{\pi}{2})}", 1.0),
    # text answers
    (["\\text{Evelyn}"], r"\boxed{\text{Evelyn}}", 1.0),
    (["\\text{Evelyn}"], r"\boxed{Evelyn}", 1.0),
    (["\\text{east}"], r"\boxed{\text{west}}", 0.0),
    # several acceptable golds: any match counts
    (["0.01", "0.02"], r"\boxed{0.02}", 1.0),
    (["0.01", "0.02"], r"\boxed{0.03}", 0.0),
    # extraction
    (["5"], "The answer is 5.", 0.0),                  # no boxed answer
    (["3"], r"maybe \boxed{2}, no: \boxed{3}", 1.0),   # the last box counts
    (["2"], r"maybe \boxed{2}, no: \boxed{3}", 0.0),
    (["7"], r"\fbox{7}", 1.0),
]


def test_answer_form_table(qwen_reward):
    golds = [g for g, _, _ in ANSWER_FORMS]
    responses = ["Reasoning... " + r for _, r, _ in ANSWER_FORMS]
    res = qwen_reward.score(responses, golds, ["stop"] * len(responses))
    wrong = [(g, r, exp, got, out) for (g, r, exp), got, out in zip(ANSWER_FORMS, res.rewards, res.outcomes)
             if got != exp]
    assert not wrong, wrong
    assert res.stats["n"] == len(ANSWER_FORMS)
    assert res.stats["no_answer"] == 1 and res.stats["timeout"] == 0 and res.stats["error"] == 0
    assert res.stats["correct"] == sum(e for _, _, e in ANSWER_FORMS)
    assert res.stats["verified"] + res.stats["fast_path"] + res.stats["no_answer"] == len(ANSWER_FORMS)


def test_truncated_scores_zero_by_default(qwen_reward):
    res = qwen_reward.score([r"\boxed{4}", r"\boxed{4}"], [["4"], ["4"]], ["length", "stop"])
    assert res.rewards == [0.0, 1.0]
    assert res.outcomes == ["truncated", "correct"]
    assert res.stats["truncated"] == 1


def test_truncated_reward_configurable():
    graded = MathReward(truncated_reward=None).score([r"\boxed{4}"], [["4"]], ["length"])
    assert graded.rewards == [1.0]
    penalised = MathReward(truncated_reward=-1.0).score([r"\boxed{4}"], [["4"]], ["length"])
    assert penalised.rewards == [-1.0] and penalised.outcomes == ["truncated"]


def test_other_templates():
    with MathReward(template="r1", timeout_s=20.0, workers=1) as r1:
        res = r1.score(["<think>..</think> <answer>\\boxed{4}</answer>", "<answer>$\\frac12$</answer>",
                        "\\boxed{4}", "<answer>5</answer>"], [["4"], ["0.5"], ["4"], ["4"]])
        assert res.rewards == [1.0, 1.0, 0.0, 0.0]
        assert res.outcomes[2] == "no_answer"
    plain = MathReward(template="plain")
    res = plain.score(["so the total is 1,234.", "12 apples, then 15"], [["1234"], ["12"]])
    assert res.rewards == [1.0, 0.0]
    plain.close()


def test_adversarial_long_responses_do_not_hang(qwen_reward):
    texts = ["\\boxed{" + "1" * 100_000 + "}", "x" * 100_000, "\\boxed{" * 20_000, "{" * 100_000 + "\\boxed{2}"]
    t0 = time.monotonic()
    res = qwen_reward.score(texts, [["1"], ["1"], ["1"], ["2"]])
    assert time.monotonic() - t0 < 5.0
    assert res.outcomes == ["too_long", "no_answer", "no_answer", "correct"]


def test_real_hanging_verification_is_cut_off_and_counted():
    # Both hang math-verify for minutes (a power tower; 100k letters); the kill cuts them off.
    timeout = 1.5
    with MathReward(template="qwen_math", timeout_s=timeout, workers=2, max_answer_chars=None) as reward:
        responses = [r"\boxed{9^{9^{9^{9}}}}", "\\boxed{" + "a" * 100_000 + "}", r"\boxed{\frac{2}{4}}"]
        reward.score([r"\boxed{1+1}"], [["2"]])  # workers up (start-up is not charged to a call)
        t0 = time.monotonic()
        res = reward.score(responses, [["1"], ["1"], ["0.5"]])
        wall = time.monotonic() - t0
    assert res.outcomes == ["timeout", "timeout", "correct"]
    assert res.rewards == [0.0, 0.0, 1.0]
    assert res.stats["timeout"] == 2 and res.stats["worker_restarts"] == 2
    assert wall < timeout + 6.0, wall


@pytest.mark.parametrize("kwargs, match", [
    ({"template": "latex"}, r"'latex'.*allowed.*qwen_math"),
    ({"kind": "code"}, r"'code'.*exact_int"),
    ({"workers": 0}, "workers"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"max_answer_chars": 0}, "max_answer_chars"),
    ({"truncated_reward": "zero"}, "truncated_reward"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RewardConfig(**kwargs)


def test_config_from_dict_and_build():
    with pytest.raises(ValueError, match="templat"):
        RewardConfig.from_dict({"templat": "r1"})
    cfg = RewardConfig.from_dict({"template": "r1", "timeout_s": 2})
    assert isinstance(build_reward(cfg), MathReward)
    assert isinstance(build_reward(RewardConfig(kind="exact_int")), ExactIntReward)


def test_input_validation(qwen_reward):
    with pytest.raises(ValueError, match="2 responses but 1 answer"):
        qwen_reward.score(["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="finish reasons"):
        qwen_reward.score(["a"], [["1"]], ["stop", "stop"])
    with pytest.raises(ValueError, match="non-empty list"):
        qwen_reward.score(["a"], ["1"])


def test_exact_int_reward():
    r = ExactIntReward()
    res = r.score(["7 + 5 = 12", "It is 12.0", "12.5", "I think 12 or 13", "no idea", "12"],
                  [["12"]] * 6, ["stop"] * 5 + ["length"])
    assert res.rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert res.outcomes == ["correct", "correct", "no_answer", "wrong", "no_answer", "truncated"]
    assert res.stats["correct"] == 2
    with pytest.raises(ValueError, match="integer answers"):
        r.score(["1"], [["1/2"]])
