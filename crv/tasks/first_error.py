"""First-error datasets (ProcessBench's layout): one object per solution, the index of its first wrong step.

    {"id": "gsm8k-12", "problem": "...", "steps": ["...", "..."], "label": 1,
     "final_answer_correct": false, "generator": "Qwen2-7B-Instruct"}

A JSON array or JSON Lines. Mapping onto crv records (``label`` = index of the first wrong step, -1
if none): ``steps`` are kept up to and including the first wrong one (strict truncation, as CRV and
ProcessBench score), ``labels`` are 1 before it and 0 on it; ``problem`` -> ``question``; ``id`` ->
``problem_id`` (else ``<file stem>-<index>``); ``generator`` -> ``source``; ``final_answer_correct`` ->
``solved``; ``answer`` / ``final_answer`` are kept if present. ``task`` is the caller's (default: the
file's stem), ``n`` is null. Steps may span several lines; they are attributed as written.
"""

from __future__ import annotations

from pathlib import Path

from crv.tasks.json_objects import iter_json_objects
from crv.tasks.schema import Record, RecordError

REQUIRED = ("problem", "steps", "label")


def first_error_record(obj: object, index: int, task: str, stem: str) -> Record:
    """One solution object as a truncated, labelled record (raises RecordError naming the problem)."""
    if not isinstance(obj, dict):
        raise RecordError(f"a solution must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise RecordError(f"missing field(s): {', '.join(missing)} (a first-error solution has problem, steps, label)")
    steps, label = obj["steps"], obj["label"]
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise RecordError("steps must be a non-empty list of non-empty strings")
    if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
        raise RecordError(f"label must be -1 (no wrong step) or a step index 0..{len(steps) - 1}, got {label!r}")
    kept = steps if label == -1 else steps[: label + 1]
    labels = [1] * len(kept) if label == -1 else [1] * label + [0]
    solved = obj.get("final_answer_correct", label == -1)
    if not isinstance(solved, bool):
        raise RecordError(f"final_answer_correct must be true or false, got {solved!r}")
    final = obj.get("final_answer")
    return Record(
        problem_id=str(obj.get("id", f"{stem}-{index}")),
        task=task,
        n=None,
        question=str(obj["problem"]),
        answer=str(obj.get("answer", "")),
        steps=[s.strip() for s in kept],
        labels=labels,
        final_answer=None if final is None else str(final),
        solved=solved,
        source=str(obj.get("generator", "first-error")),
    )


def read_first_error(path: str | Path, task: str | None = None) -> list[Record]:
    """Every solution of a first-error file as a record; errors name ``file:line``."""
    path = Path(path)
    task = task or path.stem.split(".")[0]
    out = []
    for i, (line, obj) in enumerate(iter_json_objects(path)):
        try:
            out.append(first_error_record(obj, i, task, path.stem))
        except (RecordError, TypeError) as e:
            raise RecordError(f"{path}:{line}: {e}") from None
    return out
