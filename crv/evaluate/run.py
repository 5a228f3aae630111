"""Dataset evaluation: CRV vs baselines per task (out of fold, intervals by problem, paired differences,
per difficulty), leave-one-family-out ablation, cross-domain transfer, spread over datasets."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from crv.classify.metrics import aupr, auroc, fpr_at_95
from crv.evaluate.localize import first_error_localisation, traces_of
from crv.evaluate.crossfit import Scheme, make_scheme, merge_chosen, score_scheme
from crv.evaluate.results import Curves, EvaluationResults, TaskEvaluation
from crv.evaluate.intervals import ProblemBootstrap
from crv.evaluate.methods import BLACK_BOX, EvalConfig, TextInputs, fit_crv
from crv.extract.steps import column_groups
from crv.fingerprint.features import feature_families


def _n_layers(table: pd.DataFrame) -> int:
    return sum(1 for c in table.columns if c.startswith("layer_hist_"))


def method_metrics(y: np.ndarray, score: np.ndarray, boot: ProblemBootstrap) -> dict:
    """AUROC, AUPR and FPR@95 of one method with their problem-bootstrap 95% intervals."""
    ci = boot.metric_ci(score)
    return {"auroc": auroc(y, score), "aupr": aupr(y, score), "fpr95": fpr_at_95(y, score),
            **{f"{k}_ci": list(v) for k, v in ci.items()}}


def per_n(scored: pd.DataFrame, scores: dict[str, np.ndarray], cfg: EvalConfig) -> dict:
    """Each method's AUROC (with its problem-bootstrap interval) on the steps of each difficulty ``n``.

    AUROC is ``None`` where the steps of that ``n`` are all correct or all faulty; steps without an
    ``n`` (free-form tasks) are reported under ``"None"``.
    """
    out = {}
    n_values = scored["n"].to_numpy()
    nan = pd.isna(scored["n"]).to_numpy()
    for n in sorted({int(v) for v in n_values[~nan]}) + ([None] if nan.any() else []):
        m = nan if n is None else (~nan & (n_values == n))
        y = scored["faulty"].to_numpy()[m]
        row: dict = {"n_steps": int(m.sum()), "n_faulty": int(y.sum()), "methods": {}}
        both = 0 < y.sum() < len(y)
        boot = ProblemBootstrap(y, scored["problem_id"].to_numpy()[m], cfg.n_boot, cfg.seed) if both else None
        for name, s in scores.items():
            if boot is None:
                row["methods"][name] = {"auroc": None, "auroc_ci": None}
            else:
                row["methods"][name] = {"auroc": auroc(y, s[m]), "auroc_ci": list(boot.metric_ci(s[m])["auroc"])}
        out[str(n)] = row
    return out


def _paired(boot: ProblemBootstrap, a: np.ndarray, b: np.ndarray) -> dict:
    d = boot.paired_diff(a, b)
    return {"auroc_diff": d.diff, "ci": list(d.ci)}


def evaluate_task(table: pd.DataFrame, cfg: EvalConfig, text: TextInputs | None = None, progress: bool = False
                  ) -> tuple[TaskEvaluation, Scheme]:
    """Every method's metrics on one task's steps (out of fold or on a held-out split, ``cfg.scoring``),
    intervals by problem, paired differences against CRV, per-``n`` AUROC, the ablation, and the raw scores;
    with the scheme (folds) that scored them.

    With ``text`` (the traces and the reasoner) the PRM baselines are trained and scored too.
    """
    scheme = make_scheme(table, cfg)
    scored = table.iloc[scheme.scored].reset_index(drop=True)
    y, problems = scored["faulty"].to_numpy(), scored["problem_id"].to_numpy()
    scores, chosen = score_scheme(table, scheme, cfg, text, progress)
    boot = ProblemBootstrap(y, problems, cfg.n_boot, cfg.seed)
    methods = {name: method_metrics(y, s, boot) for name, s in scores.items()}
    paired = {name: _paired(boot, s, scores["crv"]) for name, s in scores.items() if name != "crv"}
    best_bb = max(BLACK_BOX, key=lambda m: methods[m]["auroc"])
    vs_confidence = {"baseline": best_bb, **_paired(boot, scores["crv_plus_confidence"], scores[best_bb])}
    fp = column_groups(table)["fingerprint"]
    ablation = {}
    for family, cols in feature_families(_n_layers(table)).items():
        keep = [c for c in fp if c not in cols]
        s = np.concatenate([fit_crv(table.iloc[tr], keep, cfg).predict_proba(table.iloc[te][keep])[:, 1]
                            for tr, te in scheme.fits])
        order = np.concatenate([te for _, te in scheme.fits])
        ablation[f"without_{family}"] = auroc(table["faulty"].to_numpy()[order], s)
    ms = [c.pop("ms_per_step", {}) for c in chosen]
    first_error = None
    if scheme.kind == "out_of_fold":  # thresholds are chosen on the other folds
        fold_of = {str(p): i for i, (_, te) in enumerate(scheme.fits) for p in table.iloc[te]["problem_id"].unique()}
        first_error = {name: first_error_localisation(traces_of(scored, s), fold_of, cfg.n_boot, cfg.seed)
                       for name, s in scores.items()}
    return TaskEvaluation(
        n_steps=int(len(table)),
        n_faulty=int(table["faulty"].sum()),
        n_problems=int(table["problem_id"].nunique()),
        n_test_steps=int(len(scored)),
        n_test_faulty=int(y.sum()),
        scoring=scheme.kind,
        folds=len(scheme.fits) if scheme.kind == "out_of_fold" else None,
        ci_method="problem_bootstrap",
        n_boot=int(len(boot.weights)),
        methods=methods,
        paired_vs_crv=paired,
        crv_plus_confidence_vs_best_confidence=vs_confidence,
        per_n=per_n(scored, scores, cfg),
        ablation_auroc=ablation,
        first_error=first_error,
        chosen_on_train=merge_chosen(chosen),
        ms_per_step={k: float(np.mean([m[k] for m in ms if k in m])) for k in dict.fromkeys(k for m in ms for k in m)},
        curves=Curves(y, scores, problems),
    ), scheme


def transfer(tables: dict[str, pd.DataFrame], schemes: dict[str, Scheme], cfg: EvalConfig) -> tuple[dict, dict]:
    """CRV trained on one task, scored on another's scored steps; and trained on both tasks' training rows
    of each fit, scored on each task's test rows of that fit (same number of fits per task)."""
    pairs, both = {}, {}
    fp = column_groups(next(iter(tables.values())))["fingerprint"]
    for src, tsrc in tables.items():
        clf = fit_crv(tsrc.iloc[schemes[src].fit_rows()], fp, cfg)
        for dst, tdst in tables.items():
            if dst != src:
                test = tdst.iloc[schemes[dst].scored]
                pairs[f"{src}->{dst}"] = auroc(test["faulty"].to_numpy(), clf.predict_proba(test[fp])[:, 1])
    if len(tables) > 1 and len({len(s.fits) for s in schemes.values()}) == 1:
        ys: dict[str, list] = {k: [] for k in tables}
        ss: dict[str, list] = {k: [] for k in tables}
        for i in range(len(next(iter(schemes.values())).fits)):
            joint = pd.concat([t.iloc[schemes[k].fits[i][0]] for k, t in tables.items()])
            clf = fit_crv(joint, fp, cfg)
            for k, t in tables.items():
                test = t.iloc[schemes[k].fits[i][1]]
                ys[k].append(test["faulty"].to_numpy())
                ss[k].append(clf.predict_proba(test[fp])[:, 1])
        both = {k: auroc(np.concatenate(ys[k]), np.concatenate(ss[k])) for k in tables}
    return pairs, both


