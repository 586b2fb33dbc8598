"""An example reward of your own: answer briefly and name the keyword.

Copy this folder, change ``score`` and the rows of data.jsonl, and point the recipe at them.
``holderpo train`` calls ``score`` once per response, in worker processes with a timeout
(``data.reward_timeout_s``): a call that hangs or raises scores 0 and is counted, the run goes on.

    score(completion, item, finish_reason) -> float | RewardScore

completion: the model's response text. item: its data row: ``item.problem`` (the prompt text),
``item.answers`` (the row's ``data.answer_key`` field, as text), ``item.row`` (every field of the
row as read). finish_reason: "stop", or "length" when ``rollout.max_new_tokens`` cut it off.
"""

from holderpo_megatron.rewards import RewardScore


def score(completion: str, item, finish_reason: str) -> RewardScore:
    if finish_reason == "length":  # rambled past the token limit
        return RewardScore(0.0, "truncated")
    keyword = item.answers[0]  # data.answer_key: keyword
    named = keyword.lower() in completion.lower()
    brief = len(completion.split()) <= item.row["max_words"]  # any field of the row is there
    label = "ok" if named and brief else "too_long" if named else "no_keyword" if brief else "neither"
    return RewardScore(0.5 * named + 0.5 * brief, label)
