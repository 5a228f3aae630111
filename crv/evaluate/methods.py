"""CRV and every baseline, each fitted on a training split and scoring a test split (higher = more likely faulty)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from crv.classify.metrics import auroc
from crv.classify.model import ClassifierConfig, StepClassifier, paper_parity_classifier
from crv.evaluate.steps import TEMPERATURES, column_groups, hidden_layers

#: method name -> short description (report legend)
METHODS = {
    "crv": "CRV: xgboost on the attribution-graph fingerprint",
    "crv_gbc": "CRV with sklearn GradientBoostingClassifier defaults (paper parity)",
    "maxprob": "1 - mean max token probability",
    "ppl": "perplexity of the step's tokens",
    "entropy": "mean predictive entropy",
    "temp_scaling": "1 - mean max probability at the temperature best on the training split",
    "energy": "mean energy score -logsumexp(logits)",
    "lr_probe": "logistic regression on mean-pooled hidden states (layer chosen on the training split)",
    "mlp_probe": "MLP on mean-pooled hidden states (layer chosen on the training split)",
    "tc_only": "xgboost on per-layer transcoder activation statistics, no graph",
    "crv_uncertain": "CRV on the graph at the step's least confident position (crv extension)",
    "crv_result": "CRV on the graph at the step's \"=\" (crv extension)",
}


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings."""

    test_fraction: float = 0.2  # via stratified group k-fold: 1 / round(1 / test_fraction) of the problems
    seed: int = 0
    n_boot: int = 1000
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    probe_folds: int = 3


def split(table: pd.DataFrame, cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """Train / test rows: grouped by problem (no problem on both sides), stratified by faulty steps."""
    k = max(2, round(1 / cfg.test_fraction))
    y, groups = table["faulty"].to_numpy(), table["problem_id"].to_numpy()
    n_faulty_problems = table.loc[table["faulty"] == 1, "problem_id"].nunique()
    if n_faulty_problems < k:
        raise ValueError(f"only {n_faulty_problems} problem(s) with a faulty step: need at least {k} to split")
    folds = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=cfg.seed)
    train, test = next(folds.split(np.zeros(len(y)), y, groups))
    return train, test


def _probe(make: Callable[[], object], train: pd.DataFrame, test: pd.DataFrame, cfg: EvalConfig) -> tuple[np.ndarray, str]:
    """Pick the hidden layer with the best grouped cross-validated AUROC on ``train``; score ``test``."""
    y = train["faulty"].to_numpy()
    folds = list(StratifiedGroupKFold(n_splits=cfg.probe_folds, shuffle=True, random_state=cfg.seed)
                 .split(np.zeros(len(y)), y, train["problem_id"].to_numpy()))
    groups = column_groups(train)
    best, best_layer = -1.0, None
    for layer in hidden_layers(train):
        X = train[groups[layer]].to_numpy()
        vals = []
        for tr, va in folds:
            if len(np.unique(y[tr])) < 2 or len(np.unique(y[va])) < 2:
                continue
            m = make()
            m.fit(X[tr], y[tr])  # type: ignore[attr-defined]
            vals.append(auroc(y[va], m.predict_proba(X[va])[:, 1]))  # type: ignore[attr-defined]
        score = float(np.mean(vals)) if vals else 0.5
        if score > best:
            best, best_layer = score, layer
    cols = groups[best_layer]  # type: ignore[index]
    m = make()
    m.fit(train[cols].to_numpy(), y)  # type: ignore[attr-defined]
    return m.predict_proba(test[cols].to_numpy())[:, 1], str(best_layer)  # type: ignore[attr-defined]


def lr_probe() -> object:
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))


def mlp_probe(seed: int = 0) -> object:
    return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-2, max_iter=300,
                                                         early_stopping=True, random_state=seed))


def fit_crv(train: pd.DataFrame, columns: list[str], cfg: EvalConfig) -> StepClassifier:
    return StepClassifier(cfg.classifier).fit(train[columns], train["faulty"].to_numpy())


def score_methods(train: pd.DataFrame, test: pd.DataFrame, cfg: EvalConfig) -> tuple[dict[str, np.ndarray], dict]:
    """Test-set scores of every method, plus what was chosen on the training split."""
    groups = column_groups(train)
    y = train["faulty"].to_numpy()
    fp = groups["fingerprint"]
    scores: dict[str, np.ndarray] = {}
    chosen: dict = {}
    crv = fit_crv(train, fp, cfg)
    scores["crv"] = crv.predict_proba(test[fp])[:, 1]
    chosen["crv_top_features"] = crv.feature_importances().head(10).round(4).to_dict()
    gbc = paper_parity_classifier(cfg.seed).fit(train[fp].to_numpy(), y)
    scores["crv_gbc"] = gbc.predict_proba(test[fp].to_numpy())[:, 1]
    scores["maxprob"] = 1.0 - test["bb.maxprob"].to_numpy()
    scores["ppl"] = test["bb.ppl"].to_numpy()
    scores["entropy"] = test["bb.entropy"].to_numpy()
    temps = {1.0: "bb.maxprob", **{t: f"bb.maxprob_t{t}" for t in TEMPERATURES}}
    best_t = max(temps, key=lambda t: auroc(y, 1.0 - train[temps[t]].to_numpy()))
    scores["temp_scaling"] = 1.0 - test[temps[best_t]].to_numpy()
    chosen["temperature"] = best_t
    scores["energy"] = test["bb.energy"].to_numpy()
    scores["lr_probe"], chosen["lr_probe_layer"] = _probe(lr_probe, train, test, cfg)
    scores["mlp_probe"], chosen["mlp_probe_layer"] = _probe(lambda: mlp_probe(cfg.seed), train, test, cfg)
    tc = fit_crv(train, groups["tc"], cfg)
    scores["tc_only"] = tc.predict_proba(test[groups["tc"]])[:, 1]
    for group in (g for g in groups if g.startswith("fingerprint:")):
        target = group.split(":", 1)[1]
        clf = fit_crv(train, groups[group], cfg)
        scores[f"crv_{target}"] = clf.predict_proba(test[groups[group]])[:, 1]
        chosen[f"crv_{target}_top_features"] = clf.feature_importances().head(10).round(4).to_dict()
    return scores, chosen
