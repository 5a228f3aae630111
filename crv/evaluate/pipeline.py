"""The whole evaluation of a labelled dataset: graphs -> fingerprints -> classifiers -> report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from crv.attribution.attributor import Attributor
from crv.classify.model import StepClassifier
from crv.evaluate.crossfit import make_scheme
from crv.evaluate.methods import EvalConfig, TextInputs
from crv.evaluate.report import markdown_table, write_report
from crv.evaluate.results import EvaluationResults
from crv.evaluate.run import evaluate_table, save_step_table
from crv.extract.steps import column_groups, time_crv
from crv.extract import Executor, archive_fingerprints, build_step_table
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
    cost_sample: int = 8,
    executor: Executor | None = None,
    archive: str | Path | None = None,
) -> EvaluationResults:
    """Evaluate CRV and the baselines on ``records``; writes the step table, report files and classifiers.

    Each trace's rows and pruned graphs are stored in ``graph_dir`` as they are computed (a rerun
    or an interrupted run reuses them; see :mod:`crv.extract`); the report files
    (``report.md``, ``evaluation.json``, ``report.html``), ``steps.parquet`` and the CRV
    classifier of each task (``classifiers/<task>``: trained on all its steps out of fold, on the
    training split in split mode) go to ``run_dir``.
    A step table from an earlier run of the same records (``steps.parquet``) may be passed as ``table``.
    With ``archive`` (:mod:`crv.extract.archive`) traces it holds need no graphs, and the fingerprints of
    this run's traces are added to it (``graph_dir`` is then required).
    CRV's cost per step is timed from scratch on up to ``cost_sample`` test traces of each task
    (the PRMs' on all test traces), in the same run.
    """
    run_dir = Path(run_dir)
    graph_dir = Path(graph_dir) if graph_dir is not None else None
    if archive is not None and graph_dir is None:
        raise ValueError("a fingerprint archive is filled from the graph store: pass graph_dir too")
    if table is None:
        table = build_step_table(att, records, graph_dir, progress=progress, target=target, extra_targets=extra_targets,
                                 executor=executor, archive=archive)
        if archive is not None:
            archive_fingerprints(att, records, graph_dir, archive, target, extra_targets)  # type: ignore[arg-type]
    elif len(table) != sum(len(r.steps) for r in records):
        raise ValueError(f"the step table has {len(table)} rows but the records have {sum(len(r.steps) for r in records)} steps")
    save_step_table(table, run_dir, graph_dir)
    by_id = {r.problem_id: r for r in records}
    results = evaluate_table(table, config, TextInputs(att.model, att.encoder, by_id), progress=progress)
    results.extra["step_target"] = target
    results.extra["model"] = {"id": att.model_id, "prompt_format": att.prompt_format}
    fp = column_groups(table)["fingerprint"]
    for task, res in results.tasks.items():
        t = table[table["task"] == task].reset_index(drop=True)
        scheme = make_scheme(t, config)
        if cost_sample > 0:
            sample = [by_id[p] for p in list(dict.fromkeys(t.iloc[scheme.scored]["problem_id"]))[:cost_sample]]
            res.ms_per_step = {"crv": time_crv(att, sample, target), **res.ms_per_step}
        train = t.iloc[scheme.fit_rows()]
        StepClassifier(**config.classifier).fit(train[fp], train["faulty"].to_numpy()).save(run_dir / "classifiers" / task)
    results.extra["files"] = {k: str(v) for k, v in write_report(results, run_dir, command).items()}
    results.extra["markdown"] = markdown_table(results)
    return results
