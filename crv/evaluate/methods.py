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
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from transformers import PreTrainedModel

from crv.classify.model import StepClassifier, paper_parity_classifier
from crv.evaluate.estimators import BestColumn, BestGroupProbe, Columns, ColumnScore, grouped_folds
from crv.evaluate.prm import PRMConfig, ProcessRewardModel, last_token_states, state_layers
from crv.extract.steps import KEYS, TEMPERATURES, column_groups
from crv.lm.encode import TraceEncoder
from crv.tasks.schema import Record

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
    classifier: dict = field(default_factory=lambda: StepClassifier().get_params())  # StepClassifier parameters
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


@dataclass(frozen=True)
class Method:
    """One method of the results table: a scikit-learn pipeline built from the step table's column groups
    (``build(groups, cfg)``), what its fit chose (``chosen(fitted)``), and whether its fit takes the problems
    as ``groups`` (grouped cross-validation inside the training split)."""

    name: str
    description: str
    build: Callable[[dict[str, list[str]], EvalConfig], Pipeline]
    chosen: Callable[[Pipeline], dict] = lambda fitted: {}
    grouped: bool = False


def on_columns(columns: Callable[[dict[str, list[str]]], list[str]], model: Callable[[EvalConfig], object],
               as_numpy: bool = False) -> Callable[[dict[str, list[str]], EvalConfig], Pipeline]:
    """A :attr:`Method.build`: ``Pipeline([("columns", Columns(columns(groups), as_numpy)), ("model", model(cfg))])``."""
    return lambda g, cfg: Pipeline([("columns", Columns(columns(g), as_numpy)), ("model", model(cfg))])


def _crv(*group_names: str) -> Callable[[dict[str, list[str]], EvalConfig], Pipeline]:
    return on_columns(lambda g: [c for name in group_names for c in g[name]], lambda cfg: StepClassifier(**cfg.classifier))


def _top_features(name: str) -> Callable[[Pipeline], dict]:
    return lambda fitted: {f"{name}_top_features": fitted[-1].feature_importances().head(10).round(4).to_dict()}


def _score(column: str, sign: float = 1.0, offset: float = 0.0) -> Callable[[dict[str, list[str]], EvalConfig], Pipeline]:
    return on_columns(lambda g: [column], lambda cfg: ColumnScore(sign, offset))


#: the temperature-scaled MaxProb columns, by temperature
TEMPERATURE_COLUMNS = {1.0: "bb.maxprob", **{t: f"bb.maxprob_t{t}" for t in TEMPERATURES}}


def _hidden(g: dict[str, list[str]]) -> list[str]:
    return [c for layer in sorted((k for k in g if k.startswith("h")), key=lambda k: int(k[1:])) for c in g[layer]]


def _probe_method(name: str, description: str, probe: Callable[[EvalConfig], object]) -> Method:
    return Method(name, description,
                  on_columns(_hidden, lambda cfg: BestGroupProbe(probe(cfg), None, cfg.probe_folds, cfg.seed)),
                  lambda fitted: {f"{name}_layer": fitted[-1].layer_}, grouped=True)


#: the methods scored on the step table alone, in report order (the graph-target variants and the PRMs follow)
REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("crv", "CRV: xgboost on the attribution-graph fingerprint", _crv("fingerprint"), _top_features("crv")),
    Method("crv_gbc", "CRV with sklearn GradientBoostingClassifier defaults (paper parity)",
           on_columns(lambda g: g["fingerprint"], lambda cfg: paper_parity_classifier(cfg.seed), as_numpy=True)),
    Method("maxprob", "1 - mean max token probability", _score("bb.maxprob", -1.0, 1.0)),
    Method("ppl", "perplexity of the step's tokens", _score("bb.ppl")),
    Method("entropy", "mean predictive entropy", _score("bb.entropy")),
    Method("temp_scaling", "1 - mean max probability at the temperature best on the training split",
           on_columns(lambda g: list(TEMPERATURE_COLUMNS.values()), lambda cfg: BestColumn(-1.0, 1.0)),
           lambda fitted: {"temperature": {c: t for t, c in TEMPERATURE_COLUMNS.items()}[fitted[-1].column_]}),
    Method("energy", "mean energy score -logsumexp(logits)", _score("bb.energy")),
    _probe_method("lr_probe", "logistic regression on mean-pooled hidden states (layer chosen on the training split)",
                  lambda cfg: lr_probe()),
    _probe_method("mlp_probe", "MLP on mean-pooled hidden states (layer chosen on the training split)",
                  lambda cfg: mlp_probe(cfg.seed)),
    Method("tc_only", "xgboost on per-layer transcoder activation statistics, no graph", _crv("tc")),
    Method("crv_plus_confidence", "xgboost on the fingerprint plus the black-box confidence scores (bb.*)",
           _crv("fingerprint", "bb"), _top_features("crv_plus_confidence")),
)}