def evaluate_table(table: pd.DataFrame, cfg: EvalConfig = EvalConfig(), text: TextInputs | None = None,
                   progress: bool = False) -> EvaluationResults:
    """Results for every task in the step table (tasks without enough faulty steps are reported as skipped).

    ``text`` enables the baselines that read the traces (the PRMs).
    """
    out = EvaluationResults(settings=asdict(cfg))
    tables, schemes = {}, {}
    for task, t in table.groupby("task", sort=True):
        t = t.reset_index(drop=True)
        try:
            out.tasks[str(task)], schemes[str(task)] = evaluate_task(t, cfg, text, progress)
        except ValueError as e:
            out.skipped[str(task)] = str(e)
            continue
        tables[str(task)] = t
    out.transfer, out.transfer_trained_on_both = transfer(tables, schemes, cfg) if len(tables) > 1 else ({}, {})
    return out


def stored_evaluation(table: pd.DataFrame, cfg: EvalConfig, path: str | Path, text: TextInputs | None = None,
                      progress: bool = False) -> EvaluationResults:
    """:func:`evaluate_table` of ``table`` (what its file holds: no curves), read back from ``path`` when
    that file holds the evaluation of a table of the same size under the same ``cfg``, else computed
    and written there; so a stop during a series of evaluations loses only the one in progress."""
    path = Path(path)
    key = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "with_text": text is not None,
           "n_steps": len(table), "n_faulty": int(table["faulty"].sum()),
           "problems": int(table["problem_id"].nunique())}
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return EvaluationResults.from_dict(stored["results"])
    results = json.loads(json.dumps(evaluate_table(table, cfg, text, progress).to_dict(), default=float))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "results": results}, indent=1) + "\n")
    tmp.replace(path)
    return EvaluationResults.from_dict(results)


def seed_spread(results: list[EvaluationResults]) -> dict[str, dict]:
    """Per task, each method's AUROC mean and standard deviation over evaluations of independent datasets
    (one :func:`evaluate_table` result per seed; ``ddof=1``)."""
    out: dict[str, dict] = {}
    tasks = dict.fromkeys(t for r in results for t in r.tasks)
    for task in tasks:
        runs = [r.tasks[task].methods for r in results if task in r.tasks]
        names = dict.fromkeys(m for run in runs for m in run)
        out[task] = {}
        for m in names:
            vals = [run[m]["auroc"] for run in runs if m in run]
            out[task][m] = {"auroc_mean": float(np.mean(vals)), "auroc_sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                            "n_seeds": len(vals), "aurocs": [float(v) for v in vals]}
    return out


def save_step_table(table: pd.DataFrame, run_dir: Path, graph_dir: Path | None) -> None:
    """The full step table in the run directory; the fingerprints (keys + fingerprint) next to the graphs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(run_dir / "steps.parquet", index=False)
    if graph_dir is not None:
        graph_dir.mkdir(parents=True, exist_ok=True)
        keys = ["problem_id", "task", "n", "step_index", "faulty"]
        table[keys + column_groups(table)["fingerprint"]].to_parquet(graph_dir / "fingerprints.parquet", index=False)
