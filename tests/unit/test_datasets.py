"""Math datasets (shared JSONL files, skipped when absent), prompt templates, the generated
arithmetic set and the resumable batch iterator."""

import json
import re

import pytest

from holderpo_megatron.data.datasets import (PAPER_EVAL_SUITE, BatchIterator, RowFields, data_root,
                                             generate_arithmetic_problems, load_math_dataset, math_data_dir)
from holderpo_megatron.data.templates import PROMPT_TEMPLATES, PromptTemplate, get_prompt_template, render_chatml

# Row counts from shared/data/README.md; (rows, rows with a null answer). The MATH train sets also
# hold 2 rows whose answer is an empty string (not in the README); those are skipped too.
README_ROWS = {
    "aime24": (30, 0), "aime25": (30, 0), "amc": (83, 0), "amc23_40": (40, 0), "math500": (500, 0),
    "minerva": (272, 0), "olympiadbench": (675, 0), "math_train": (7500, 2), "math_train_lvl3to5": (5586, 2),
    "math_lvl3to5_8k": (8888, 2), "gsm8k_train": (7473, 0), "gsm8k_test": (1319, 0),
}
EMPTY_ANSWER_ROWS = {"math_train": 2, "math_train_lvl3to5": 2, "math_lvl3to5_8k": 2}


@pytest.fixture(scope="module")
def math_dir():
    d = math_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared math data not found at {d} (set HOLDERPO_DATA to the shared data folder)")
    return d


@pytest.mark.parametrize("name", sorted(README_ROWS))
def test_shared_sets_match_readme_counts(math_dir, name):
    rows, null_rows = README_ROWS[name]
    ds = load_math_dataset(name)
    assert len(ds) + ds.skipped_no_answer == rows
    assert ds.skipped_no_answer == null_rows + EMPTY_ANSWER_ROWS.get(name, 0)
    assert all(isinstance(it.problem, str) and it.problem for it in ds)
    assert all(it.answers and all(isinstance(a, str) and a for a in it.answers) for it in ds)
    assert ds.name == name and all(it.source == name for it in ds)


def test_paper_suite_is_present(math_dir):
    for name in PAPER_EVAL_SUITE:
        assert (math_dir / name / "data.jsonl").is_file(), name


def test_answers_field_is_merged_and_numbers_are_text(math_dir):
    minerva = load_math_dataset("minerva")
    multi = [it for it in minerva if len(it.answers) > 1]
    assert 0 < len(multi) <= 75  # the README's 75 rows, less those whose forms are identical
    assert all(it.answers[0] == it.answer for it in minerva)
    amc23 = load_math_dataset("amc23_40")  # stores floats such as 27.0
    assert amc23[0].answer == "27"
    gsm = load_math_dataset("gsm8k_test", limit=5)
    assert len(gsm) == 5 and gsm[0].answer == "18"


def test_null_answer_rows_are_skipped_and_counted(math_dir):
    ds = load_math_dataset("math_train")
    raw = [json.loads(line) for line in open(ds.path, encoding="utf-8")]
    assert sum(raw[i]["answer"] is None for i in ds.skipped_rows) == 2  # the README's 2 null rows
    assert all(raw[i]["answer"] is None or not raw[i]["answer"].strip() for i in ds.skipped_rows)
    assert [it.index for it in ds][:3] == [i for i in range(len(raw)) if raw[i]["answer"] is not None][:3]


