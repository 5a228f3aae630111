"""Intervals by problem: the bootstrap that resamples problems, not steps, and paired differences.

Steps of one problem are not independent (one trace, one model state, often one mistake
carried along), so a resample draws *problems* with replacement and keeps all steps of a
drawn problem together. Every method is scored on the same resamples, so the difference of
two methods is taken resample by resample (a paired bootstrap): its interval reflects how
much the two methods disagree, not how much each varies.

    boot = ProblemBootstrap(y, problem_ids, n=1000, seed=0)
    boot.metric_ci(score)                        # {"auroc": (lo, hi), "aupr": ..., "fpr95": ...}
    boot.paired_diff(score_a, score_b)           # AUROC(a) - AUROC(b) and its 95% interval

Resamples are multiplicity weights (how often each problem was drawn), so the metrics are
computed once per method on weighted, pre-sorted scores for all resamples at once; with
all weights 1 they are exactly :func:`crv.classify.metrics.auroc`, ``aupr`` and ``fpr_at_95``.
A resample with no faulty or no correct step is skipped (for all methods alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

METRICS = ("auroc", "aupr", "fpr95")


def weighted_metrics(y: np.ndarray, score: np.ndarray, weights: np.ndarray, recall: float = 0.95) -> dict[str, np.ndarray]:
    """AUROC, average precision and FPR at ``recall`` of faulty steps, one value per row of ``weights [B, N]``.

    Ties are one threshold (as sklearn treats them); weights act as repeated steps.
    """
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=float)
    weights = np.atleast_2d(np.asarray(weights, dtype=float))
    order = np.argsort(-score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each tie block, best score first
    w = weights[:, order].astype(np.float32)  # multiplicities: exact in float32
    pos = np.add.reduceat(w * y[order], starts, axis=1).astype(float)  # [B, blocks]
    neg = np.add.reduceat(w * ~y[order], starts, axis=1).astype(float)
    tp, fp = np.cumsum(pos, 1), np.cumsum(neg, 1)
    P, N = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = ((neg * (tp - pos + 0.5 * pos)).sum(1, keepdims=True) / (P * N))[:, 0]
        precision = tp / np.maximum(tp + fp, 1e-300)
        aupr = ((pos * precision).sum(1, keepdims=True) / P)[:, 0]
        first = (tp >= recall * P - 1e-9 * P).argmax(1)  # first threshold reaching the recall
        fpr95 = (fp[np.arange(len(fp)), first] / N[:, 0])
    return {"auroc": auroc, "aupr": aupr, "fpr95": fpr95}


@dataclass(frozen=True)
class Difference:
    """``metric(a) - metric(b)`` on the data and its paired 95% bootstrap interval."""

    diff: float
    ci: tuple[float, float]


class ProblemBootstrap:
    """Resamples of the problems (all their steps together), shared by every method scored on them."""

    def __init__(self, y: np.ndarray, problems: np.ndarray, n: int = 1000, seed: int = 0):
        self.y = np.asarray(y).astype(int)
        codes, uniques = pd.factorize(np.asarray(problems))
        if len(codes) != len(self.y):
            raise ValueError(f"{len(self.y)} labels but {len(codes)} problem ids")
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(uniques), (n, len(uniques)))
        counts = np.stack([np.bincount(d, minlength=len(uniques)) for d in draws]) if n else np.zeros((0, len(uniques)))
        weights = counts[:, codes].astype(np.float32)  # [n, steps]: how often each step is in the resample
        pos = weights @ self.y
        keep = (pos > 0) & (pos < weights.sum(1))
        self.weights = weights[keep]
        self.n_requested, self.n_problems = n, len(uniques)

    def metrics(self, score: np.ndarray) -> dict[str, np.ndarray]:
        """Each metric on every kept resample."""
        return weighted_metrics(self.y, score, self.weights)

    def metric_ci(self, score: np.ndarray) -> dict[str, tuple[float, float]]:
        """Percentile 95% interval of AUROC, AUPR and FPR@95 over the problem resamples."""
        return {k: _percentiles(v) for k, v in self.metrics(score).items()}

    def paired_diff(self, a: np.ndarray, b: np.ndarray, metric: str = "auroc") -> Difference:
        """``metric(a) - metric(b)`` with the interval of the difference on the same resamples."""
        full = np.ones((1, len(self.y)))
        point = weighted_metrics(self.y, a, full)[metric][0] - weighted_metrics(self.y, b, full)[metric][0]
        return Difference(float(point), _percentiles(self.metrics(a)[metric] - self.metrics(b)[metric]))


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return (float("nan"), float("nan"))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))
