"""Classifier API, persistence, metrics and grouped splits."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from crv.classify.metrics import aupr, auroc, bootstrap_ci, evaluate_scores, fpr_at_95
from crv.classify.model import ClassifierConfig, StepClassifier, grouped_split


def toy(n=400, seed=0):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "noise": rng.normal(size=n)})
    y = ((X.a + 0.5 * X.b + rng.normal(scale=0.5, size=n)) > 1.2).astype(int).to_numpy()
    return X, y


def test_fit_predict_and_round_trip(tmp_path):
    X, y = toy()
    clf = StepClassifier(ClassifierConfig(n_estimators=50)).fit(X[:300], y[:300])
    p = clf.predict_proba(X[300:])
    assert p.shape == (100, 2) and np.allclose(p.sum(1), 1)
    assert auroc(y[300:], p[:, 1]) > 0.8
    assert clf.meta["scale_pos_weight"] == pytest.approx((y[:300] == 0).sum() / (y[:300] == 1).sum())
    clf.save(tmp_path / "clf")
    back = StepClassifier.load(tmp_path / "clf")
    assert np.array_equal(back.predict_proba(X[300:]), p)
    assert back.feature_names == ["a", "b", "noise"] and back.meta["train_checksum"] == clf.meta["train_checksum"]
    # columns are matched by name, not position
    assert np.array_equal(back.predict_proba(X[300:][["noise", "b", "a"]]), p)
    with pytest.raises(ValueError, match="missing feature"):
        back.predict_proba(X[["a", "b"]])
    with pytest.raises(FileNotFoundError):
        StepClassifier.load(tmp_path / "nothing")


def test_metrics_match_sklearn_and_a_hand_computed_fpr95():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y + rng.normal(size=200)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert aupr(y, s) == pytest.approx(average_precision_score(y, s))
    # 20 faulty scored 1..20, 10 correct scored 0.5, 5.5, 10.5, ... : catching 19 of 20 faulty (95%)
    # needs threshold 2, which flags the correct ones scored 5.5 .. 45.5 that are >= 2 -> 9 of 10
    y2 = np.array([1] * 20 + [0] * 10)
    s2 = np.array(list(range(1, 21)) + [0.5 + 5 * i for i in range(10)], dtype=float)
    assert fpr_at_95(y2, s2) == pytest.approx(0.9)
    perfect = evaluate_scores(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), n_boot=50)
    assert perfect.auroc == 1.0 and perfect.fpr95 == 0.0
    lo, hi = bootstrap_ci(y, s, n=200)
    assert lo < auroc(y, s) < hi
    with pytest.raises(ValueError):
        evaluate_scores(np.array([1, 1]), np.array([0.1, 0.2]))


def test_grouped_split_leaks_no_problem():
    groups = np.repeat([f"p{i}" for i in range(50)], 4)
    train, test = grouped_split(groups, test_size=0.2, seed=3)
    assert not set(groups[train]) & set(groups[test])
    assert len(train) + len(test) == len(groups) and len(test) > 0
