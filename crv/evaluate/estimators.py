"""The scikit-learn estimators the methods are built from (:data:`crv.evaluate.methods.REGISTRY`).

Every method is a ``Pipeline([("columns", Columns(...)), ("model", estimator)])`` fitted on a
training split of the step table (a DataFrame) and scoring a test split with
``predict_proba(X)[:, 1]`` (higher = more likely faulty):

- :class:`Columns` keeps a column group of the step table (as a DataFrame: names travel on);
- :class:`ColumnScore` is a score read off one column, ``offset + sign * x`` (the black-box
  confidences: nothing to learn);
- :class:`BestColumn` picks, on the training split, the column whose score has the highest AUROC
  (temperature scaling: one column per temperature);
- :class:`BestGroupProbe` picks, by grouped cross-validation on the training split, the column group
  (a hidden layer) on which a probe scores best, and fits it there. Folds are grouped by problem
  (``fit(X, y, groups=problem_ids)``) and stratified by label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.validation import check_is_fitted

from crv.classify.metrics import auroc
from crv.extract.steps import column_groups, hidden_layers


class Columns(TransformerMixin, BaseEstimator):
    """Select ``columns`` of a DataFrame (``as_numpy``: as a float array, for estimators that want one)."""

    def __init__(self, columns: Sequence[str] = (), as_numpy: bool = False):
        self.columns = columns
        self.as_numpy = as_numpy

    def fit(self, X: pd.DataFrame, y: np.ndarray | None = None) -> "Columns":
        missing = [c for c in self.columns if c not in X.columns]
        if missing:
            raise ValueError(f"the step table lacks columns {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame | np.ndarray:
        out = X[list(self.columns)]
        return out.to_numpy() if self.as_numpy else out


def _as_frame(X: pd.DataFrame | np.ndarray) -> pd.DataFrame:
    return X if isinstance(X, pd.DataFrame) else pd.DataFrame(X)


def _proba(score: np.ndarray) -> np.ndarray:
    """``[n, 2]`` from a faulty score (the second column is the score itself, as the methods report it)."""
    return np.stack([-score, score], 1)


class ColumnScore(ClassifierMixin, BaseEstimator):
    """The score ``offset + sign * X[:, 0]`` of a single column; ``fit`` learns nothing."""

    def __init__(self, sign: float = 1.0, offset: float = 0.0):
        self.sign = sign
        self.offset = offset

    def fit(self, X: pd.DataFrame | np.ndarray, y: np.ndarray) -> "ColumnScore":
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        return _proba(self.offset + self.sign * _as_frame(X).iloc[:, 0].to_numpy())


class BestColumn(ClassifierMixin, BaseEstimator):
    """The column (in the order given; the first on ties) whose ``offset + sign * x`` has the best training
    AUROC; fitted: ``column_``."""

    def __init__(self, sign: float = 1.0, offset: float = 0.0):
        self.sign = sign
        self.offset = offset

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> "BestColumn":
        X = _as_frame(X)
        self.column_ = max(X.columns, key=lambda c: auroc(y, self.offset + self.sign * X[c].to_numpy()))
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self)
        return _proba(self.offset + self.sign * _as_frame(X)[self.column_].to_numpy())


def grouped_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds grouped by ``groups`` (problems), stratified by ``y``."""
    return list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups))


class BestGroupProbe(ClassifierMixin, BaseEstimator):
    """``probe`` fitted on the column group of ``layers`` with the best mean grouped-CV AUROC on the training
    data (``folds`` folds by problem; a fold without both classes is skipped; no usable fold scores 0.5);
    fitted: ``layer_`` and ``probe_`` (refitted on all the training rows of that group).

    ``layers``: group name -> columns; ``None`` means every hidden-state group ``h<l>`` of the table.
    """

    def __init__(self, probe: BaseEstimator | None = None, layers: Mapping[str, Sequence[str]] | None = None,
                 folds: int = 3, seed: int = 0):
        self.probe = probe
        self.layers = layers
        self.folds = folds
        self.seed = seed

    def _layers(self, X: pd.DataFrame) -> Mapping[str, Sequence[str]]:
        if self.layers is not None:
            return self.layers
        groups = column_groups(X)
        return {layer: groups[layer] for layer in hidden_layers(X)}

    def fit(self, X: pd.DataFrame, y: np.ndarray, groups: np.ndarray | None = None) -> "BestGroupProbe":
        if groups is None:
            raise ValueError("BestGroupProbe.fit needs groups= (the problem of each row) for its grouped folds")
        y = np.asarray(y)
        layers = self._layers(X)
        folds = grouped_folds(y, np.asarray(groups), self.folds, self.seed)
        best, best_layer = -1.0, None
        for layer, cols in layers.items():
            Xl = X[list(cols)].to_numpy()
            vals = []
            for tr, va in folds:
                if len(np.unique(y[tr])) < 2 or len(np.unique(y[va])) < 2:
                    continue
                m = clone(self.probe).fit(Xl[tr], y[tr])
                vals.append(auroc(y[va], m.predict_proba(Xl[va])[:, 1]))
            score = float(np.mean(vals)) if vals else 0.5
            if score > best:
                best, best_layer = score, layer
        self.layer_, self.columns_ = str(best_layer), list(layers[best_layer])  # type: ignore[index]
        self.probe_ = clone(self.probe).fit(X[self.columns_].to_numpy(), y)
        self.classes_ = np.array([0, 1])
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self)
        return self.probe_.predict_proba(X[self.columns_].to_numpy())
