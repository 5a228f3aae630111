"""Intervention experiment on fresh reasoner-written traces, flagged by the shipped verifier.

    python benchmarks/interventions.py --count 40 --bool-count 100

Generates problems the verifier never saw (seed differs from the evaluation benchmark), lets
the shipped reasoner solve them, flags faulty steps with models/classifiers/default and runs
`crv.interventions.experiment` (targeted vs random-feature arms, harm on correct steps).
Writes benchmarks/results/interventions.json (the issue's format plus per-arm detail) and the
full run (per-step rows, worked examples) under runs/benchmark-interventions/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.classify.model import DEFAULT_CLASSIFIER, StepClassifier
from crv.interventions.experiment import InterventionConfig, markdown, run_experiment, write_results
from crv.reasoner.generate import generate_records
from crv.tasks.cot import generate_problems
from crv.tasks.schema import read_records, write_records

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=40, help="arithmetic problems per n in {5, 7, 10}")
    ap.add_argument("--bool-count", type=int, default=100, help="boolean problems at n = 10")
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--locate", default="uncertain")
    ap.add_argument("--positions", default="suspect")
    ap.add_argument("--max-faulty", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-dir", type=Path, default=Path("runs/benchmark-interventions"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/interventions.py", *sys.argv[1:]])

    clf = StepClassifier.load(args.classifier)
    cap = clf.meta.get("provenance", {}).get("attribution", {}).get("max_feature_nodes", 1024)
    att = Attributor.load(config=AttributionConfig(max_feature_nodes=cap))
    records_path = args.run_dir / "records.jsonl"
    if records_path.is_file():
        records = read_records(records_path)
    else:
        problems = [p for n in (5, 7, 10) for p in generate_problems("arith", n, args.count, seed=args.seed)]
        problems += generate_problems("bool", 10, args.bool_count, seed=args.seed)
        records = generate_records(att.model, att.encoder, problems)
        write_records(records, records_path)
    cfg = InterventionConfig(k=args.k, factor=args.factor, locate=args.locate, positions=args.positions, max_faulty=args.max_faulty)
    start = time.time()
    results = run_experiment(att, clf, records, cfg)
    seconds = time.time() - start
    write_results(results, args.run_dir, command)
    print(markdown(results))
    out: dict = {}
    for task in ("arith", "bool"):
        r = results.get(task)
        if r is None:
            out[task] = {"flagged_faulty": 0, "targeted_fix_rate": None, "random_fix_rate": None, "harm_rate": None}
            continue
        out[task] = {k: r[k] for k in ("flagged_faulty", "targeted_fix_rate", "random_fix_rate", "harm_rate", "faulty_steps",
                                       "reproduced", "harm_steps", "harm_rate_flagged", "harm_steps_flagged",
                                       "arms", "harm_by_arm")}
    out["settings"] = {**results["settings"], "arith_count_per_n": args.count, "bool_count": args.bool_count, "problem_seed": args.seed,
                       "classifier": str(args.classifier.relative_to(Path.cwd()) if args.classifier.is_relative_to(Path.cwd()) else args.classifier), "max_feature_nodes": cap, "threads": args.threads, "seconds": round(seconds)}
    out["command"] = command
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "interventions.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'interventions.json'} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
