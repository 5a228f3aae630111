"""Which fingerprint features carry CRV's signal: out-of-fold permutation importance with intervals by problem.

For each fold of the grouped cross-fit (folds by problem, as the evaluation's), the CRV classifier is
fitted on the training problems; the held-out steps are scored as they are and with one fingerprint
column permuted among them (``repeats`` permutations, scores averaged). Pooling the held-out scores
gives, per column ``c``, the out-of-fold AUROC with ``c`` intact and with ``c`` scrambled, and

    importance(c) = AUROC(intact) - AUROC(c permuted)

(points of AUROC lost when the classifier cannot read ``c``), with the 95% interval of that paired
difference over resamples of the problems (:class:`~crv.evaluate.intervals.ProblemBootstrap`). Correlated
columns share their signal, so a column whose twin remains readable can show little importance:
groups are scored too (:func:`crv.fingerprint.features.feature_group`: size, logits, activation,
influence, layers, degree, ...), by permuting a whole group's columns together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from crv.classify.model import StepClassifier
from crv.evaluate.estimators import grouped_folds
from crv.evaluate.intervals import ProblemBootstrap
from crv.fingerprint.features import feature_group


@dataclass(frozen=True)
class Importance:
    """Points of out-of-fold AUROC lost when ``columns`` are permuted, with the problem-bootstrap interval."""

    name: str
    columns: tuple[str, ...]
    auroc_drop: float
    ci: tuple[float, float]

    def to_dict(self) -> dict:
        return {"auroc_drop": self.auroc_drop, "ci": list(self.ci), "columns": len(self.columns)}


def permutation_importance(
    table: pd.DataFrame,
    columns: list[str],
    *,
    target: str = "faulty",
    group: str = "problem_id",
    folds: int = 5,
    repeats: int = 3,
    n_boot: int = 300,
    seed: int = 0,
    classifier: StepClassifier | None = None,
) -> tuple[list[Importance], list[Importance], float]:
    """Per column and per group of columns (see the module docstring), most important first, and the intact
    out-of-fold AUROC (points)."""
    y = table[target].to_numpy().astype(int)
    groups = table[group].to_numpy()
    X = table[columns]
    groups_of: dict[str, list[str]] = {}  # group name -> its columns
    for c in columns:
        groups_of.setdefault(feature_group(c), []).append(c)
    units = {**{c: [c] for c in columns}, **{f"group:{f}": cs for f, cs in groups_of.items() if len(cs) > 1}}
    base = np.zeros(len(y))
    permuted = {name: np.zeros(len(y)) for name in units}
    rng = np.random.default_rng(seed)
    for train, test in grouped_folds(y, groups, folds, seed):
        model = clone(classifier or StepClassifier()).fit(X.iloc[train], y[train])
        Xt = X.iloc[test]
        base[test] = model.predict_proba(Xt)[:, 1]
        for name, cols in units.items():
            acc = np.zeros(len(test))
            for _ in range(repeats):
                Xp = Xt.copy()
                order = rng.permutation(len(test))
                Xp[cols] = Xt[cols].to_numpy()[order]  # a group's columns move together (rows stay consistent)
                acc += model.predict_proba(Xp)[:, 1]
            permuted[name][test] = acc / repeats
    boot = ProblemBootstrap(y, groups, n=n_boot, seed=seed)
    out = []
    for name, cols in units.items():
        d = boot.paired_diff(base, permuted[name])
        out.append(Importance(name, tuple(cols), 100 * d.diff, (100 * d.ci[0], 100 * d.ci[1])))
    out.sort(key=lambda i: -i.auroc_drop)
    singles = [i for i in out if not i.name.startswith("group:")]
    return singles, [i for i in out if i.name.startswith("group:")], 100 * float(roc_auc_score(y, base))
