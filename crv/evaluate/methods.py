"""CRV and every baseline, each fitted on a training split and scoring a test split (higher = more likely faulty)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import PreTrainedModel


from crv.classify.metrics import auroc
from crv.classify.model import ClassifierConfig, StepClassifier, paper_parity_classifier
from crv.evaluate.prm import PRMConfig, ProcessRewardModel, last_token_states, state_layers
from crv.extract.steps import KEYS, TEMPERATURES, column_groups, hidden_layers
from crv.lm.encode import TraceEncoder
from crv.tasks.schema import Record

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
    "prm_finetuned": "process reward model: the reasoner fine-tuned with a scalar head on the step's last token",
    "prm_frozen": "process reward model, reasoner frozen: linear head on the step's last-token hidden state (layer chosen on the training split)",
    "crv_plus_prm": "xgboost on the fingerprint plus the fine-tuned PRM's score (out-of-fold on the training split)",
    "crv_plus_confidence": "xgboost on the fingerprint plus the black-box confidence scores (bb.*)",
}

#: the black-box confidence scores (no training beyond a temperature)
BLACK_BOX = ("maxprob", "ppl", "entropy", "temp_scaling", "energy")

SCORING = ("out_of_fold", "split")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings.

    ``scoring="out_of_fold"`` (default): every step is scored by the fit of the ``folds``-fold
    cross-fit (grouped by problem) that did not see its problem; ``"split"``: one held-out split
    of ``test_fraction`` of the problems. Intervals resample problems (``n_boot`` times).
    """

    scoring: str = "out_of_fold"
    folds: int = 5
    test_fraction: float = 0.2  # split mode, via stratified group k-fold: 1 / round(1 / test_fraction) of the problems
    seed: int = 0
    n_boot: int = 1000
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    probe_folds: int = 3
    prm: PRMConfig | None = field(default_factory=PRMConfig)  # None: no PRM baselines

    def __post_init__(self) -> None:
        if self.scoring not in SCORING:
            raise ValueError(f"scoring must be one of {SCORING}, not {self.scoring!r}")
        if self.folds < 2:
            raise ValueError(f"folds must be at least 2, not {self.folds}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), not {self.test_fraction}")


@dataclass(frozen=True)
class TextInputs:
    """What the text-reading baselines (the PRMs) need besides the step table."""

    reasoner: PreTrainedModel
    encoder: TraceEncoder  # the model's tokenizer and prompt format
    records: dict[str, Record]  # by problem_id

    def of(self, table: pd.DataFrame) -> list[Record]:
        """The records of the problems in ``table``, in order of first appearance."""
        return [self.records[p] for p in dict.fromkeys(table["problem_id"])]


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


