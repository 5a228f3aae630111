"""Readers of datasets other than crv's own JSONL, by format name (``crv import-dataset --format``).

==============  ==================================================  ==============================
format          layout                                              reader
==============  ==================================================  ==============================
``crv-release``  the CRV paper's annotated files (facebook/crv)      :mod:`crv.tasks.crv_release`
``first-error``  one solution per object, index of the first wrong  :mod:`crv.tasks.first_error`
                 step (ProcessBench)
==============  ==================================================  ==============================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from crv.tasks.crv_release import read_crv_release
from crv.tasks.first_error import read_first_error
from crv.tasks.schema import Record

DATASET_FORMATS: dict[str, Callable[..., list[Record]]] = {
    "crv-release": read_crv_release,
    "first-error": read_first_error,
}


def read_dataset(path: str | Path, format: str, task: str | None = None) -> list[Record]:
    """Records of a dataset file in ``format`` (task name: ``task``, else from the file)."""
    if format not in DATASET_FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; choose from {', '.join(DATASET_FORMATS)}")
    return DATASET_FORMATS[format](path, task=task)
