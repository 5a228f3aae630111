"""Step-verification metrics, faulty steps being the positive class (scores: higher = more likely faulty)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(y, score))


def aupr(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision of the faulty (positive) class."""
    return float(average_precision_score(y, score))


def fpr_at_95(y: np.ndarray, score: np.ndarray, recall: float = 0.95) -> float:
    """False-positive rate on correct steps at the first threshold that catches ``recall`` of the faulty ones."""
    fpr, tpr, _ = roc_curve(y, score, drop_intermediate=False)  # every threshold: the first one reaching the recall
    return float(fpr[np.searchsorted(tpr, recall, side="left")])


@dataclass
class Scores:
    """AUROC / AUPR / FPR@95 with a bootstrap 95% interval for AUROC."""

    auroc: float
    aupr: float
    fpr95: float
    auroc_ci: tuple[float, float]

    def as_dict(self) -> dict:
        return {"auroc": self.auroc, "aupr": self.aupr, "fpr95": self.fpr95, "auroc_ci": list(self.auroc_ci)}


def bootstrap_ci(y: np.ndarray, score: np.ndarray, metric=auroc, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of ``metric`` over resamples of the steps (resamples with one class skipped)."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        vals.append(metric(y[idx], score[idx]))
    if not vals:
        return (float("nan"), float("nan"))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def evaluate_scores(y: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Scores:
    """All reported metrics of one method on one test set."""
    y, score = np.asarray(y).astype(int), np.asarray(score, dtype=float)
    if y.min() == y.max():
        raise ValueError("the test set needs both correct and faulty steps")
    return Scores(auroc(y, score), aupr(y, score), fpr_at_95(y, score), bootstrap_ci(y, score, n=n_boot, seed=seed))
