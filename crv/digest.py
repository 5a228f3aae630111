"""Content identity of weight files: the sha256 of their bytes, computed once and kept beside them.

A model or transcoder set is named in store keys, graph metadata and classifier metadata by an
identity that must change whenever its weights do (two checkpoints with the same names and sizes
are not the same model). Hashing gigabytes on every load is too slow, so each folder keeps a
manifest ``.crv-digests.json``: per file its size, modification time (ns) and sha256. A file
whose size and mtime match its entry reuses the stored digest; any other is hashed again and the
entry rewritten (atomically; a read-only folder keeps the digest in this process only). crv
calls :func:`record_digest` right after it writes weights, so its own files are never hashed twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = ".crv-digests.json"
_memory: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256, for read-only folders


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(folder: Path, entries: dict) -> None:
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, folder / MANIFEST)
    except OSError:  # read-only folder: the in-process cache serves
        tmp.unlink(missing_ok=True)


def file_digest(path: str | Path) -> str:
    """The sha256 of ``path``, from the folder's manifest when its size and mtime are unchanged, else hashed."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _memory:
        return _memory[key]
    entries = _read_manifest(path.parent)
    entry = entries.get(path.name)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns and entry.get("sha256"):
        digest = str(entry["sha256"])
    else:
        digest = sha256_file(path)
        entries[path.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        _write_manifest(path.parent, entries)
    _memory[key] = digest
    return digest


def record_digest(*paths: str | Path) -> None:
    """Hash freshly written files now and store their digests (what crv calls after writing weights)."""
    for p in paths:
        file_digest(p)


def content_identity(paths: list[Path], extra: bytes = b"") -> str:
    """Identity (16 hex digits) of a set of weight files: ``extra`` (config bytes) and each file's name and sha256."""
    h = hashlib.sha256(extra)
    for p in paths:
        h.update(f"{p.name}:{file_digest(p)}\n".encode())
    return h.hexdigest()[:16]
