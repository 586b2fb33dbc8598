"""Prompt templates: how a problem becomes the prompt text the rollout engine completes.

A template is data (``PromptTemplate``) in one registry. Each names the answer format its
instruction asks for (``answer_template``, one of ``rewards.extract.ANSWER_TEMPLATES``: the
reward must extract what the prompt asked for).

  * ``qwen_math``: one user chat message, ``<problem>\\nPlease reason step by step, and put your
    final answer within \\boxed{}.``; answers extracted from the last ``\\boxed{}``.
  * ``r1``: a raw completion prompt (no chat template) asking for ``<think>`` reasoning and an
    ``<answer>`` block, ending in ``Assistant: <think>``; answers from ``<answer>...</answer>``.
  * ``plain``: a raw ``Question: ...\\nAnswer:`` prompt; the last number of the response is the answer.
  * ``instruction``: the problem as the one user message, as it is (a task of your own).

Chat templates render through the model's tokenizer when one is given
(``apply_chat_template=lambda msgs: tok.apply_chat_template(msgs, tokenize=False,
add_generation_prompt=True)``), else through ChatML, the format of the Qwen family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["PromptTemplate", "PROMPT_TEMPLATES", "get_prompt_template", "register_prompt_template",
           "render_chatml", "prompt_token_ids", "prompt_token_lengths"]

ChatFormatter = Callable[[list[dict]], str]


def render_chatml(messages: list[dict]) -> str:
    """ChatML text of ``messages`` followed by the opening of the assistant turn."""
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


@dataclass(frozen=True)
class PromptTemplate:
    """``chat``: the prompt is chat messages (system? + user ``user_format``), rendered by a chat
    formatter; otherwise ``user_format`` is the raw prompt text. ``user_format`` has one
    ``{problem}`` field."""

    name: str
    user_format: str
    answer_template: str
    chat: bool = True
    system: str | None = None

    def __post_init__(self) -> None:
        if "{problem}" not in self.user_format:
            raise ValueError(f"template {self.name!r}: user_format needs a {{problem}} field, got {self.user_format!r}")

    def messages(self, problem: str) -> list[dict]:
        """Chat messages of the prompt (for a raw template: the raw text as one user message)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": self.user_format.replace("{problem}", problem)})
        return msgs

    def render(self, problem: str, apply_chat_template: ChatFormatter | None = None) -> str:
        """The prompt text for ``problem``; chat templates go through ``apply_chat_template`` (default ChatML)."""
        if not self.chat:
            return self.user_format.replace("{problem}", problem)
        return (apply_chat_template or render_chatml)(self.messages(problem))


def prompt_token_ids(template: PromptTemplate, tokenizer, problem: str | list[dict]) -> list[int]:
    """The token ids the rollout engine is given for ``problem``: a chat template through the
    tokenizer's own chat template (no special tokens added on top), a raw one with them. A list of
    chat messages (a chat-format row) is the prompt as is, through the tokenizer's chat template."""
    return prompt_token_lengths(template, tokenizer, [problem], ids=True)[0]


def prompt_token_lengths(template: PromptTemplate, tokenizer, problems: list[str | list[dict]],
                         ids: bool = False) -> list:
    """Token counts (or ids, ``ids=True``) of many prompts, tokenized as :func:`prompt_token_ids`
    does, in one batch call."""
    chat_texts, raw_texts, is_chat = [], [], []
    for p in problems:
        if isinstance(p, str) and not template.chat:
            raw_texts.append(template.render(p))
            is_chat.append(False)
        else:
            messages = template.messages(p) if isinstance(p, str) else p
            chat_texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            is_chat.append(True)
    chat = iter(tokenizer(chat_texts, add_special_tokens=False)["input_ids"] if chat_texts else [])
    raw = iter(tokenizer(raw_texts)["input_ids"] if raw_texts else [])
    enc = [next(chat) if c else next(raw) for c in is_chat]
    return [list(e) for e in enc] if ids else [len(e) for e in enc]


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {}


def register_prompt_template(template: PromptTemplate, overwrite: bool = False) -> PromptTemplate:
    if template.name in PROMPT_TEMPLATES and not overwrite:
        raise ValueError(f"prompt template {template.name!r} is already registered")
    PROMPT_TEMPLATES[template.name] = template
    return template


def get_prompt_template(name: str) -> PromptTemplate:
    try:
        return PROMPT_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; allowed: {sorted(PROMPT_TEMPLATES)}") from None


register_prompt_template(PromptTemplate(
    name="qwen_math",
    user_format="{problem}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    answer_template="qwen_math",
))
register_prompt_template(PromptTemplate(
    name="r1",
    user_format=(
        "A conversation between a User and an Assistant. The User poses a problem and the Assistant "
        "solves it: the Assistant first reasons it through, then gives the final answer. The reasoning "
        "goes inside <think> </think> tags and the final answer inside <answer> </answer> tags, i.e. "
        "<think> reasoning </think> <answer> answer </answer>.\nUser: {problem}\nAssistant: <think>"
    ),
    answer_template="r1",
    chat=False,
))
register_prompt_template(PromptTemplate(
    name="plain",
    user_format="Question: {problem}\nAnswer:",
    answer_template="plain",
    chat=False,
))

# your own task: the prompt field as the one user message, nothing added (the rows say what to do)
register_prompt_template(PromptTemplate(
    name="instruction",
    user_format="{problem}",
    answer_template="plain",
))
register_prompt_template(PromptTemplate(
    name="arithmetic",
    user_format="{problem}\nAnswer with just the number.",
    answer_template="plain",
))
