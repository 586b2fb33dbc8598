"""Prompt sets: the shared math JSONL files, your own files, a generated arithmetic set, and a resumable iterator.

Shared data lives outside the repo (never copied in): ``$HOLDERPO_DATA`` or ``<repo>/../shared/data``,
with one folder per set under ``math/`` holding ``data.jsonl`` (fields: ``problem``, ``answer``,
optionally ``answers``: every acceptable form, any match counts).

Your own set is a ``.jsonl`` or ``.parquet`` file, a folder saved by ``datasets``
(``Dataset.save_to_disk``), or a folder of data files ``datasets.load_dataset`` reads; ``RowFields``
names the prompt field (text, or chat ``messages``) and the answer field. Each item keeps its whole
row for a custom reward.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = [
    "MathItem", "MathDataset", "RowFields", "data_root", "math_data_dir", "resolve_math_path", "load_math_dataset",
    "generate_arithmetic_problems", "BatchIterator", "PAPER_EVAL_SUITE",
]

# The paper's evaluation suite (folder names under <data root>/math).
PAPER_EVAL_SUITE = ("aime24", "aime25", "amc", "math500", "minerva", "olympiadbench")


@dataclass(frozen=True)
class MathItem:
    """One prompt of a set. ``answers``: every acceptable gold answer, the canonical ``answer`` first
    (empty when the set has no answer field). ``messages``: a chat-format row's prompt as (role,
    content) pairs, else empty; ``problem`` is then its last user message. ``row``: the source row,
    every field as read (what a custom reward looks at)."""

    problem: str
    answers: tuple[str, ...]
    source: str = ""
    index: int = 0  # row in the source file (0-based, counting skipped rows), or generator index
    messages: tuple[tuple[str, str], ...] = ()
    row: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def answer(self) -> str:
        return self.answers[0]

    @property
    def prompt(self) -> str | list[dict[str, str]]:
        """What the prompt template renders: the problem text, or a chat row's own messages."""
        if self.messages:
            return [{"role": role, "content": content} for role, content in self.messages]
        return self.problem


@dataclass(frozen=True)
class RowFields:
    """Which fields of a row are the prompt and the answer.

    prompt: a text field, or a list of chat messages (``{"role": ..., "content": ...}``, as in
      ``messages``), which is then the prompt as is (the prompt template does not wrap it).
    answer: the gold answer (a value, or a list of acceptable ones; a row's ``answers`` list
      joins them), or None: the rows have no answer (a custom reward reads what it needs from the row).
    split: the split to read from a saved ``DatasetDict`` or a folder of data files.
    """

    prompt: str = "problem"
    answer: str | None = "answer"
    split: str = "train"

    def __post_init__(self) -> None:
        for k in ("prompt", "split"):
            if not isinstance(getattr(self, k), str) or not getattr(self, k):
                raise ValueError(f"RowFields.{k} must be a non-empty string, got {getattr(self, k)!r}")
        if self.answer is not None and (not isinstance(self.answer, str) or not self.answer):
            raise ValueError(f"RowFields.answer must be a non-empty string or None, got {self.answer!r}")


@dataclass
class MathDataset:
    """Items of one set. ``skipped_rows``: rows without a usable answer (null or blank ``answer`` and
    no ``answers``; the MATH train sets have 2 null and 2 empty-string answers each)."""

    name: str
    items: list[MathItem]
    path: str = ""
    skipped_no_answer: int = 0
    skipped_rows: list[int] = field(default_factory=list)
    fields: tuple[str, ...] = ()  # the keys of the first row (to say what a row without an answer holds)
    answer_key: str = "answer"

    def describe_empty(self) -> str:
        """Why a set has no items, in words (for an error message)."""
        if self.skipped_no_answer:
            return (f"all {self.skipped_no_answer} rows lack an {self.answer_key!r} or 'answers' field with a value "
                    f"(a row's fields: {', '.join(self.fields) or 'none'})")
        return "the file has no rows"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> MathItem:
        return self.items[i]

    def __iter__(self) -> Iterator[MathItem]:
        return iter(self.items)


