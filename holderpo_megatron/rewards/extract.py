"""Final-answer extraction from a model response, one function per answer template.

Every extractor runs in time linear in the response length (responses can be adversarial:
100k characters of unbalanced braces must not cost quadratic time) and returns ``None`` when the
response has no answer in the template's format.

Templates:
  * ``qwen_math``: the last ``\\boxed{...}`` or ``\\fbox{...}``, nested braces balanced.
  * ``r1``: the last ``<answer>...</answer>``; inside it, a boxed answer if there is one.
  * ``plain``: the last number in the text (thousands separators dropped).
"""

from __future__ import annotations

import re
from typing import Callable

__all__ = [
    "ANSWER_TEMPLATES",
    "extract_answer",
    "extract_boxed",
    "extract_r1",
    "extract_last_number",
    "extract_last_integer",
]

_BOXED_COMMANDS = ("\\boxed", "\\fbox")
# A number: optional sign, digits with optional 3-digit comma groups, optional decimals.
# No nested quantifiers over the same characters, so matching stays linear.
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_INTEGER_TOKEN_RE = re.compile(r"-?\d+(?:\.\d+)?")
_BARE_ARGUMENT_RE = re.compile(r"[^\s$]+")


def _braced_group(text: str, open_pos: int, limit: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos``, scanning no further than ``limit``.

    ``\\{`` and ``\\}`` (escaped braces, as in ``\\{1, 2\\}``) do not count.
    """
    depth = 0
    i = open_pos
    while i < limit:
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (\{, \}, \\)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxed_occurrences(text: str) -> list[int]:
    """Start positions of ``\\boxed``/``\\fbox`` commands, ascending."""
    starts = []
    for cmd in _BOXED_COMMANDS:
        pos = text.find(cmd)
        while pos != -1:
            starts.append(pos)
            pos = text.find(cmd, pos + len(cmd))
    starts.sort()
    return starts


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``).

    An unclosed last box (a truncated response) falls back to the previous complete one.
    Scanning an earlier box stops where the later unclosed one began: a group that has not closed
    by then cannot close at all, which keeps the whole search linear.
    """
    limit = len(text)
    for start in reversed(_boxed_occurrences(text)):
        cmd_len = 6 if text.startswith("\\boxed", start) else 5
        i = start + cmd_len
        while i < limit and text[i] == " ":
            i += 1
        if i < limit and text[i] == "{":
            close = _braced_group(text, i, limit)
            if close is not None:
                content = text[i + 1:close].strip()
                return content or None
        elif i > start + cmd_len and i < limit:
            # "\boxed 5": the argument is the next whitespace/`$`-delimited token.
            m = _BARE_ARGUMENT_RE.match(text, i)
            if m:
                return m.group(0)
        limit = start
    return None


def extract_r1(text: str) -> str | None:
    """The last ``<answer>...</answer>`` block; the boxed answer inside it when there is one."""
    end = text.rfind("</answer>")
    if end == -1:
        return None
    begin = text.rfind("<answer>", 0, end)
    if begin == -1:
        return None
    inner = text[begin + len("<answer>"):end]
    boxed = extract_boxed(inner)
    if boxed is not None:
        return boxed
    inner = inner.strip()
    if len(inner) >= 2 and inner.startswith("$") and inner.endswith("$"):
        inner = inner.strip("$").strip()
    return inner or None


def extract_last_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed (``"1,234.5"`` -> ``"1234.5"``)."""
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return None if last is None else last.group(0).replace(",", "")


def extract_last_integer(text: str) -> int | None:
    """The last number token of the text as an int; ``None`` when absent or not integral.

    ``"... so 12."`` -> 12, ``"12.0"`` -> 12, ``"12.5"`` -> None (a non-integral final answer).
    Tokens longer than 30 characters are rejected (no answer of the demo task is that long, and
    int() of a 100k-digit string is itself slow).
    """
    last = None
    for last in _INTEGER_TOKEN_RE.finditer(text):
        pass
    if last is None or len(last.group(0)) > 30:
        return None
    whole, _, frac = last.group(0).partition(".")
    if frac and frac.strip("0"):
        return None
    return int(whole)


ANSWER_TEMPLATES: dict[str, Callable[[str], str | None]] = {
    "qwen_math": extract_boxed,
    "r1": extract_r1,
    "plain": extract_last_number,
}


def extract_answer(text: str, template: str) -> str | None:
    """Extract the final answer of ``text`` in the format of ``template`` (see ANSWER_TEMPLATES)."""
    try:
        fn = ANSWER_TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown answer template {template!r}; allowed: {sorted(ANSWER_TEMPLATES)}") from None
    return fn(text)
