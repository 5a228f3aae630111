"""Per-difficulty summary of labelled traces (step accuracy, first-error rate, ...)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Iterable

from crv.tasks.schema import Record


@dataclass(frozen=True)
class TraceStats:
    """How a set of traces went. Step counts are after strict truncation."""

    traces: int
    steps: int
    step_accuracy: float  # correct steps / steps
    first_error_rate: float  # traces with a faulty step / traces
    final_accuracy: float  # traces whose final answer is right / traces

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: Iterable[Record]) -> TraceStats:
    """Summary of a group of records."""
    records = list(records)
    steps = sum(len(r.labels) for r in records)
    correct = sum(sum(r.labels) for r in records)
    faulty_traces = sum(1 for r in records if 0 in r.labels)
    n = max(1, len(records))
    return TraceStats(
        traces=len(records),
        steps=steps,
        step_accuracy=correct / steps if steps else 0.0,
        first_error_rate=faulty_traces / n,
        final_accuracy=sum(r.solved for r in records) / n,
    )


def summarize_by(records: Iterable[Record]) -> dict[str, dict[str, TraceStats]]:
    """``{task: {n: stats}}`` with n as a string key (``"?"`` when unknown)."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.task, "?" if r.n is None else str(r.n))].append(r)
    out: dict[str, dict[str, TraceStats]] = defaultdict(dict)
    for (task, n), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], int(kv[0][1]) if kv[0][1].isdigit() else 0)):
        out[task][n] = summarize(rs)
    return dict(out)


def format_table(summary: dict[str, dict[str, TraceStats]]) -> str:
    """A markdown table of a :func:`summarize_by` result."""
    lines = [
        "| task | n | traces | steps | step accuracy | first-error rate | final accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, by_n in summary.items():
        for n, s in by_n.items():
            lines.append(
                f"| {task} | {n} | {s.traces} | {s.steps} | {s.step_accuracy:.3f} | {s.first_error_rate:.3f} | {s.final_accuracy:.3f} |"
            )
    return "\n".join(lines)