#: CRV on the graph at another step target (a ``fingerprint:<target>`` column group), by target
TARGET_DESCRIPTIONS = {
    "uncertain": "CRV on the graph at the step's least confident position (crv extension)",
    "result": "CRV on the graph at the step's \"=\" (crv extension)",
}

#: the methods that read the traces' text (:func:`score_prms`)
TEXT_METHODS = {
    "prm_finetuned": "process reward model: the reasoner fine-tuned with a scalar head on the step's last token",
    "prm_frozen": "process reward model, reasoner frozen: linear head on the step's last-token hidden state (layer chosen on the training split)",
    "crv_plus_prm": "xgboost on the fingerprint plus the fine-tuned PRM's score (out-of-fold on the training split)",
}


def methods_for(groups: dict[str, list[str]]) -> list[Method]:
    """The registry's methods plus CRV at every other step target the table has (``fingerprint:<target>``)."""
    targets = [g.split(":", 1)[1] for g in groups if g.startswith("fingerprint:")]
    return list(REGISTRY.values()) + [
        Method(f"crv_{t}", TARGET_DESCRIPTIONS.get(t, f"CRV on the graph at the step's {t} target"),
               _crv(f"fingerprint:{t}"), _top_features(f"crv_{t}")) for t in targets]


#: method name -> short description (report legend), in report order
METHODS = {**{m.name: m.description for m in REGISTRY.values()}, **{f"crv_{t}": d for t, d in TARGET_DESCRIPTIONS.items()},
           **TEXT_METHODS}


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


def lr_probe() -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))


def mlp_probe(seed: int = 0) -> Pipeline:
    return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-2, max_iter=300,
                                                         early_stopping=True, random_state=seed))


def fit_crv(train: pd.DataFrame, columns: list[str], cfg: EvalConfig) -> StepClassifier:
    return StepClassifier(**cfg.classifier).fit(train[columns], train["faulty"].to_numpy())


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

    frozen = BestGroupProbe(lr_probe(), layers, cfg.probe_folds, cfg.seed).fit(
        with_states(train), train["faulty"].to_numpy(), groups=train["problem_id"].to_numpy())
    scores["prm_frozen"], chosen["prm_frozen_layer"] = frozen.predict_proba(with_states(test))[:, 1], frozen.layer_

    if crossfit is None:
        oof = np.zeros(len(train))
        for tr, va in grouped_folds(train["faulty"].to_numpy(), train["problem_id"].to_numpy(), cfg.prm.crossfit_folds, cfg.seed):
            oof[va] = fit_score_prm(train.iloc[tr], train.iloc[va], cfg, text)[0]
    else:
        oof = crossfit[0]
    fp = column_groups(train)["fingerprint"]
    both_train = train[fp].assign(prm_score=oof)
    both_test = test[fp].assign(prm_score=scores["prm_finetuned"])
    both = StepClassifier(**cfg.classifier).fit(both_train, train["faulty"].to_numpy())
    scores["crv_plus_prm"] = both.predict_proba(both_test)[:, 1]
    chosen["crv_plus_prm_top_features"] = both.feature_importances().head(10).round(4).to_dict()
    return scores, chosen


def score_methods(train: pd.DataFrame, test: pd.DataFrame, cfg: EvalConfig,
                  text: TextInputs | None = None,
                  prm_crossfit: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Test-set scores of every method of :func:`methods_for` (one loop: build, fit on ``train``, score ``test``),
    plus what each fit chose on the training split.

    The PRM baselines (and CRV + PRM) need the traces' text: they run when ``text`` is given
    and ``cfg.prm`` is set (``prm_crossfit``: see :func:`score_prms`).
    """
    groups = column_groups(train)
    y, problems = train["faulty"].to_numpy(), train["problem_id"].to_numpy()
    scores: dict[str, np.ndarray] = {}
    chosen: dict = {}
    for m in methods_for(groups):
        pipe = m.build(groups, cfg)
        pipe.fit(train, y, **({"model__groups": problems} if m.grouped else {}))
        scores[m.name] = pipe.predict_proba(test)[:, 1]
        chosen.update(m.chosen(pipe))
    if text is not None and cfg.prm is not None:
        prm_scores, prm_chosen = score_prms(train, test, cfg, text, prm_crossfit)
        scores.update(prm_scores)
        chosen.update(prm_chosen)
    return scores, chosen
