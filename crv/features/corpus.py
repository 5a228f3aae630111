"""The corpus feature descriptions are read from: token sequences of the model's own task traces."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crv.attribution.attributor import Attributor
from crv.tasks.schema import Record


@dataclass(frozen=True)
class Corpus:
    """Token sequences, flat: sequence ``i`` is ``tokens[offsets[i]:offsets[i + 1]]`` (as the model reads it)."""

    tokens: torch.Tensor  # [N] int64
    offsets: torch.Tensor  # [S + 1] int64
    source: str

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, i: int) -> torch.Tensor:
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    @classmethod
    def from_sequences(cls, seqs: Sequence[Sequence[int]], source: str) -> "Corpus":
        if not seqs:
            raise ValueError("an empty corpus describes nothing: give at least one trace")
        lengths = torch.tensor([len(s) for s in seqs])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        return cls(torch.tensor([t for s in seqs for t in s], dtype=torch.long), offsets, source)


def corpus_from_records(att: Attributor, records: Sequence[Record], source: str) -> Corpus:
    """The records as ``att`` reads them (its prompt format, lead token included)."""
    return Corpus.from_sequences([att.encode_record(r).ids.tolist() for r in records], source)


def own_traces(att: Attributor, tasks: Sequence[str], ns: Sequence[int], per_cell: int, seed: int,
               progress: bool = True) -> list[Record]:
    """The model's own greedy traces on fresh problems (``per_cell`` per task and n), labelled by crv's checker."""
    from crv.reasoner.generate import generate_records
    from crv.tasks.cot import generate_problems

    problems = [p for t in tasks for n in ns for p in generate_problems(t, n, per_cell, seed=seed)]  # type: ignore[arg-type]
    return generate_records(att.model, att.encoder, problems, progress=progress)
