"""The step classifier: gradient-boosted trees on fingerprints, faulty = positive class.

    clf = StepClassifier().fit(X_train, y_train)          # X: DataFrame of named features
    p_faulty = clf.predict_proba(X_test)[:, 1]
    clf.save("models/classifiers/arith")                   # arith.xgb.json + arith.meta.json
    clf = StepClassifier.load("models/classifiers/arith")

A scikit-learn estimator (keyword parameters, fitted attributes ending in ``_``), saved as
xgboost's own JSON model plus a metadata JSON (feature names, parameters, the training
data's checksum, provenance); never pickled. ``paper_parity_classifier()`` gives sklearn's
GradientBoostingClassifier with defaults, as in the paper.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.model_selection import GroupShuffleSplit
from sklearn.utils.validation import check_is_fitted

#: The shipped verifier (``crv train-verifier`` on the evaluation benchmark's step table).
DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[2] / "models" / "classifiers" / "default"


def data_checksum(X: pd.DataFrame, y: np.ndarray) -> str:
    """SHA-256 (16 hex digits) of the training matrix and labels."""
    h = hashlib.sha256()
    h.update(",".join(X.columns).encode())
    h.update(np.ascontiguousarray(X.to_numpy(dtype=np.float64)).tobytes())
    h.update(np.ascontiguousarray(np.asarray(y, dtype=np.int64)).tobytes())
    return h.hexdigest()[:16]


class StepClassifier(ClassifierMixin, BaseEstimator):
    """xgboost binary classifier over named features, a scikit-learn estimator (``clone``, ``get_params``, pipelines).

    Parameters are xgboost's; ``scale_pos_weight=None`` balances the classes from the training labels
    (``scale_pos_weight_ = n_correct / n_faulty``); ``n_jobs=1``: small tabular data, one thread is fastest
    and never oversubscribes. Fitted: ``booster_``, ``feature_names_in_``, ``classes_``, ``scale_pos_weight_``
    and ``meta_`` (what :meth:`save` writes beside the model).
    """

    def __init__(self, *, n_estimators: int = 300, max_depth: int = 4, learning_rate: float = 0.05,
                 subsample: float = 0.8, colsample_bytree: float = 0.8, min_child_weight: float = 1.0,
                 scale_pos_weight: float | None = None, seed: int = 0, n_jobs: int = 1):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.scale_pos_weight = scale_pos_weight
        self.seed = seed
        self.n_jobs = n_jobs

    def fit(self, X: pd.DataFrame, y: np.ndarray) -> "StepClassifier":
        y = np.asarray(y).astype(int)
        if len(X) != len(y):
            raise ValueError(f"X has {len(X)} rows but y has {len(y)} labels")
        if set(np.unique(y)) != {0, 1}:
            raise ValueError("training labels need both classes (1 = faulty, 0 = correct)")
        spw = self.scale_pos_weight if self.scale_pos_weight is not None else float((y == 0).sum() / max(1, (y == 1).sum()))
        self.booster_ = xgb.XGBClassifier(
            n_estimators=self.n_estimators, max_depth=self.max_depth, learning_rate=self.learning_rate,
            subsample=self.subsample, colsample_bytree=self.colsample_bytree, min_child_weight=self.min_child_weight,
            scale_pos_weight=spw, random_state=self.seed, n_jobs=self.n_jobs, eval_metric="logloss", tree_method="hist",
        )
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.classes_ = np.array([0, 1])
        self.scale_pos_weight_ = spw
        self.booster_.fit(X.to_numpy(dtype=np.float32), y)
        self.meta_ = {"feature_names": list(X.columns), "config": self.get_params(), "scale_pos_weight": spw,
                      "n_train": int(len(y)), "n_faulty": int(y.sum()), "train_checksum": data_checksum(X, y)}
        return self

    @property
    def feature_names(self) -> list[str]:
        """The columns the classifier reads, in order."""
        check_is_fitted(self)
        return list(self.feature_names_in_)

    def graph_settings(self) -> dict:
        """The graph settings the classifier was trained on (``meta_["provenance"]["attribution"]``): at least
        ``max_feature_nodes`` (1024 for classifiers saved without it) and ``step_target`` ("last")."""
        prov = self.meta_.get("provenance", {}).get("attribution", {})
        return {"max_feature_nodes": 1024, "step_target": "last", **prov}

    def _matrix(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self)
        missing = [c for c in self.feature_names_in_ if c not in X.columns]
        if missing:
            raise ValueError(f"missing feature columns: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return X[list(self.feature_names_in_)].to_numpy(dtype=np.float32)

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """``[n, 2]``: P(correct), P(faulty)."""
        X = self._matrix(X)
        return self.booster_.predict_proba(X)

    def predict(self, X: pd.DataFrame, threshold: float = 0.5) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= threshold).astype(int)

    def feature_importances(self) -> pd.Series:
        check_is_fitted(self)
        return pd.Series(self.booster_.feature_importances_, index=self.feature_names).sort_values(ascending=False)

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.xgb.json`` (the model) and ``<path>.meta.json``."""
        check_is_fitted(self)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.booster_.save_model(str(path.with_name(path.name + ".xgb.json")))
        path.with_name(path.name + ".meta.json").write_text(json.dumps(self.meta_, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "StepClassifier":
        path = Path(path)
        model_file, meta_file = path.with_name(path.name + ".xgb.json"), path.with_name(path.name + ".meta.json")
        for f in (model_file, meta_file):
            if not f.is_file():
                raise FileNotFoundError(f"classifier file not found: {f}")
        meta = json.loads(meta_file.read_text())
        clf = cls(**meta["config"])
        clf.booster_ = xgb.XGBClassifier()
        clf.booster_.load_model(str(model_file))
        clf.feature_names_in_ = np.asarray(meta["feature_names"], dtype=object)
        clf.classes_, clf.scale_pos_weight_, clf.meta_ = np.array([0, 1]), meta.get("scale_pos_weight"), meta
        return clf


def paper_parity_classifier(seed: int = 0) -> GradientBoostingClassifier:
    """sklearn's GradientBoostingClassifier with default hyper-parameters (the paper's choice)."""
    return GradientBoostingClassifier(random_state=seed)


def grouped_split(groups: np.ndarray, test_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train / test row indices with no group (problem) on both sides."""
    groups = np.asarray(groups)
    if len(np.unique(groups)) < 2:
        raise ValueError("need at least two problems to split")
    split = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train, test = next(split.split(np.zeros(len(groups)), groups=groups))
    return train, test
