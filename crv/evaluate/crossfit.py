"""Which model scores which step: out-of-fold over problems (the default) or one held-out split.

Out of fold, the problems are dealt into ``k`` folds (grouped by problem, stratified by
faulty steps); every method is trained ``k`` times, each time on the other folds, and each
step is scored by the one fit that never saw its problem. Metrics are then computed on all
steps. Anything chosen from data (a probe's layer, a temperature, a PRM's layer) is chosen
inside the training folds of that fit (:func:`crv.evaluate.methods.score_methods`).
The fine-tuned PRM is trained once per fit; CRV + PRM's training rows carry the PRM scores of
those outer fits (cross-fitted stacking), so neither the PRM nor the stacker that scores a step
ever saw its problem, at ``k`` PRM trainings instead of ``k * (1 + inner folds)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold
from tqdm.auto import tqdm

from crv.evaluate.methods import EvalConfig, TextInputs, fit_score_prm, score_methods, split


@dataclass(frozen=True)
class Scheme:
    """The fits of one evaluation: ``(train_rows, test_rows)`` per fit, test rows disjoint."""

    fits: tuple[tuple[np.ndarray, np.ndarray], ...]
    n_rows: int
    kind: str  # "out_of_fold" | "split"

    @property
    def scored(self) -> np.ndarray:
        """Row indices that receive a score, ascending."""
        return np.sort(np.concatenate([te for _, te in self.fits]))

    def fit_rows(self) -> np.ndarray:
        """Rows a model meant for use (saved classifier, transfer source) is trained on."""
        return np.arange(self.n_rows) if self.kind == "out_of_fold" else self.fits[0][0]


def make_scheme(table: pd.DataFrame, cfg: EvalConfig) -> Scheme:
    """The scheme ``cfg.scoring`` asks for on ``table`` (one task's steps)."""
    if cfg.scoring == "split":
        return Scheme((split(table, cfg),), len(table), "split")
    y, groups = table["faulty"].to_numpy(), table["problem_id"].to_numpy()
    n_faulty_problems = table.loc[table["faulty"] == 1, "problem_id"].nunique()
    if n_faulty_problems < cfg.folds:
        raise ValueError(f"only {n_faulty_problems} problem(s) with a faulty step: need at least {cfg.folds} "
                         f"for {cfg.folds}-fold scoring (lower folds or add problems)")
    folds = StratifiedGroupKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    return Scheme(tuple(folds.split(np.zeros(len(y)), y, groups)), len(table), "out_of_fold")


def score_scheme(table: pd.DataFrame, scheme: Scheme, cfg: EvalConfig, text: TextInputs | None = None,
                 progress: bool = False) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every method's score of each scored row (in ``scheme.scored`` order), from the fit that did not see
    its problem; and what each fit chose on its training rows."""
    scored = scheme.scored
    where = np.full(len(table), -1)
    where[scored] = np.arange(len(scored))
    out: dict[str, np.ndarray] = {}
    chosen: list[dict] = []
    prm = None
    if scheme.kind == "out_of_fold" and text is not None and cfg.prm is not None:
        prm, prm_cost = out_of_fold_prm(table, scheme, cfg, text, progress)
    for train, test in tqdm(scheme.fits, desc="folds", disable=not progress or len(scheme.fits) == 1):
        scores, c = score_methods(table.iloc[train], table.iloc[test], cfg, text,
                                  None if prm is None else (prm[train], prm[test]))
        if prm is not None:
            fit_cost = prm_cost.pop(0)
            c["prm_train_seconds"] = fit_cost["prm_train_seconds"]
            c["ms_per_step"] = {**fit_cost["ms_per_step"], **c.get("ms_per_step", {})}
        for name, values in scores.items():
            out.setdefault(name, np.full(len(scored), np.nan))[where[test]] = values
        chosen.append(c)
    missing = [name for name, v in out.items() if np.isnan(v).any()]
    if missing:
        raise RuntimeError(f"methods {missing} did not score every step in every fold")
    return out, chosen


def out_of_fold_prm(table: pd.DataFrame, scheme: Scheme, cfg: EvalConfig, text: TextInputs,
                    progress: bool = False) -> tuple[np.ndarray, list[dict]]:
    """The fine-tuned PRM's score of every row from the fit that did not see its problem (one PRM per fit),
    and each fit's training seconds and scoring cost."""
    out = np.full(len(table), np.nan)
    cost = []
    for train, test in tqdm(scheme.fits, desc="PRM folds", disable=not progress):
        out[test], seconds, ms = fit_score_prm(table.iloc[train], table.iloc[test], cfg, text)
        cost.append({"prm_train_seconds": round(seconds, 2), "ms_per_step": {"prm_finetuned": ms}})
    return out, cost


def merge_chosen(chosen: list[dict]) -> dict:
    """What the fits chose, one value per fit under each key (one fit: its values as they are)."""
    if len(chosen) == 1:
        return chosen[0]
    return {k: [c.get(k) for c in chosen] for k in dict.fromkeys(k for c in chosen for k in c)}