def data_root() -> Path:
    """``$HOLDERPO_DATA``, else ``<repo>/../shared/data`` (may not exist: callers check)."""
    env = os.environ.get("HOLDERPO_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def math_data_dir(root: str | os.PathLike | None = None) -> Path:
    return Path(root if root is not None else data_root()) / "math"


FILE_SUFFIXES = (".jsonl", ".parquet")
# a folder that datasets.load_dataset reads: data files of these kinds
_DATA_FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow")


def _is_datasets_folder(p: Path) -> bool:
    """Saved by ``save_to_disk`` (a Dataset or a DatasetDict), or holding data files."""
    if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
        return True
    return any(f.suffix in _DATA_FILE_SUFFIXES for f in p.rglob("*") if f.is_file())


def resolve_math_path(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A set name (``"math500"`` -> ``<root>/math/math500/data.jsonl``), a folder with ``data.jsonl``,
    a .jsonl or .parquet file, or a ``datasets`` folder (saved, or of data files).

    A bare name that is both a shared set and a folder in the working directory is refused
    (ValueError): write ``./math500`` for the folder."""
    p = Path(name_or_path)
    if p.suffix in FILE_SUFFIXES and p.is_file():
        return p
    candidate = math_data_dir(root) / str(name_or_path) / "data.jsonl"
    bare = isinstance(name_or_path, str) and os.sep not in name_or_path and not name_or_path.startswith(".")
    if bare and candidate.is_file() and p.is_dir() and p.resolve() != candidate.parent.resolve():
        raise ValueError(
            f"math set {name_or_path!r} is ambiguous: it names the shared set {candidate.parent} and the folder "
            f"{p.resolve()} in the working directory; write ./{name_or_path} for the folder, or rename it")
    if p.is_dir() and (p / "data.jsonl").is_file():
        return p / "data.jsonl"
    if candidate.is_file():
        return candidate
    if p.is_dir():
        if _is_datasets_folder(p):
            return p
        raise FileNotFoundError(f"math set folder {str(p)!r} has no data.jsonl, no dataset saved by "
                                f"datasets, and no data files ({', '.join(_DATA_FILE_SUFFIXES)})")
    raise FileNotFoundError(
        f"no math set {str(name_or_path)!r}: not a .jsonl or .parquet file or a folder, and {candidate} does "
        f"not exist (set HOLDERPO_DATA to the shared data folder)")


def _answer_text(value) -> str | None:
    """A gold answer as text: floats that are integers lose their ``.0`` (amc23_40 stores 27.0)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _gold_answers(row: dict, key: str = "answer") -> list[str]:
    """The row's ``key`` (a value or a list of them), then its ``answers`` list; texts, no repeats."""
    golds: list[str] = []
    for field_name in (key, "answers") if key != "answers" else (key,):
        value = row.get(field_name)
        for a in value if isinstance(value, (list, tuple)) else (value,):
            t = _answer_text(a)
            if t is not None and t not in golds:
                golds.append(t)
    return golds


def _chat_messages(value, where: str, key: str) -> tuple[tuple[str, str], ...]:
    """A chat-format prompt as (role, content) pairs; ValueError naming the row when malformed."""
    pairs = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: {key!r} holds a list, so each entry must be a chat message "
                             f"{{'role': str, 'content': str}}, got {m!r:.120}")
        pairs.append((m["role"], m["content"]))
    if not any(role == "user" for role, _ in pairs):
        raise ValueError(f"{where}: the chat messages in {key!r} have no 'user' message")
    return tuple(pairs)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, row) of a JSONL file. Read here rather than by ``datasets``: its JSON reader
    types each column once (a set whose answers mix numbers and text fails to load), and a bad row
    should be named by its line."""
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_no}: a row must be a JSON object, got {type(row).__name__}")
        yield f"{path}:{line_no}", row


def _datasets_rows(path: Path, split: str) -> Iterator[tuple[str, dict]]:
    """(``path row i``, row) of a Parquet file or a ``datasets`` folder, read by ``datasets``."""
    import datasets

    datasets.disable_progress_bars()  # one status line per file read would bury the run's own log
    if path.is_file():
        ds = datasets.Dataset.from_parquet(str(path))
    elif (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(path))
    else:
        try:
            ds = datasets.load_dataset(str(path), split=split)
        except ValueError as e:
            raise ValueError(f"{path}: datasets cannot read split {split!r} here: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; its splits: {sorted(ds)} (set the split to one of them)")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"{path} row {i}", row


def load_math_dataset(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None,
                      limit: int | None = None, fields: RowFields = RowFields()) -> MathDataset:
    """Load a set (``resolve_math_path``); rows whose answers are all null or blank are skipped
    and counted (none when ``fields.answer`` is None).

    ``limit``: keep the first N usable items (file order). A row that is not JSON or lacks a
    prompt (``fields.prompt``: a string, or chat messages) is an error naming the file and row.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    path = resolve_math_path(name_or_path, root)
    name = path.parent.name if path.name == "data.jsonl" else (path.name if path.is_dir() else path.stem)
    rows = _jsonl_rows(path) if path.suffix == ".jsonl" else _datasets_rows(path, fields.split)
    items: list[MathItem] = []
    skipped: list[int] = []
    first_fields: tuple[str, ...] = ()
    key = fields.prompt
    for row_idx, (where, row) in enumerate(rows):
        if row_idx == 0:
            first_fields = tuple(row)
        value = row.get(key)
        messages: tuple[tuple[str, str], ...] = ()
        if isinstance(value, (list, tuple)):
            messages = _chat_messages(value, where, key)
            value = [content for role, content in messages if role == "user"][-1]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: row has no {key!r} string or chat messages (keys: {sorted(row)})")
        golds = _gold_answers(row, fields.answer) if fields.answer is not None else []
        if fields.answer is not None and not golds:
            skipped.append(row_idx)
            continue
        items.append(MathItem(problem=value, answers=tuple(golds), source=name, index=row_idx, messages=messages,
                              row=row))
        if limit is not None and len(items) >= limit:
            break
    return MathDataset(name=name, items=items, path=str(path), skipped_no_answer=len(skipped), skipped_rows=skipped,
                       fields=first_fields, answer_key=fields.answer or "")


