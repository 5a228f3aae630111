"""Fingerprint archives: the graph-derived part of a step table, small enough to keep where graphs are not.

Almost all the cost of a step table is its attribution graphs; every other column (black-box
scores, transcoder statistics, hidden states) comes from one forward pass per trace. An archive
keeps, per trace (by its store key, :func:`~crv.extract.store.trace_key`), the fingerprint
columns of each of its steps at every step target: a few kilobytes per trace, so a dataset's
archive can be committed or shipped while the graph store stays on the machine that built it.

    archive_fingerprints(att, records, "graphs/run", "data/run-fingerprints.parquet")  # store -> archive (crv.extract)
    build_step_table(att, records, "graphs/new", archive="data/run-fingerprints.parquet")

:func:`~crv.extract.build_step_table` given an archive computes graphs only for the traces the
archive lacks; the others get their fingerprints from it and the rest of their row from their
forward pass, and are stored (without graphs) like any computed trace. Keys carry the model,
transcoders, attribution settings and step targets, so an archive made with other settings
simply does not match (those traces are computed), never mixes in.

The file is one parquet table: ``trace_key``, ``step_index``, then the fingerprint columns
(unprefixed for the main target, ``"<target>:<name>"`` for the others, as in the step table).
Writers merge into it under a file lock and replace it atomically, so builders sharing a store
may archive concurrently and a killed writer leaves the previous file intact.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pandas as pd

from crv.extract.steps import column_groups

INDEX = ["trace_key", "step_index"]


def fingerprint_columns(rows: pd.DataFrame) -> list[str]:
    """The fingerprint columns of step rows, main target first, in table order."""
    groups = column_groups(rows)
    return groups["fingerprint"] + [c for g, cols in groups.items() if g.startswith("fingerprint:") for c in cols]


class FingerprintArchive:
    """Fingerprint rows by trace key (see the module docstring); read from ``path`` (empty if absent)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.columns: list[str] = []
        self._by_key: dict[str, list[dict]] = {}
        self._load()

    def _load(self) -> None:
        self.columns, self._by_key = [], {}
        if self.path.is_file():
            table = pd.read_parquet(self.path)
            missing = [c for c in INDEX if c not in table.columns]
            if missing:
                raise ValueError(f"{self.path} is not a fingerprint archive: it has no {missing} column(s)")
            table = table.sort_values(INDEX, kind="stable")
            self.columns = [c for c in table.columns if c not in INDEX]
            for key, part in table.groupby("trace_key", sort=False):
                self._by_key[str(key)] = part[self.columns].to_dict("records")

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def keys(self) -> list[str]:
        return list(self._by_key)

    def get(self, key: str, n_steps: int) -> list[dict] | None:
        """The fingerprint columns of each step of trace ``key`` (in step order), or None if not archived.

        An archived trace with another number of steps is an error: its key says it is the same trace.
        """
        rows = self._by_key.get(key)
        if rows is None:
            return None
        if len(rows) != n_steps:
            raise ValueError(f"{self.path}: trace {key[:12]} has {len(rows)} archived steps, the record {n_steps}; "
                             "the archive is damaged: rebuild it from the graph store")
        return rows

    def add(self, rows_by_key: dict[str, pd.DataFrame]) -> int:
        """Merge the fingerprint columns of these traces' step rows into the file (keys already there are kept
        as they are); returns how many traces were added. Safe against concurrent writers (file lock) and kills
        (atomic replace)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._load()  # with what other writers added meanwhile
            new = []
            for key, rows in rows_by_key.items():
                if key in self._by_key:
                    continue
                cols = fingerprint_columns(rows)
                if self.columns and cols != self.columns:
                    raise ValueError(f"{self.path} holds other fingerprint columns (other step targets?): "
                                     "keep one archive per extraction setting")
                self.columns = cols
                part = rows[["step_index"] + cols].copy()
                part.insert(0, "trace_key", key)
                new.append(part)
                self._by_key[key] = part.drop(columns=INDEX).to_dict("records")
            if new:
                old = [pd.read_parquet(self.path)] if self.path.is_file() else []
                tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
                pd.concat(old + new, ignore_index=True).to_parquet(tmp, index=False, compression="zstd")
                os.replace(tmp, self.path)
        return len(new)
