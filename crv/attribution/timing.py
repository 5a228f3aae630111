"""Exclusive wall time per named section (nested sections pause their parent), for profiles."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class SectionTimer:
    """``with timer("rows"): ...`` adds the seconds spent in the section, minus nested sections, to ``totals``.

    On a GPU the times are launch times unless the caller synchronises; crv's profiles are taken on the CPU.
    With ``counter`` set (a running total of floating-point operations, e.g. a
    ``torch.utils.flop_counter.FlopCounterMode``'s ``get_total_flops``), ``flops`` gets each section's
    exclusive operations the same way (benchmarks/smollm2.py's roofline).
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.flops: dict[str, int] = {}
        self.counter: Callable[[], int] | None = None
        self._stack: list[str] = []
        self._last = 0.0
        self._last_flops = 0

    def count_with(self, counter: Callable[[], int]) -> None:
        """From now on, charge the operations ``counter`` reports to the open section (see ``flops``)."""
        self.counter, self._last_flops = counter, counter()

    def _charge(self, now: float) -> None:
        flops = self.counter() if self.counter is not None else 0
        if self._stack:
            name = self._stack[-1]
            self.totals[name] = self.totals.get(name, 0.0) + now - self._last
            if self.counter is not None:
                self.flops[name] = self.flops.get(name, 0) + flops - self._last_flops
        self._last = now
        self._last_flops = flops

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._charge(time.perf_counter())
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()
