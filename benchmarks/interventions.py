"""Intervention experiment on the powered evaluation's traces, flagged out of fold -> benchmarks/results/interventions.json.

    python benchmarks/interventions.py                      # the shipped reasoner, 3 seeds' traces
    python benchmarks/interventions.py --max-faulty 40      # a shorter run

The traces are the powered evaluation's (``benchmarks/data/evaluation/seed-*/``: the shipped reasoner's own
greedy traces, labelled by crv's checker, with their archived graph fingerprints). Each step is scored out of
fold: a CRV classifier (the shipped verifier's settings) is fitted on 4/5 of the problems and scores the rest,
so no step is flagged by a classifier that saw it. Flagged faulty steps then go through
:func:`crv.interventions.experiment.run_experiment`: three selection rules against matched controls, a
dose-response curve, harm on correct steps (a random sample, and the correct steps the verifier flags),
intervals from a bootstrap over problems. The full run (per-step rows, worked cases) goes to ``--run-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.classify.model import StepClassifier
from crv.extract import FingerprintArchive, trace_keys
from crv.interventions.experiment import (InterventionConfig, InterventionResults, TaskInterventions, markdown,
                                          run_experiment, write_results)
from crv.tasks.schema import read_records

RESULTS = Path(__file__).parent / "results" / "interventions.json"
DATA = Path(__file__).parent / "data" / "evaluation"


def out_of_fold_scores(att: Attributor, records: list, archive_paths: list[Path], folds: int = 5, seed: int = 0
                       ) -> dict[tuple[str, int], float]:
    """``{(problem_id, step): p_faulty}`` from a CRV classifier fitted on the other folds of problems."""
    rows = []
    for path in archive_paths:
        archive = FingerprintArchive(path)
        recs = [r for r in records if r.steps]
        for r, key in zip(recs, trace_keys(att, recs, extra_targets=("uncertain",))):
            fps = archive.get(key, len(r.steps))
            if fps is None:
                continue
            for k, fp in enumerate(fps):
                rows.append({"problem_id": r.problem_id, "step_index": k, "faulty": int(r.labels[k] == 0),
                             **{c: v for c, v in fp.items() if ":" not in c}})
    table = pd.DataFrame(rows).drop_duplicates(["problem_id", "step_index"])
    cols = [c for c in table.columns if c not in ("problem_id", "step_index", "faulty")]
    problems = table["problem_id"].unique()
    fold_of = dict(zip(problems, np.random.default_rng(seed).permutation(len(problems)) % folds))
    fold = table["problem_id"].map(fold_of).to_numpy()
    p = np.zeros(len(table))
    for f in range(folds):
        train, test = fold != f, fold == f
        clf = StepClassifier().fit(table.loc[train, cols], table.loc[train, "faulty"].to_numpy())
        p[test] = clf.predict_proba(table.loc[test, cols])[:, 1]
    return {(pid, int(k)): float(v) for pid, k, v in zip(table["problem_id"], table["step_index"], p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="*", default=[2027, 2028, 2029])
    ap.add_argument("--max-faulty", type=int, default=120, help="flagged faulty steps per task")
    ap.add_argument("--harm-steps", type=int, default=100, help="correct steps per harm sample and task")
    ap.add_argument("--edits", dest="k", type=int, default=3, help="features edited per arm")
    ap.add_argument("--factor", type=float, default=0.0)
    ap.add_argument("--rule", default="logit")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--max-feature-nodes", type=int, default=1024, help="the evaluation's graph cap (its archives' key)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/benchmark-interventions"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python " + shlex.join(["benchmarks/interventions.py", *sys.argv[1:]])
    att = Attributor.load(config=AttributionConfig(max_feature_nodes=args.max_feature_nodes))
    cfg = InterventionConfig(k=args.k, factor=args.factor, rule=args.rule, threshold=args.threshold,
                             max_faulty=args.max_faulty, harm_steps=args.harm_steps, seed=args.seed)
    start = time.time()
    results = InterventionResults(dataclasses.asdict(cfg))
    flagged_counts = {}
    for task in ("arith", "bool"):
        records = [r for s in args.seeds for r in read_records(DATA / f"seed-{s}" / f"{task}-records.jsonl")]
        scores = out_of_fold_scores(att, records, [DATA / f"seed-{s}" / f"{task}-fingerprints.parquet" for s in args.seeds])
        faulty = [(r.problem_id, len(r.steps) - 1) for r in records if r.steps and r.labels[-1] == 0]
        flagged_counts[task] = {"faulty": len(faulty), "flagged": sum(scores.get(f, 0) >= args.threshold for f in faulty)}
        print(task, flagged_counts[task], flush=True)
        # flagged faulty steps in a random order (problems from every seed and n), so --max-faulty samples them all
        done = args.run_dir / f"{task}.done.json"  # a finished task is kept: a rerun does the other one only
        settings = json.loads(json.dumps({"config": dataclasses.asdict(cfg), "seeds": args.seeds,
                                          "max_feature_nodes": args.max_feature_nodes}))  # as read back
        if done.is_file() and (kept := json.loads(done.read_text())).get("settings") == settings:
            results.tasks[task] = TaskInterventions.from_dict(kept["result"], kept.get("rows"))
            print(f"{task}: kept from {done}", flush=True)
            continue
        order = np.random.default_rng(args.seed).permutation(len(records))
        res = run_experiment(att, None, [records[i] for i in order], cfg, scores=scores).tasks[task]
        results.tasks[task] = res
        args.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = done.with_name(f".{done.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"settings": settings, "result": res.to_dict(), "rows": res.rows_dict()}, default=float) + "\n")
        os.replace(tmp, done)
    seconds = time.time() - start
    write_results(results, args.run_dir, command)
    print(markdown(results))
    out: dict = {}
    for task in ("arith", "bool"):
        out[task] = {**results.tasks[task].to_dict(), "flagged_out_of_fold": flagged_counts[task]}
    out["settings"] = {**results.settings, "seeds": args.seeds, "max_feature_nodes": args.max_feature_nodes,
                       "flags": "out of fold (5 folds over problems, CRV classifier at the shipped verifier's settings)",
                       "threads": args.threads, "seconds": round(seconds)}
    out["command"] = command
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out, indent=1, default=float) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
