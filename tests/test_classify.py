"""Classifier API, persistence, metrics and grouped splits."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from crv.classify.metrics import aupr, auroc, bootstrap_ci, evaluate_scores, fpr_at_95
from crv.classify.model import StepClassifier, grouped_split


def toy(n=400, seed=0):
    rng = np.random.default_rng(seed)
    X = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "noise": rng.normal(size=n)})
    y = ((X.a + 0.5 * X.b + rng.normal(scale=0.5, size=n)) > 1.2).astype(int).to_numpy()
    return X, y


def test_fit_predict_and_round_trip(tmp_path):
    X, y = toy()
    clf = StepClassifier(n_estimators=50).fit(X[:300], y[:300])
    p = clf.predict_proba(X[300:])
    assert p.shape == (100, 2) and np.allclose(p.sum(1), 1)
    assert auroc(y[300:], p[:, 1]) > 0.8
    assert clf.meta_["scale_pos_weight"] == pytest.approx((y[:300] == 0).sum() / (y[:300] == 1).sum())
    clf.save(tmp_path / "clf")
    back = StepClassifier.load(tmp_path / "clf")
    assert np.array_equal(back.predict_proba(X[300:]), p)
    assert back.feature_names == ["a", "b", "noise"] and back.meta_["train_checksum"] == clf.meta_["train_checksum"]
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


def test_step_classifier_follows_the_estimator_conventions():
    """clone / get_params / set_params / Pipeline work; fitted attributes end in _ and an unfitted one says so."""
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError
    from sklearn.pipeline import Pipeline

    from crv.evaluate.estimators import Columns

    X, y = toy()
    clf = StepClassifier(n_estimators=30, max_depth=2)
    twin = clone(clf)
    assert twin.get_params() == clf.get_params() and twin.get_params()["max_depth"] == 2
    with pytest.raises(NotFittedError):
        clf.predict_proba(X)
    pipe = Pipeline([("columns", Columns(["a", "b"])), ("model", clf)]).fit(X, y)
    fitted = pipe[-1]
    assert list(fitted.feature_names_in_) == ["a", "b"] and list(fitted.classes_) == [0, 1]
    assert fitted.meta_["config"] == clf.get_params() and not hasattr(twin, "booster_")
    direct = StepClassifier(n_estimators=30, max_depth=2).fit(X[["a", "b"]], y)
    assert np.array_equal(pipe.predict_proba(X), direct.predict_proba(X))


def test_method_estimators_choose_on_the_training_split_only():
    """BestColumn picks the column by training AUROC; BestGroupProbe needs the problems for its grouped folds and
    picks the informative layer."""
    from sklearn.linear_model import LogisticRegression

    from crv.evaluate.estimators import BestColumn, BestGroupProbe, ColumnScore

    X, y = toy(600)
    cols = pd.DataFrame({"noise": X["noise"], "signal": X["a"]})
    assert BestColumn().fit(cols, y).column_ == "signal"
    assert BestColumn(sign=-1.0).fit(cols, y).column_ == "noise"  # -a is the worst score; -noise is near chance
    assert np.array_equal(ColumnScore(-1.0, 1.0).fit(cols[["signal"]], y).predict_proba(cols[["signal"]])[:, 1],
                          1.0 - cols["signal"].to_numpy())
    H = pd.DataFrame({"h0.0": X["noise"], "h0.1": X["noise"] ** 2, "h1.0": X["a"], "h1.1": X["b"]})
    groups = np.repeat(np.arange(150), 4)
    probe = BestGroupProbe(LogisticRegression(), folds=3)
    with pytest.raises(ValueError, match="groups="):
        probe.fit(H, y)
    assert probe.fit(H, y, groups=groups).layer_ == "h1" and probe.columns_ == ["h1.0", "h1.1"]
