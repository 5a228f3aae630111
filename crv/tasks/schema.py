"""The labelled-trace record: the one schema every stage reads and writes (JSONL).

One JSON object per line:

============  ==============  ===========================================================
field         type            meaning
============  ==============  ===========================================================
problem_id    str             unique id of the problem (and of the trace's source)
task          str             any non-empty name; crv generates and labels ``arith``,
                              ``bool`` and ``gsm8k`` (:data:`KNOWN_TASKS`), other tasks
                              come from the user's dataset with its own labels
n             int or null     difficulty: number of operators (null for GSM8K)
question      str             the problem text (synthetic: the expression)
answer        str             ground-truth final answer
steps         list[str]       the trace's steps, truncated after the first faulty one
labels        list[int]       per step: 1 = correct, 0 = faulty (same length as steps;
                              strict truncation: only the last label may be 0)
final_answer  str or null     the answer the trace ended with (null if none was written)
solved        bool            ``final_answer`` equals ``answer``
source        str             who wrote the trace (``reasoner``, ``reference``,
                              ``gsm8k:175b_verification``, ...)
raw_output    str or null     the full untruncated text the trace came from
text          str or null     optional: the exact text the model read, through the last
                              step (e.g. the CRV release's chat-formatted
                              ``formatted_assistant_content_after``); when given it is
                              attributed as it is, whatever the prompt format
step_chars    list or null    with ``text``: each step's ``[start, end)`` characters in it
============  ==============  ===========================================================

:func:`read_records` validates every line and raises :class:`RecordError` naming
the file and line of the first problem.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

#: tasks crv itself can generate, label or import; a record may name any other task
KNOWN_TASKS = ("arith", "bool", "gsm8k")


class RecordError(ValueError):
    """A record (or a line of a JSONL file) does not follow the schema."""


@dataclass
class Record:
    """One labelled chain-of-thought trace (see the module docstring for the fields)."""

    problem_id: str
    task: str
    n: int | None
    question: str
    answer: str
    steps: list[str]
    labels: list[int]
    final_answer: str | None
    solved: bool
    source: str = "reasoner"
    raw_output: str | None = field(default=None, repr=False)
    text: str | None = field(default=None, repr=False)
    step_chars: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def first_error(self) -> int | None:
        """Index of the faulty step, or None if every step is correct."""
        return self.labels.index(0) if 0 in self.labels else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        if not isinstance(data, dict):
            raise RecordError(f"a record must be a JSON object, got {type(data).__name__}")
        names = set(cls.__dataclass_fields__)
        required = {"problem_id", "task", "n", "question", "answer", "steps", "labels", "final_answer", "solved"}
        missing = sorted(required - set(data))
        if missing:
            raise RecordError(f"missing field(s): {', '.join(missing)}")
        extra = sorted(set(data) - names)
        if extra:
            raise RecordError(f"unknown field(s): {', '.join(extra)}")
        return cls(**data)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RecordError(msg)


def validate(r: Record) -> None:
    """Raise RecordError if a record breaks the schema."""
    _check(isinstance(r.problem_id, str) and r.problem_id != "", "problem_id must be a non-empty string")
    _check(isinstance(r.task, str) and r.task.strip() != "" and r.task == r.task.strip(),
           f"task must be a non-empty name without surrounding spaces, got {r.task!r}")
    _check(r.n is None or (isinstance(r.n, int) and not isinstance(r.n, bool) and r.n >= 0), f"n must be a non-negative integer or null, got {r.n!r}")
    _check(isinstance(r.question, str) and r.question.strip() != "", "question must be a non-empty string")
    _check(isinstance(r.answer, str), "answer must be a string")
    _check(isinstance(r.steps, list) and all(isinstance(s, str) for s in r.steps), "steps must be a list of strings")
    for i, step in enumerate(r.steps):
        _check(step.strip() != "", f"step {i} is empty (or only whitespace): every step needs text to attribute")
    _check(isinstance(r.labels, list) and all(x in (0, 1) and not isinstance(x, bool) for x in r.labels), "labels must be a list of 0/1 integers")
    _check(len(r.steps) == len(r.labels), f"steps ({len(r.steps)}) and labels ({len(r.labels)}) differ in length")
    _check(0 not in r.labels[:-1], "only the last step may be faulty (traces are truncated after the first faulty step)")
    _check(r.final_answer is None or isinstance(r.final_answer, str), "final_answer must be a string or null")
    _check(isinstance(r.solved, bool), "solved must be true or false")
    _check(isinstance(r.source, str), "source must be a string")
    _check(r.raw_output is None or isinstance(r.raw_output, str), "raw_output must be a string or null")
    _check((r.text is None) == (r.step_chars is None), "text and step_chars come together (or neither)")
    if r.text is not None:
        _check(isinstance(r.text, str), "text must be a string or null")
        spans = r.step_chars
        _check(isinstance(spans, list) and len(spans) == len(r.steps), "step_chars must hold one [start, end) per step")
        last = 0
        for i, span in enumerate(spans):  # type: ignore[union-attr]
            ok = (isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                  and last <= span[0] < span[1] <= len(r.text))
            _check(ok, f"step_chars[{i}] must be [start, end) with {last} <= start < end <= len(text), got {span!r}")
            _check(r.text[span[0]:span[1]].strip() != "", f"step_chars[{i}] covers only whitespace")
            last = span[1]


def truncate(steps: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """Strict truncation: keep steps up to and including the first faulty one."""
    if 0 in labels:
        k = labels.index(0) + 1
        return steps[:k], labels[:k]
    return list(steps), list(labels)


def write_records(records: Iterable[Record], path: str | Path) -> int:
    """Write records as JSONL (atomically: temp file then rename); return how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


def iter_records(path: str | Path) -> Iterator[Record]:
    """Yield validated records from a JSONL file; RecordError names the bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such dataset file: {path}")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:
                yield Record.from_dict(data)
            except (RecordError, TypeError) as e:
                raise RecordError(f"{path}:{lineno}: {e}") from None


def read_records(path: str | Path) -> list[Record]:
    """All validated records of a JSONL file."""
    return list(iter_records(path))
