"""JSON objects of a dataset file with the line each starts on: a JSON array or JSON Lines.

Readers of other people's datasets use :func:`iter_json_objects` so that every error they
raise names ``file:line``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from crv.tasks.schema import RecordError


def iter_json_objects(path: str | Path) -> Iterator[tuple[int, object]]:
    """``(line, value)`` for each element of a top-level JSON array, or each line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such dataset file: {path}")
    text = path.read_text(encoding="utf-8")
    body = text.lstrip()
    if not body.startswith("["):
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        return
    decoder = json.JSONDecoder()
    i = text.index("[") + 1

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip(i)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield line_of(i), value
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            return
        raise RecordError(f"{path}:{line_of(i)}: expected ',' or ']' after an element of the top-level array")