# --- generated arithmetic word problems (the embedded CPU demo) -------------------------------

_NAMES = ("Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Ines", "Kofi", "Yuki")
_OBJECTS = ("apples", "marbles", "stickers", "books", "pencils", "coins", "shells", "cards")
# (phrasing, op): {n} name, {o} objects, {a} first number, {b} second number.
_PHRASINGS = (
    ("{n} has {a} {o} and buys {b} more. How many {o} does {n} have?", "+"),
    ("{n} had {a} {o}. A friend gave {n} {b} more. How many {o} does {n} have now?", "+"),
    ("There are {a} {o} in a box and {b} {o} on the table. How many {o} are there in total?", "+"),
    ("What is {a} plus {b}?", "+"),
    ("{n} has {a} {o} and gives away {b}. How many {o} does {n} have left?", "-"),
    ("{n} had {a} {o} and lost {b} of them. How many {o} are left?", "-"),
    ("A shelf holds {a} {o}. {n} takes {b} {o} off the shelf. How many {o} remain on the shelf?", "-"),
    ("What is {a} minus {b}?", "-"),
)


_DIRECT = tuple(p for p in _PHRASINGS if p[0].startswith("What is"))


def _arithmetic_item(seed: int, index: int, max_operand: int = 99, direct: bool = False) -> MathItem:
    # One RNG per (seed, index): item i does not depend on how many items were generated.
    rng = random.Random(seed * 1_000_003 + index)
    phrasings = _DIRECT if direct else _PHRASINGS
    phrasing, op = phrasings[rng.randrange(len(phrasings))]
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if op == "-" and b > a:
        a, b = b, a  # no negative counts of objects
    answer = a + b if op == "+" else a - b
    problem = phrasing.format(n=rng.choice(_NAMES), o=rng.choice(_OBJECTS), a=a, b=b)
    return MathItem(problem=problem, answers=(str(answer),), source="arithmetic", index=index,
                    row={"problem": problem, "answer": answer, "a": a, "b": b, "op": op})


def generate_arithmetic_problems(n: int, seed: int = 0, max_operand: int = 99, direct: bool = False) -> MathDataset:
    """``n`` addition/subtraction word problems with operands in 1..``max_operand`` (default: 1-2
    digits) and non-negative integer answers; ``direct``: only "What is a plus/minus b?".

    Deterministic in (seed, index) across runs and machines (``random.Random`` with an int seed).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    return MathDataset(name="arithmetic", items=[_arithmetic_item(seed, i, max_operand, direct) for i in range(n)])


# --- resumable batch iterator -------------------------------------------------------------------

class BatchIterator:
    """Endless batches of items: one permutation per epoch (seeded by ``seed`` and the epoch).

    Position is (epoch, index into that epoch's order); ``state_dict()`` saves it with the seed and
    the dataset size, ``load_state_dict()`` restores it, so a resumed run sees exactly the batches the
    interrupted one would have. A batch that crosses an epoch end is completed from the next epoch.
    """

    def __init__(self, items: Sequence, batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(items) == 0:
            raise ValueError("BatchIterator needs at least one item")
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            order = list(range(len(self.items)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            self._order, self._order_epoch = order, self.epoch
        return self._order

    def next_batch(self) -> list:
        batch = []
        while len(batch) < self.batch_size:
            order = self._epoch_order()
            take = min(self.batch_size - len(batch), len(order) - self.index)
            batch.extend(self.items[j] for j in order[self.index:self.index + take])
            self.index += take
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return batch

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> list:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
                "num_items": len(self.items), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; a different dataset size is an error (the order would not match)."""
        if state["num_items"] != len(self.items):
            raise ValueError(f"state is for {state['num_items']} items but this iterator has {len(self.items)}")
        if not 0 <= state["index"] < len(self.items):
            raise ValueError(f"state index {state['index']} out of range for {len(self.items)} items")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.seed, self.shuffle = int(state["seed"]), bool(state.get("shuffle", self.shuffle))
        self._order_epoch = -1
