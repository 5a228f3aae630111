"""Resumable, append-only storage of per-trace extraction results (step rows and pruned graphs).

One entry per trace, keyed by a content hash of everything that determines it: the model,
the transcoders, the attribution settings, the step targets and the trace itself. An entry is
three files under ``<root>/<key[:2]>/``::

    <key>.parquet                     the trace's step rows (fingerprints, baselines' inputs)
    <key>.graphs.safetensors / .json  the pruned graphs of its steps (one set per step target)
    <key>.json                        the commit marker: SHA-256 of the files above, problem id, settings

Each file is written to a temporary name and renamed into place, the marker last, so an
entry is either complete or absent: a run killed at any point leaves nothing that later reads
as valid. On read the checksums are verified; a corrupted entry is reported as missing (and
recomputed by the caller). ``manifest.json`` records the settings and library versions of the
runs that wrote to the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import platform
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pandas as pd

from crv.digest import sha256_file
from crv.fingerprint.summary import GraphSummary, load_summaries, save_summaries
from crv.tasks.schema import Record


def _alive(pid: int) -> bool:
    """True if a process ``pid`` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def trace_key(settings: dict, record: Record) -> str:
    """Content hash of (settings, trace): model, transcoders, attribution settings, targets, the record's text and labels."""
    content = {"settings": settings, "problem_id": record.problem_id, "task": record.task, "n": record.n,
               "question": record.question, "steps": record.steps, "labels": record.labels}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


@dataclass
class Entry:
    """A stored trace: its step rows and, per step target, its steps' pruned graphs."""

    rows: pd.DataFrame
    summaries: dict[str, list[GraphSummary]]


class TraceStore:
    """Per-trace results under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._remove_stale_temp_files()

    def _remove_stale_temp_files(self) -> None:
        """Temp files of writers that died (``.<name>.<pid>.tmp*`` whose process is gone) are removed on open."""
        if not self.root.is_dir():
            return
        for p in self.root.glob("??/.*.tmp*"):
            m = re.search(r"\.(\d+)\.tmp", p.name)
            if m and not _alive(int(m.group(1))):
                p.unlink(missing_ok=True)

    def _base(self, key: str) -> Path:
        return self.root / key[:2] / key

    def has(self, key: str) -> bool:
        """True if a complete, uncorrupted entry exists."""
        return self._verified(key) is not None

    def _verified(self, key: str) -> dict | None:
        base = self._base(key)
        marker = base.with_name(base.name + ".json")
        if not marker.is_file():
            return None
        try:
            meta = json.loads(marker.read_text())
            for name, digest in meta["sha256"].items():
                if sha256_file(base.with_name(f"{base.name}.{name}")) != digest:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return meta

    def get(self, key: str, graphs: bool = True) -> Entry | None:
        """The entry, or None if it is absent or fails its checksums (``graphs=False``: its rows only, no graphs read)."""
        meta = self._verified(key)
        if meta is None:
            return None
        base = self._base(key)
        try:
            rows = pd.read_parquet(base.with_name(base.name + ".parquet"))
            if not graphs:
                return Entry(rows, {})
            flat = load_summaries(base.with_name(base.name + ".graphs")) if "graphs.json" in meta["sha256"] else []
        except Exception:  # a file that passed its checksum but does not parse: treat as missing
            return None
        summaries: dict[str, list[GraphSummary]] = {}
        for target, n in meta["summaries"].items():
            summaries[target], flat = flat[:n], flat[n:]
        return Entry(rows, summaries)

    def put(self, key: str, entry: Entry, info: dict | None = None) -> None:
        """Write an entry atomically (data files first, the marker last)."""
        base = self._base(key)
        base.parent.mkdir(parents=True, exist_ok=True)
        tmp = base.with_name(f".{base.name}.{os.getpid()}.tmp")
        entry.rows.to_parquet(tmp, index=False)
        os.replace(tmp, base.with_name(base.name + ".parquet"))
        names = ["parquet"]
        flat = [s for target in entry.summaries for s in entry.summaries[target]]
        if flat:
            save_summaries(flat, tmp)  # tmp.safetensors, tmp.json
            for ext in ("safetensors", "json"):
                os.replace(tmp.with_name(f"{tmp.name}.{ext}"), base.with_name(f"{base.name}.graphs.{ext}"))
            names += ["graphs.safetensors", "graphs.json"]
        digests = {n: sha256_file(base.with_name(f"{base.name}.{n}")) for n in names}
        meta = {"key": key, "sha256": digests, "summaries": {t: len(v) for t, v in entry.summaries.items()},
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(info or {})}
        _atomic_write_text(base.with_name(base.name + ".json"), json.dumps(meta, indent=1))

    def keys(self) -> list[str]:
        """Keys of the committed entries (checksums not verified)."""
        return sorted(p.name[: -len(".json")] for p in self.root.glob("??/*.json")
                      if not p.name.endswith(".graphs.json") and not p.name.startswith("."))  # temp files are not entries

    def record_run(self, settings: dict, n_traces: int, computed: int) -> None:
        """Append this run to ``manifest.json`` (settings, versions, counts)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "manifest.json"
        versions = {p: version(p) for p in ("crv", "torch", "transformers", "networkx", "xgboost-cpu") if _installed(p)}
        run = {"settings": settings, "versions": {**versions, "python": platform.python_version()},
               "traces": n_traces, "computed": computed, "reused": n_traces - computed,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(self.root / "manifest.lock", "a") as lock:  # processes sharing the store append in turn
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                manifest = json.loads(path.read_text()) if path.is_file() else {"runs": []}
            except ValueError:
                manifest = {"runs": []}
            manifest["runs"].append(run)
            _atomic_write_text(path, json.dumps(manifest, indent=1))


def _installed(dist: str) -> bool:
    try:
        version(dist)
        return True
    except Exception:
        return False
