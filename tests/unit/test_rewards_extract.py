"""Answer extraction: templates, nested braces, truncation, linear time on adversarial input."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from holderpo_megatron.rewards.extract import (extract_answer, extract_boxed, extract_last_integer,
                                               extract_last_number, extract_r1)


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{5}", "5"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{\sqrt{2}}{2}"),
    (r"first \boxed{2}, finally \boxed{3}.", "3"),
    (r"\fbox{7}", "7"),
    (r"\boxed{2} then \fbox{8}", "8"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),           # escaped braces do not unbalance the group
    (r"\boxed{4} and then \boxed{5", "4"),           # truncated last box: the previous complete one
    (r"$\boxed 9$", "9"),                            # \boxed without braces
    (r"\boxed{ }", None),
    ("The answer is 5.", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("<think>2+2</think> <answer>4</answer>", "4"),
    (r"<think>x</think><answer>The answer is \boxed{\frac12}.</answer>", r"\frac12"),
    (r"<answer>$\frac{1}{2}$</answer>", r"\frac{1}{2}"),
    ("<answer>1</answer> retry <answer>2</answer>", "2"),
    (r"\boxed{3} but no tags", None),
    ("<answer>4", None),                             # unclosed tag: no answer
    ("<answer>  </answer>", None),
])
def test_extract_r1(text, expected):
    assert extract_r1(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("12 apples and then 15", "15"),
    ("total: 1,234.", "1234"),
    ("it is -3.5 degrees", "-3.5"),
    ("no digits here", None),
])
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("7 + 5 = 12", 12), ("12.0", 12), ("12.5", None), ("I think 12 or 13", 13), ("-4", -4), ("none", None),
    ("9" * 100, None),
])
def test_extract_last_integer(text, expected):
    assert extract_last_integer(text) == expected


def test_unknown_template_names_allowed_ones():
    with pytest.raises(ValueError, match=r"'latex'.*qwen_math"):
        extract_answer("x", "latex")


@pytest.mark.parametrize("text", [
    "\\boxed{" * 20_000,                 # 140k chars, every box unclosed
    "{" * 100_000 + "\\boxed{1",
    "\\boxed{" + "{" * 100_000,
    "1" * 100_000,
    "<answer>" * 12_000 + "</answer>",
    "a" * 100_000,
])
def test_adversarial_inputs_are_linear(text):
    t0 = time.perf_counter()
    for template in ("qwen_math", "r1", "plain"):
        extract_answer(text, template)
    extract_last_integer(text)
    assert time.perf_counter() - t0 < 2.0


_balanced = st.recursive(st.text(alphabet="abc123+-^ ", max_size=5),
                         lambda inner: st.builds(lambda a, b: a + "{" + b + "}", inner, inner), max_leaves=8)


@settings(max_examples=60, deadline=None)
@given(prefix=st.text(max_size=30), content=_balanced)
def test_boxed_roundtrip(prefix, content):
    content = content.strip()
    got = extract_boxed(prefix.replace("\\", "") + " \\boxed{" + content + "}")
    assert got == (content or None)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="\\boxedfb{}<>/answer 0123456789.,-", max_size=200))
def test_extractors_never_raise(text):
    for template in ("qwen_math", "r1", "plain"):
        out = extract_answer(text, template)
        assert out is None or isinstance(out, str)