def _folds(train: pd.DataFrame, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped (by problem), stratified folds of a training split."""
    y = train["faulty"].to_numpy()
    return list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
                .split(np.zeros(len(y)), y, train["problem_id"].to_numpy()))


def _probe(make: Callable[[], object], train: pd.DataFrame, test: pd.DataFrame, cfg: EvalConfig,
           layers: dict[str, list[str]] | None = None) -> tuple[np.ndarray, str]:
    """Pick the layer (a group of columns; default: the mean-pooled hidden states) with the best
    grouped cross-validated AUROC on ``train``; score ``test``."""
    y = train["faulty"].to_numpy()
    folds = _folds(train, cfg.probe_folds, cfg.seed)
    if layers is None:
        groups = column_groups(train)
        layers = {layer: groups[layer] for layer in hidden_layers(train)}
    best, best_layer = -1.0, None
    for layer, cols in layers.items():
        X = train[cols].to_numpy()
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
    cols = layers[best_layer]  # type: ignore[index]
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


def _aligned(values: pd.Series | pd.DataFrame, table: pd.DataFrame) -> np.ndarray:
    """Per-step values (indexed by problem_id, step_index) in the row order of ``table``."""
    out = values.reindex(pd.MultiIndex.from_frame(table[["problem_id", "step_index"]]))
    if out.isna().to_numpy().any():
        raise ValueError("the records do not cover every step of the table")
    return out.to_numpy()


def fit_score_prm(train: pd.DataFrame, test: pd.DataFrame, cfg: EvalConfig, text: TextInputs) -> tuple[np.ndarray, float, float]:
    """The fine-tuned PRM's scores of ``test``'s steps, trained on ``train``'s problems; seconds to train and
    milliseconds per step to score."""
    assert cfg.prm is not None
    t0 = time.perf_counter()
    prm = ProcessRewardModel(text.reasoner, text.encoder, cfg.prm).fit(text.of(train))
    t1 = time.perf_counter()
    scores = _aligned(prm.score(text.of(test)), test)
    return scores, t1 - t0, 1000 * (time.perf_counter() - t1) / len(test)


def score_prms(train: pd.DataFrame, test: pd.DataFrame, cfg: EvalConfig, text: TextInputs,
               crossfit: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Test-set scores of the PRM baselines and of CRV + PRM, all trained on ``train``'s problems only.

    CRV + PRM is trained on the fingerprint plus a PRM score of each training step from a PRM that did
    not see that step's problem: by default from ``cfg.prm.crossfit_folds`` PRMs fitted inside ``train``;
    out of fold, ``crossfit`` passes the fine-tuned PRM's scores of ``train`` and ``test`` from the outer
    fits instead (cross-fitted stacking: the PRM and the stacker that score a step never saw its problem).
    """
    assert cfg.prm is not None
    train_recs, test_recs = text.of(train), text.of(test)
    scores: dict[str, np.ndarray] = {}
    chosen: dict = {"ms_per_step": {}}
    if crossfit is None:
        scores["prm_finetuned"], seconds, ms = fit_score_prm(train, test, cfg, text)
        chosen["prm_train_seconds"] = round(seconds, 2)
        chosen["ms_per_step"]["prm_finetuned"] = ms
    else:
        scores["prm_finetuned"] = crossfit[1]
    t2 = time.perf_counter()
    test_states = last_token_states(text.reasoner, text.encoder, test_recs)
    chosen["ms_per_step"]["prm_frozen"] = 1000 * (time.perf_counter() - t2) / len(test)
    states = pd.concat([last_token_states(text.reasoner, text.encoder, train_recs), test_states])
    layers = state_layers(states)

    def with_states(t: pd.DataFrame) -> pd.DataFrame:
        return pd.concat([t[KEYS].reset_index(drop=True),
                          pd.DataFrame(_aligned(states, t), columns=states.columns)], axis=1)

    scores["prm_frozen"], chosen["prm_frozen_layer"] = _probe(lr_probe, with_states(train), with_states(test), cfg, layers)

    if crossfit is None:
        oof = np.zeros(len(train))
        for tr, va in _folds(train, cfg.prm.crossfit_folds, cfg.seed):
            oof[va] = fit_score_prm(train.iloc[tr], train.iloc[va], cfg, text)[0]
    else:
        oof = crossfit[0]
    fp = column_groups(train)["fingerprint"]
    both_train = train[fp].assign(prm_score=oof)
    both_test = test[fp].assign(prm_score=scores["prm_finetuned"])
    both = StepClassifier(cfg.classifier).fit(both_train, train["faulty"].to_numpy())
    scores["crv_plus_prm"] = both.predict_proba(both_test)[:, 1]
    chosen["crv_plus_prm_top_features"] = both.feature_importances().head(10).round(4).to_dict()
    return scores, chosen


def score_methods(train: pd.DataFrame, test: pd.DataFrame, cfg: EvalConfig,
                  text: TextInputs | None = None,
                  prm_crossfit: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Test-set scores of every method, plus what was chosen on the training split.

    The PRM baselines (and CRV + PRM) need the traces' text: they run when ``text`` is given
    and ``cfg.prm`` is set (``prm_crossfit``: see :func:`score_prms`).
    """
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
    both = fit_crv(train, fp + groups["bb"], cfg)
    scores["crv_plus_confidence"] = both.predict_proba(test[fp + groups["bb"]])[:, 1]
    chosen["crv_plus_confidence_top_features"] = both.feature_importances().head(10).round(4).to_dict()
    tc = fit_crv(train, groups["tc"], cfg)
    scores["tc_only"] = tc.predict_proba(test[groups["tc"]])[:, 1]
    for group in (g for g in groups if g.startswith("fingerprint:")):
        target = group.split(":", 1)[1]
        clf = fit_crv(train, groups[group], cfg)
        scores[f"crv_{target}"] = clf.predict_proba(test[groups[group]])[:, 1]
        chosen[f"crv_{target}_top_features"] = clf.feature_importances().head(10).round(4).to_dict()
    if text is not None and cfg.prm is not None:
        prm_scores, prm_chosen = score_prms(train, test, cfg, text, prm_crossfit)
        scores.update(prm_scores)
        chosen.update(prm_chosen)
    return scores, chosen
