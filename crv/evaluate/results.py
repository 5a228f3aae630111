"""Typed evaluation results: one :class:`TaskEvaluation` per task inside an :class:`EvaluationResults`.

The JSON layout of ``evaluation.json`` (and of ``benchmarks/results/evaluation.json``) is the one
:meth:`EvaluationResults.to_dict` writes: run-level entries (``settings``, ``skipped``, ``transfer``,
``transfer_trained_on_both`` and the extras a caller adds, e.g. ``model``, ``seeds``) beside one
section per task. :meth:`EvaluationResults.from_dict` is the one place that tells them apart.
What is not written (the raw scores behind the curves, the folds) stays on the objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

#: run-level keys of an evaluation file (everything else holding ``methods`` is a task)
RUN_KEYS = ("settings", "skipped", "transfer", "transfer_trained_on_both")


@dataclass
class Curves:
    """The held-out labels, every method's scores and each step's problem (for ROC / PR curves; not written)."""

    y: np.ndarray
    scores: dict[str, np.ndarray]
    problems: np.ndarray


@dataclass
class TaskEvaluation:
    """One task's figures (the JSON section of the task) plus its curves.

    ``methods``: per method ``auroc``, ``aupr``, ``fpr95`` and their ``*_ci``; ``paired_vs_crv``: per method
    ``auroc_diff`` and ``ci``; ``per_n``: per difficulty the steps, faulty steps and each method's AUROC;
    ``first_error``: per method ProcessBench's first-error accuracies and F1 (out of fold only).
    """

    n_steps: int = 0
    n_faulty: int = 0
    n_problems: int | None = None
    n_test_steps: int = 0
    n_test_faulty: int = 0
    scoring: str | None = None
    folds: int | None = None
    ci_method: str | None = None
    n_boot: int | None = None
    methods: dict[str, dict] = field(default_factory=dict)
    paired_vs_crv: dict[str, dict] = field(default_factory=dict)
    crv_plus_confidence_vs_best_confidence: dict | None = None
    per_n: dict[str, dict] = field(default_factory=dict)
    ablation_auroc: dict[str, float] = field(default_factory=dict)
    first_error: dict[str, dict] | None = None
    chosen_on_train: dict = field(default_factory=dict)
    ms_per_step: dict[str, float] = field(default_factory=dict)
    curves: Curves | None = None

    def to_dict(self) -> dict:
        """The task's JSON section (everything but the curves)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "curves"}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskEvaluation":
        names = {f.name for f in fields(cls)} - {"curves"}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class EvaluationResults:
    """Every task's evaluation, the cross-task transfer and the run's settings; ``extra``: what callers add
    (``step_target``, ``model``, ``seeds``, ``files``, ``markdown``, ``command``), written after the rest."""

    settings: dict
    tasks: dict[str, TaskEvaluation] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    transfer: dict[str, float] = field(default_factory=dict)
    transfer_trained_on_both: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The file layout: settings, skipped, one section per task, transfer, then the extras."""
        return {"settings": self.settings, "skipped": self.skipped, **{t: r.to_dict() for t, r in self.tasks.items()},
                "transfer": self.transfer, "transfer_trained_on_both": self.transfer_trained_on_both, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "EvaluationResults":
        """Read a file written by :meth:`to_dict` (a task is a section that holds ``methods``)."""
        tasks = {k: TaskEvaluation.from_dict(v) for k, v in d.items()
                 if k not in RUN_KEYS and isinstance(v, dict) and "methods" in v}
        extra = {k: v for k, v in d.items() if k not in RUN_KEYS and k not in tasks}
        return cls(settings=d.get("settings", {}), tasks=tasks, skipped=d.get("skipped", {}),
                   transfer=d.get("transfer", {}), transfer_trained_on_both=d.get("transfer_trained_on_both", {}),
                   extra=extra)
