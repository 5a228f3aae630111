"""First-error localisation, in ProcessBench's convention.

Per trace, a method's predicted first faulty step is the first step whose score reaches the threshold
``tau`` (none: the trace is predicted error-free). Against the labelled first faulty step (none for an
error-free trace): ``acc_erroneous`` is the share of traces with an error whose first error is found exactly,
``acc_correct`` the share of error-free traces predicted error-free, and ``f1`` their harmonic mean
(ProcessBench, Zheng et al. 2024). ``tau`` is chosen inside the training folds: for each test fold, the
threshold that maximises F1 on the other folds' (out-of-fold) scores, so no trace's threshold saw it.
Intervals: percentile bootstrap over problems.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Trace:
    """One trace's step scores (in step order) and its first faulty step (None: error-free)."""

    problem_id: str
    scores: np.ndarray
    first_error: int | None


def traces_of(steps: pd.DataFrame, score: np.ndarray) -> list[Trace]:
    """Traces from step rows (``problem_id``, ``step_index``, ``faulty``) and one score per row."""
    df = steps[["problem_id", "step_index", "faulty"]].assign(score=np.asarray(score, dtype=float))
    out = []
    for pid, part in df.sort_values(["problem_id", "step_index"], kind="stable").groupby("problem_id", sort=False):
        bad = part["faulty"].to_numpy().nonzero()[0]
        out.append(Trace(str(pid), part["score"].to_numpy(), int(bad[0]) if len(bad) else None))
    return out


def predicted_first_error(scores: np.ndarray, tau: float) -> int | None:
    hit = np.nonzero(scores >= tau)[0]
    return int(hit[0]) if len(hit) else None


def _hits(traces: Sequence[Trace], tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Per trace: has an error, and the prediction is exactly right."""
    err = np.array([t.first_error is not None for t in traces])
    ok = np.array([predicted_first_error(t.scores, tau) == t.first_error for t in traces])
    return err, ok


def f1_of(err: np.ndarray, ok: np.ndarray) -> tuple[float, float, float]:
    a_e = float(ok[err].mean()) if err.any() else float("nan")
    a_c = float(ok[~err].mean()) if (~err).any() else float("nan")
    f1 = 2 * a_e * a_c / (a_e + a_c) if a_e + a_c > 0 else 0.0
    return a_e, a_c, f1


def best_threshold(traces: Sequence[Trace], grid: int = 64) -> float:
    """The threshold with the highest F1 on ``traces``: among midpoints between quantiles of the steps' scores,
    the middle one of those that reach the best F1 (a margin on both sides, not the edge of a tie)."""
    allscores = np.concatenate([t.scores for t in traces]) if traces else np.zeros(1)
    q = np.unique(np.quantile(allscores, np.linspace(0, 1, grid)))
    cands = np.unique(np.r_[q[:1], (q[1:] + q[:-1]) / 2, q[-1:] + 1e-9])
    f1s = np.array([f1_of(*_hits(traces, tau))[2] for tau in cands])
    best = cands[np.isclose(f1s, f1s.max())]
    return float(best[len(best) // 2])


def first_error_localisation(traces: Sequence[Trace], fold_of: dict[str, int], n_boot: int = 1000, seed: int = 0) -> dict:
    """Cross-fitted first-error accuracy and F1 with a problem-bootstrap interval of F1 (see the module docstring)."""
    folds = sorted({fold_of[t.problem_id] for t in traces})
    err = np.zeros(len(traces), dtype=bool)
    ok = np.zeros(len(traces), dtype=bool)
    taus = []
    for f in folds:
        test = [i for i, t in enumerate(traces) if fold_of[t.problem_id] == f]
        train = [t for t in traces if fold_of[t.problem_id] != f]
        tau = best_threshold(train)
        taus.append(tau)
        e, o = _hits([traces[i] for i in test], tau)
        err[test], ok[test] = e, o
    a_e, a_c, f1 = f1_of(err, ok)
    codes, uniq = pd.factorize(np.array([t.problem_id for t in traces]))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        pick = np.bincount(rng.integers(len(uniq), size=len(uniq)), minlength=len(uniq))[codes]
        idx = np.repeat(np.arange(len(traces)), pick)
        if err[idx].any() and (~err[idx]).any():
            boots.append(f1_of(err[idx], ok[idx])[2])
    ci = [round(float(np.percentile(boots, 2.5)), 4), round(float(np.percentile(boots, 97.5)), 4)] if boots else None
    return {"acc_erroneous": round(a_e, 4), "acc_correct": round(a_c, 4), "f1": round(f1, 4), "f1_ci": ci,
            "traces_erroneous": int(err.sum()), "traces_correct": int((~err).sum()),
            "thresholds": [round(t, 4) for t in taus]}
