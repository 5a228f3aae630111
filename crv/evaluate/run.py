"""Dataset evaluation: CRV vs baselines per task, leave-one-family-out ablation, cross-domain transfer."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from crv.classify.metrics import auroc, evaluate_scores
from crv.evaluate.methods import EvalConfig, TextInputs, fit_crv, score_methods, split
from crv.evaluate.steps import column_groups
from crv.fingerprint.features import feature_families


def _n_layers(table: pd.DataFrame) -> int:
    return sum(1 for c in table.columns if c.startswith("layer_hist_"))


def evaluate_task(table: pd.DataFrame, cfg: EvalConfig, text: TextInputs | None = None) -> dict:
    """Every method's test metrics on one task's steps, the ablation, and the curves' raw scores.

    With ``text`` (the traces and the reasoner) the PRM baselines are trained and scored too.
    """
    train_idx, test_idx = split(table, cfg)
    train, test = table.iloc[train_idx], table.iloc[test_idx]
    y = test["faulty"].to_numpy()
    scores, chosen = score_methods(train, test, cfg, text)
    methods = {name: evaluate_scores(y, s, n_boot=cfg.n_boot, seed=cfg.seed).as_dict() for name, s in scores.items()}
    fp = column_groups(table)["fingerprint"]
    ablation = {}
    for family, cols in feature_families(_n_layers(table)).items():
        keep = [c for c in fp if c not in cols]
        clf = fit_crv(train, keep, cfg)
        ablation[f"without_{family}"] = auroc(y, clf.predict_proba(test[keep])[:, 1])
    return {
        "n_steps": int(len(table)),
        "n_faulty": int(table["faulty"].sum()),
        "n_test_steps": int(len(test)),
        "n_test_faulty": int(y.sum()),
        "methods": methods,
        "ablation_auroc": ablation,
        "chosen_on_train": {k: v for k, v in chosen.items() if k != "ms_per_step"},
        "ms_per_step": chosen.get("ms_per_step", {}),
        "_curves": {"y": y, "scores": scores},
        "_split": (train_idx, test_idx),
    }


def transfer(tables: dict[str, pd.DataFrame], splits: dict[str, tuple[np.ndarray, np.ndarray]], cfg: EvalConfig) -> tuple[dict, dict]:
    """CRV trained on one task's training split, tested on another's test split; and trained on both."""
    pairs, both = {}, {}
    fp = column_groups(next(iter(tables.values())))["fingerprint"]
    for src, tsrc in tables.items():
        clf = fit_crv(tsrc.iloc[splits[src][0]], fp, cfg)
        for dst, tdst in tables.items():
            if dst != src:
                test = tdst.iloc[splits[dst][1]]
                pairs[f"{src}->{dst}"] = auroc(test["faulty"].to_numpy(), clf.predict_proba(test[fp])[:, 1])
    if len(tables) > 1:
        joint = pd.concat([t.iloc[splits[k][0]] for k, t in tables.items()])
        clf = fit_crv(joint, fp, cfg)
        for k, t in tables.items():
            test = t.iloc[splits[k][1]]
            both[k] = auroc(test["faulty"].to_numpy(), clf.predict_proba(test[fp])[:, 1])
    return pairs, both


def evaluate_table(table: pd.DataFrame, cfg: EvalConfig = EvalConfig(), text: TextInputs | None = None) -> dict:
    """Results for every task in the step table (tasks without enough faulty steps are reported as skipped).

    ``text`` enables the baselines that read the traces (the PRMs).
    """
    out: dict = {"settings": asdict(cfg), "skipped": {}}
    tables, splits = {}, {}
    for task, t in table.groupby("task", sort=True):
        t = t.reset_index(drop=True)
        try:
            res = evaluate_task(t, cfg, text)
        except ValueError as e:
            out["skipped"][str(task)] = str(e)
            continue
        splits[str(task)] = res.pop("_split")
        tables[str(task)] = t
        out[str(task)] = res
    pairs, both = transfer(tables, splits, cfg) if len(tables) > 1 else ({}, {})
    out["transfer"] = pairs
    out["transfer_trained_on_both"] = both
    return out


def public(results: dict) -> dict:
    """The results without the raw test scores (for JSON)."""
    return {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v)
            for k, v in results.items()}


def save_step_table(table: pd.DataFrame, run_dir: Path, graph_dir: Path | None) -> None:
    """The full step table in the run directory; the fingerprints (keys + fingerprint) next to the graphs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(run_dir / "steps.parquet", index=False)
    if graph_dir is not None:
        graph_dir.mkdir(parents=True, exist_ok=True)
        keys = ["problem_id", "task", "n", "step_index", "faulty"]
        table[keys + column_groups(table)["fingerprint"]].to_parquet(graph_dir / "fingerprints.parquet", index=False)
