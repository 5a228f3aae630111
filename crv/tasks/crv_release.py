"""The CRV paper's released annotated files (``facebook/crv``: e.g. ``arith.nt7.annotated.json``).

One object per expression, a JSON array or JSON Lines::

    {"expression_id": 17, "original_expression": "((3+4)*2)", "total_steps": 2,
     "step_expressions": [
        {"step_number": 1, "step_content": "3+4=7 ...", "label": 1,
         "assistant_content_before": "...", "assistant_content_after": "...",
         "formatted_assistant_content_before": "<|begin_of_text|>...", "formatted_assistant_content_after": "..."},
        ...]}

Where each field goes:

==========================================  =============================================================
release field                               crv record
==========================================  =============================================================
``expression_id``                           ``problem_id`` = ``<task>-nt<n>-<expression_id>``
``original_expression``                     ``question``
file name ``<task>.nt<n>...`` (or caller)   ``task``, ``n``
``step_expressions[k].step_content``        ``steps[k]`` (ordered by ``step_number``)
step label (``label`` / ``step_label`` /    ``labels[k]``: 1 correct, 0 incorrect (the release's
``is_correct`` / ``correct``; 1/0, bool,    ``pos_label=0``: incorrect is the positive class); steps
or "correct" / "incorrect")                 after the first incorrect one are dropped (strict truncation)
``formatted_assistant_content_after`` of    ``text``: what is attributed, exactly as the paper does
the last kept step
``formatted_assistant_content_before/       ``step_chars[k]`` = ``[len(before_k), len(after_k))`` in
after`` of step k                           ``text`` (each must be a prefix of the next; checked)
``answer`` / ``ground_truth`` if present    ``answer`` (else empty)
==========================================  =============================================================

``final_answer`` is null and ``solved`` false (the release labels steps, not answers); ``source`` is
``crv-release``. Errors name ``file:line`` of the expression.
"""

from __future__ import annotations

import re
from pathlib import Path

from crv.tasks.json_objects import iter_json_objects
from crv.tasks.schema import Record, RecordError

LABEL_KEYS = ("label", "step_label", "is_correct", "correct")
BEFORE, AFTER = "formatted_assistant_content_before", "formatted_assistant_content_after"


def _label(step: dict, k: int) -> int:
    for key in LABEL_KEYS:
        if key in step:
            v = step[key]
            if isinstance(v, str) and v.strip().lower() in ("correct", "incorrect"):
                return int(v.strip().lower() == "correct")
            if isinstance(v, (bool, int)) and int(v) in (0, 1):
                return int(v)
            raise RecordError(f"step {k}: label {v!r} is not 1/0, true/false or correct/incorrect")
    raise RecordError(f"step {k}: no step label (looked for {', '.join(LABEL_KEYS)})")


def task_and_n(path: Path) -> tuple[str, int | None]:
    """``arith.nt7.annotated.json`` -> ("arith", 7)."""
    m = re.search(r"\.nt(\d+)", path.name)
    return path.name.split(".")[0], (int(m.group(1)) if m else None)


def crv_release_record(obj: object, task: str, n: int | None) -> Record:
    """One annotated expression as a truncated, labelled record with its formatted text."""
    if not isinstance(obj, dict):
        raise RecordError(f"an expression must be a JSON object, got {type(obj).__name__}")
    for key in ("expression_id", "original_expression", "step_expressions"):
        if key not in obj:
            raise RecordError(f"missing field {key!r}")
    raw = obj["step_expressions"]
    if not isinstance(raw, list) or not raw or not all(isinstance(s, dict) for s in raw):
        raise RecordError("step_expressions must be a non-empty list of objects")
    raw = sorted(raw, key=lambda s: s.get("step_number", 0))
    steps, labels, spans, text = [], [], [], ""
    for k, s in enumerate(raw):
        for key in ("step_content", BEFORE, AFTER):
            if not isinstance(s.get(key), str):
                raise RecordError(f"step {k}: {key} must be a string")
        before, after = s[BEFORE], s[AFTER]
        if not after.startswith(before) or not before.startswith(text):
            raise RecordError(f"step {k}: {BEFORE} must extend the previous step's text and be a prefix of {AFTER}")
        if not after[len(before):].strip():
            raise RecordError(f"step {k}: {AFTER} adds nothing to {BEFORE}")
        steps.append(s["step_content"].strip() or after[len(before):].strip())
        labels.append(_label(s, k))
        spans.append([len(before), len(after)])
        text = after
        if labels[-1] == 0:
            break  # strict truncation after the first incorrect step
    answer = obj.get("answer", obj.get("ground_truth", ""))
    return Record(problem_id=f"{task}-nt{n}-{obj['expression_id']}" if n is not None else f"{task}-{obj['expression_id']}",
                  task=task, n=n, question=str(obj["original_expression"]), answer=str(answer), steps=steps,
                  labels=labels, final_answer=None, solved=False, source="crv-release", text=text, step_chars=spans)


def read_crv_release(path: str | Path, task: str | None = None, n: int | None = None) -> list[Record]:
    """Every expression of an annotated release file as a record (task and n from the file name unless given)."""
    path = Path(path)
    file_task, file_n = task_and_n(path)
    task, n = task or file_task, n if n is not None else file_n
    out = []
    for line, obj in iter_json_objects(path):
        try:
            out.append(crv_release_record(obj, task, n))
        except (RecordError, TypeError) as e:
            raise RecordError(f"{path}:{line}: {e}") from None
    return out
