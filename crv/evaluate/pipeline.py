"""The whole evaluation of a labelled dataset: graphs -> fingerprints -> classifiers -> report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from crv.attribution.attributor import Attributor
from crv.classify.model import StepClassifier
from crv.evaluate.methods import EvalConfig, split
from crv.evaluate.report import markdown_table, write_report
from crv.evaluate.run import evaluate_table, save_step_table
from crv.evaluate.steps import build_step_table, column_groups
from crv.tasks.schema import Record


def run_evaluation(
    records: list[Record],
    att: Attributor,
    run_dir: str | Path,
    graph_dir: str | Path | None = None,
    config: EvalConfig = EvalConfig(),
    command: str = "",
    progress: bool = True,
    target: str = "last",
    extra_targets: tuple[str, ...] = (),
    table: pd.DataFrame | None = None,
) -> dict:
    """Evaluate CRV and the baselines on ``records``; writes the step table, report files and classifiers.

    Graph summaries are cached in ``graph_dir`` (reused when present); the report files
    (``report.md``, ``evaluation.json``, ``report.html``), ``steps.parquet`` and the CRV
    classifier trained on each task's training split (``classifiers/<task>``) go to ``run_dir``.
    A step table from an earlier run of the same records (``steps.parquet``) may be passed as ``table``.
    """
    run_dir = Path(run_dir)
    graph_dir = Path(graph_dir) if graph_dir is not None else None
    if table is None:
        table = build_step_table(att, records, graph_dir, progress=progress, target=target, extra_targets=extra_targets)
    elif len(table) != sum(len(r.steps) for r in records):
        raise ValueError(f"the step table has {len(table)} rows but the records have {sum(len(r.steps) for r in records)} steps")
    save_step_table(table, run_dir, graph_dir)
    results = evaluate_table(table, config)
    results["step_target"] = target
    fp = column_groups(table)["fingerprint"]
    for task in [t for t in results if isinstance(results[t], dict) and "methods" in results[t]]:
        t = table[table["task"] == task].reset_index(drop=True)
        train_idx, _ = split(t, config)
        StepClassifier(config.classifier).fit(t.iloc[train_idx][fp], t.iloc[train_idx]["faulty"].to_numpy()).save(
            run_dir / "classifiers" / task)
    results["files"] = {k: str(v) for k, v in write_report(results, run_dir, command).items()}
    results["markdown"] = markdown_table(results)
    return results