def test_loader_on_local_files(tmp_path):
    p = tmp_path / "toy" / "data.jsonl"
    p.parent.mkdir()
    rows = [{"problem": "1+1?", "answer": "2", "answers": ["2", "2.0"]}, {"problem": "x?", "answer": None},
            {"problem": "2+2?", "answer": 4.0}, {"problem": "y?", "answer": None, "answers": ["5"]}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_math_dataset(p.parent)
    assert [it.answers for it in ds] == [("2", "2.0"), ("4",), ("5",)]
    assert ds.skipped_no_answer == 1 and ds.skipped_rows == [1] and [it.index for it in ds] == [0, 2, 3]
    assert len(load_math_dataset(p, limit=2)) == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_math_dataset(bad)
    bad.write_text('{"question": "a", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1.*problem"):
        load_math_dataset(bad)
    with pytest.raises(FileNotFoundError, match="no_such_set"):
        load_math_dataset("no_such_set", root=tmp_path)
    with pytest.raises(ValueError, match="limit"):
        load_math_dataset(p, limit=0)


# --- your own sets: other formats and field names ---

# One set written four ways: the house JSONL (problem/answer), and with its own field names
# (question/solution) as JSONL, Parquet, a folder saved by datasets, a split of a saved DatasetDict,
# and a folder of Parquet files (datasets.load_dataset). Row 1 has no answer (skipped and counted),
# row 2 two acceptable answers, and every row an integer field that must reach the item's row.
ROWS = [{"question": "1+1?", "solution": "2", "answers": ["2", "two"], "level": 1},
        {"question": "x?", "solution": None, "answers": None, "level": 2},
        {"question": "2+3?", "solution": "5", "answers": ["5", "5.0", "five"], "level": 3},
        {"question": "9-4?", "solution": "5", "answers": None, "level": 4}]


def _write_everywhere(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    house = tmp_path / "house.jsonl"
    house.write_text("".join(json.dumps({"problem": r["question"], "answer": r["solution"], "answers": r["answers"],
                                         "level": r["level"]}) + "\n" for r in ROWS))
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "own.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds.select([0]), "test": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "files").mkdir()
    ds.to_parquet(str(tmp_path / "files" / "part-0.parquet"))
    return house


def test_parquet_datasets_folders_and_renamed_jsonl_load_to_the_same_items(tmp_path):
    house = load_math_dataset(_write_everywhere(tmp_path))
    assert [(it.problem, it.answers) for it in house] == [("1+1?", ("2", "two")), ("2+3?", ("5", "5.0", "five")),
                                                          ("9-4?", ("5",))]
    assert house.skipped_rows == [1]
    own = RowFields(prompt="question", answer="solution")
    test_split = RowFields(prompt="question", answer="solution", split="test")
    for where, fields in [("own.jsonl", own), ("own.parquet", own), ("saved", own), ("saved_dict", test_split),
                          ("files", own)]:
        ds = load_math_dataset(tmp_path / where, fields=fields)
        same = [(it.problem, it.answers, it.index, it.messages) for it in ds]
        assert same == [(it.problem, it.answers, it.index, it.messages) for it in house], where
        assert ds.skipped_rows == [1] and ds.answer_key == "solution", where
        assert [it.row["level"] for it in ds] == [1, 3, 4], where  # the whole row travels with the item
        assert [it.row["question"] for it in ds] == ["1+1?", "2+3?", "9-4?"], where
    assert [it.problem for it in load_math_dataset(tmp_path / "saved_dict", fields=own)] == ["1+1?"]
    with pytest.raises(ValueError, match=r"no split 'valid'; its splits: \['test', 'train'\]"):
        load_math_dataset(tmp_path / "saved_dict", fields=RowFields(prompt="question", split="valid"))
    with pytest.raises(ValueError, match=r"own.parquet row 0: row has no 'problem' string"):
        load_math_dataset(tmp_path / "own.parquet")  # default fields on a set that names them otherwise
    # no answer field: every row kept, none skipped (a custom reward reads the row)
    free = load_math_dataset(tmp_path / "own.parquet", fields=RowFields(prompt="question", answer=None))
    assert len(free) == 4 and free.skipped_no_answer == 0 and all(it.answers == () for it in free)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no data.jsonl, no dataset saved by datasets, and no data files"):
        load_math_dataset(tmp_path / "empty_dir")


def test_chat_message_rows_are_the_prompt_as_is(tmp_path):
    from transformers import AutoTokenizer

    from holderpo_megatron.data.templates import prompt_token_lengths
    from tests.integration.tiny_llama import save_tiny_llama

    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "w3 w4"}],
             "answer": 3},
            {"messages": [{"role": "user", "content": "w5"}], "answer": "4"}]
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_math_dataset(p, fields=RowFields(prompt="messages"))
    assert [it.problem for it in ds] == ["w3 w4", "w5"] and [it.answers for it in ds] == [("3",), ("4",)]
    assert ds[0].prompt == rows[0]["messages"] and ds[0].messages[0] == ("system", "Be brief.")
    tok = AutoTokenizer.from_pretrained(save_tiny_llama(tmp_path / "tiny"))
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant:"
    # a chat row is the prompt as is, under every template; a text row gets the template's wrapping
    for name in ("plain", "qwen_math"):
        ids = prompt_token_lengths(get_prompt_template(name), tok, [ds[0].prompt, "w9"], ids=True)
        assert ids[0] == tok("system: Be brief. user: w3 w4 assistant:", add_special_tokens=False)["input_ids"]
    plain = get_prompt_template("plain")
    assert prompt_token_lengths(plain, tok, [ds[1].prompt, "w9"], ids=True)[1] == tok(plain.render("w9"))["input_ids"]
    p.write_text(json.dumps({"messages": [{"role": "user", "text": "hi"}], "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: 'messages' holds a list, so each entry must be a chat message"):
        load_math_dataset(p, fields=RowFields(prompt="messages"))


def test_data_root_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("HOLDERPO_DATA", str(tmp_path))
    assert data_root() == tmp_path and math_data_dir() == tmp_path / "math"
    monkeypatch.delenv("HOLDERPO_DATA")
    assert data_root().parts[-2:] == ("shared", "data")


# --- prompt templates ---

def test_qwen_math_template():
    t = get_prompt_template("qwen_math")
    msgs = t.messages("What is 1+1?")
    assert msgs == [{"role": "user", "content":
                     "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."}]
    assert t.render("What is 1+1?") == render_chatml(msgs)
    assert t.render("What is 1+1?").endswith("<|im_start|>assistant\n")
    assert t.render("Q", apply_chat_template=lambda m: "CUSTOM:" + m[-1]["content"]).startswith("CUSTOM:Q\n")
    assert t.answer_template == "qwen_math"


def test_raw_templates_and_registry():
    r1 = get_prompt_template("r1")
    text = r1.render("What is 1+1?")
    assert "<answer>" in text and "User: What is 1+1?" in text and text.endswith("Assistant: <think>")
    assert get_prompt_template("plain").render("2+3?") == "Question: 2+3?\nAnswer:"
    with pytest.raises(ValueError, match=r"'chatml'.*allowed.*qwen_math"):
        get_prompt_template("chatml")
    with pytest.raises(ValueError, match="problem"):
        PromptTemplate(name="x", user_format="no field", answer_template="plain")


def test_every_template_names_a_known_answer_format():
    from holderpo_megatron.rewards.extract import ANSWER_TEMPLATES
    assert {"qwen_math", "r1", "plain"} <= set(PROMPT_TEMPLATES)
    for t in PROMPT_TEMPLATES.values():
        assert t.answer_template in ANSWER_TEMPLATES, t.name


# --- generated arithmetic ---

_PLUS = ("buys", "gave", "in total", "plus")
_MINUS = ("gives away", "lost", "takes", "minus")


def test_arithmetic_is_deterministic_and_correct():
    a = generate_arithmetic_problems(300, seed=7)
    assert a.items == generate_arithmetic_problems(300, seed=7).items
    assert a.items[:50] == generate_arithmetic_problems(50, seed=7).items  # item i independent of n
    assert a.items != generate_arithmetic_problems(300, seed=8).items
    for it in a:
        x, y = (int(v) for v in re.findall(r"\d+", it.problem))
        assert 1 <= x <= 99 and 1 <= y <= 99
        plus = any(w in it.problem for w in _PLUS)
        minus = any(w in it.problem for w in _MINUS)
        assert plus != minus, it.problem
        expected = x + y if plus else x - y
        assert expected >= 0 and it.answers == (str(expected),), it.problem
    assert len({re.sub(r"[A-Z][a-z]+|\d+", "", it.problem) for it in a}) >= 6  # several phrasings


def test_arithmetic_answers_score_with_exact_int():
    from holderpo_megatron.rewards import ExactIntReward
    items = generate_arithmetic_problems(20, seed=0).items
    res = ExactIntReward().score([f"The answer is {it.answer}." for it in items], [list(it.answers) for it in items])
    assert res.rewards == [1.0] * 20


# --- resumable iterator ---

def test_iterator_covers_each_item_once_per_epoch():
    it = BatchIterator(list(range(10)), batch_size=5, seed=3)
    e0 = it.next_batch() + it.next_batch()
    e1 = it.next_batch() + it.next_batch()
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert e0 != e1  # a fresh permutation per epoch
    assert it.state_dict()["epoch"] == 2 and it.state_dict()["index"] == 0
    seq = BatchIterator(list("abcde"), batch_size=2, shuffle=False)
    assert [next(seq) for _ in range(3)] == [["a", "b"], ["c", "d"], ["e", "a"]]  # crosses the epoch end


def test_iterator_resumes_exactly():
    data = list(range(13))
    a = BatchIterator(data, batch_size=4, seed=11)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
    expected = [a.next_batch() for _ in range(10)]
    b = BatchIterator(data, batch_size=4, seed=0)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(10)] == expected
    with pytest.raises(ValueError, match="13 items"):
        BatchIterator(list(range(12)), batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(data, batch_size=0)
