"""Case-control selection of traces, for a task whose model rarely errs.

A model that gets 98% of its boolean steps right needs ~8,000 steps for 150 faulty ones, and on a real model every
step costs a graph. Generating the problems is cheap (one greedy pass each), so crv generates many, keeps every
trace with an error (the cases) and ``ratio`` times as many error-free traces (the controls), the first ones in
problem order (deterministic: every shard and every session selects the same traces).

What it changes: the share of faulty steps and the mix of correct steps (more of them come from traces that later
err). What it keeps: each kept trace's steps exactly as generated and labelled; per-class rates (first-error
accuracy on erroneous and on error-free traces, hence their harmonic mean) estimate the same quantities as on all
traces; a step-level AUROC compares faulty steps to this mix of correct steps, so it is reported with the design.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from crv.tasks.schema import Record


@dataclass(frozen=True)
class CaseControl:
    """What a selection kept: ``generated`` traces with steps, of which ``with_error`` erred; all of those and
    ``kept_clean`` of the ``clean`` error-free ones were kept (``ratio`` = controls per case asked for)."""

    ratio: float
    generated: int
    with_error: int
    clean: int
    kept_clean: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def case_control(records: Sequence[Record], ratio: float) -> tuple[list[Record], CaseControl]:
    """Every record with a faulty step and, per n, the first ``round(ratio * cases at that n)`` error-free ones,
    in input order (so the mix of n among the controls follows the cases').

    Records without steps are dropped (they carry no step to score). ``ratio`` must be positive; the selection
    is a prefix of each n's error-free records, so a larger ``ratio`` keeps a superset.
    """
    if ratio <= 0:
        raise ValueError(f"case-control ratio must be positive (controls per case), not {ratio}")
    with_steps = [r for r in records if r.steps]
    keep: set[int] = set()
    clean_total = 0
    for n in dict.fromkeys(r.n for r in with_steps):
        group = [r for r in with_steps if r.n == n]
        cases = [r for r in group if 0 in r.labels]
        clean = [r for r in group if 0 not in r.labels]
        clean_total += len(clean)
        keep |= {id(r) for r in cases} | {id(r) for r in clean[: round(ratio * len(cases))]}
    kept = [r for r in with_steps if id(r) in keep]
    with_error = sum(0 in r.labels for r in with_steps)
    info = CaseControl(ratio=ratio, generated=len(with_steps), with_error=with_error, clean=clean_total,
                       kept_clean=len(kept) - with_error)
    return kept, info
