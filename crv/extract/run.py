"""Building a dataset's step table: resumable, on any executor."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from crv.attribution.attributor import Attributor

from crv.extract.archive import FingerprintArchive
from crv.extract.executors import Executor, ExtractSpec, LocalExecutor, compute_entry
from crv.extract.store import Entry, TraceStore, trace_key
from crv.tasks.schema import Record

#: bump when the step rows change meaning (old store entries then stop matching)
ROWS_VERSION = 1


def extraction_settings(att: Attributor, spec: ExtractSpec) -> dict:
    """Everything besides the trace that determines its entry (part of every store key)."""
    return {"model": att.model_id, "prompt_format": att.prompt_format, "transcoders": att.transcoders.checksum(), "attribution": dataclasses.asdict(att.config),
            "target": spec.target, "extra_targets": list(spec.extra_targets), "rows_version": ROWS_VERSION}


def trace_keys(att: Attributor, records: Iterable[Record], target: str = "last",
               extra_targets: tuple[str, ...] = ()) -> list[str]:
    """Store keys of the records with steps (in order), under ``att``'s settings and these step targets."""
    settings = extraction_settings(att, ExtractSpec(target, tuple(extra_targets)))
    return [trace_key(settings, r) for r in records if r.steps]


def build_step_table(att: Attributor, records: Iterable[Record], graph_dir: str | Path | None = None,
                     progress: bool = True, target: str = "last", extra_targets: tuple[str, ...] = (),
                     executor: Executor | None = None,
                     archive: str | Path | FingerprintArchive | None = None) -> pd.DataFrame:
    """The step table of a labelled dataset (columns: :mod:`crv.extract.steps`), in record order; its
    ``attrs["settings"]`` are :func:`extraction_settings` (model, prompt format, transcoders, attribution, target).

    With ``graph_dir`` each trace's rows and pruned graphs are stored there as soon as they are
    computed (:class:`~crv.extract.store.TraceStore`), and traces already stored with the same
    settings are not computed again, so an interrupted run resumes where it stopped.
    With ``archive`` (:mod:`crv.extract.archive`), traces it holds get their fingerprints from it and
    only their forward pass is run (in this process); graphs are computed for the others only.
    """
    records = [r for r in records if r.steps]
    if not records:
        raise ValueError("no steps to evaluate")
    spec = ExtractSpec(target, tuple(extra_targets))
    executor = executor or LocalExecutor(progress=progress)
    store = TraceStore(graph_dir) if graph_dir is not None else None
    settings = extraction_settings(att, spec)
    keys = [trace_key(settings, r) for r in records]
    entries: dict[int, Entry] = {}
    if store is not None:
        for i, k in enumerate(keys):
            e = store.get(k, graphs=False)
            if e is not None:
                entries[i] = e
    todo = [i for i in range(len(records)) if i not in entries]
    if archive is not None and not isinstance(archive, FingerprintArchive):
        archive = FingerprintArchive(archive)
    archived = [i for i in todo if archive is not None and keys[i] in archive]

    def on_result(i: int, entry: Entry) -> None:
        entries[i] = entry
        if store is not None:
            store.put(keys[i], entry, {"problem_id": records[i].problem_id, "task": records[i].task})

    try:
        for i in tqdm(archived, desc="archived traces", unit="trace", disable=not progress or not archived):
            on_result(i, compute_entry(att, records[i], spec, archive.get(keys[i], len(records[i].steps))))  # type: ignore[union-attr]
        todo = [i for i in todo if i not in entries]
        if todo:
            executor.run(att, spec, records, todo, on_result)
    finally:
        if store is not None:
            store.record_run(settings, len(records), sum(1 for i in todo if i in entries))
    table = pd.concat([entries[i].rows for i in range(len(records))], ignore_index=True)
    table.attrs["settings"] = settings  # what produced the table (kept in its parquet file): `crv train-verifier` reads it
    return table


def archive_fingerprints(att: Attributor, records: Iterable[Record], graph_dir: str | Path,
                         archive: str | Path | FingerprintArchive, target: str = "last",
                         extra_targets: tuple[str, ...] = ()) -> tuple[int, int]:
    """Add the fingerprints of the traces of ``records`` stored in ``graph_dir`` (under these settings) to
    ``archive``; returns (traces of ``records`` the archive now holds, traces with steps).

    Traces not (yet) in the store are left out, so an unfinished build can be archived and later resumed.
    """
    archive = archive if isinstance(archive, FingerprintArchive) else FingerprintArchive(archive)
    store = TraceStore(graph_dir)
    keys = trace_keys(att, records, target, extra_targets)
    rows = {}
    for k in keys:
        if k not in archive and (e := store.get(k, graphs=False)) is not None:
            rows[k] = e.rows
    archive.add(rows)
    return sum(1 for k in keys if k in archive), len(keys)
