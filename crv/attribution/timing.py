"""Exclusive wall time per named section (nested sections pause their parent), for profiles."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class SectionTimer:
    """``with timer("rows"): ...`` adds the seconds spent in the section, minus nested sections, to ``totals``.

    On a GPU the times are launch times unless the caller synchronises; crv's profiles are taken on the CPU.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._stack: list[str] = []
        self._last = 0.0

    def _charge(self, now: float) -> None:
        if self._stack:
            name = self._stack[-1]
            self.totals[name] = self.totals.get(name, 0.0) + now - self._last
        self._last = now

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._charge(time.perf_counter())
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()
