"""Is an extracted answer equivalent to one of the gold answers?

Two checks:
  * ``same_answer_text``: a cheap string comparison after light normalisation, run in the calling
    process; it only ever says "equal" for answers that are equal, so it may skip the verifier.
  * ``math_verify_any``: math-verify's parse + verify (SymPy equivalence: 1/2 = 0.5 = \\frac12,
    intervals, sets, units dropped). It can hang on adversarial input (``9^{9^{9^{9}}}``), so it
    runs in a worker process that the caller kills on a timeout (see ``pool.TimeoutPool``).

A verify function has the signature ``(pred: str, golds: list[str]) -> bool`` and must be a
module-level function so that it pickles into a spawned worker.
"""

from __future__ import annotations

import functools
import re

__all__ = ["math_verify_any", "same_answer_text", "normalize_answer_text", "gold_to_latex", "warm_up_math_verify"]

_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\[,!;: ]|\\quad|\\qquad|\\left|\\right|\s+")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def normalize_answer_text(s: str) -> str:
    """Lower-cased answer with LaTeX spacing, ``$``, ``\\text{}`` wrappers and a final period removed."""
    s = _UNESCAPED_DOLLAR_RE.sub("", s)
    s = _TEXT_WRAPPER_RE.sub(r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACING_RE.sub("", s)
    return s.rstrip(".").lower()


def same_answer_text(pred: str, golds: list[str]) -> bool:
    """True when ``pred`` equals one of ``golds`` after ``normalize_answer_text`` (never a false "equal")."""
    p = normalize_answer_text(pred)
    return bool(p) and any(p == normalize_answer_text(g) for g in golds)


def gold_to_latex(gold: str) -> str:
    """A gold answer as a boxed LaTeX string for math-verify.

    Some sets wrap golds in ``$...$`` (OlympiadBench: ``$69$,$84$``); the delimiters are dropped
    (escaped ``\\$`` currency signs stay) and the answer is boxed, like the extracted prediction.
    """
    g = _UNESCAPED_DOLLAR_RE.sub("", gold).strip().rstrip(".").strip()
    return "\\boxed{" + g + "}"


@functools.lru_cache(maxsize=4096)
def _parse_cached(latex: str):
    # The worker caches gold parses: eval and group sampling grade many responses per gold.
    return _parse(latex)


def _parse(latex: str):
    from math_verify import parse  # imported in the worker, not by `import holderpo_megatron.rewards`

    # parsing_timeout=None: math-verify's own SIGALRM timeout cannot stop C-level work (huge
    # integer powers); the pool's kill is the one timeout.
    return parse(latex, parsing_timeout=None)


def math_verify_any(pred: str, golds: list[str]) -> bool:
    """math-verify equivalence of the extracted ``pred`` with any of ``golds`` (``verify(gold, pred)``)."""
    from math_verify import verify

    target = _parse("\\boxed{" + pred + "}")
    if not target:
        return False
    for gold in golds:
        parsed_gold = _parse_cached(gold_to_latex(gold))
        if parsed_gold and verify(parsed_gold, target, timeout_seconds=None):
            return True
    return False


def warm_up_math_verify() -> None:
    """Worker initialiser: import math-verify (SymPy, the ANTLR parser) before the worker reports
    ready, so that start-up is not charged to the first call's timeout; and silence its once-per-
    process warning that its own timeout is disabled (the pool owns the timeout)."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    math_verify_any("1", ["1"])
