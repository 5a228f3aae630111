"""Full evaluation of CRV against the baselines on reasoner-written CoT (arithmetic and boolean).

    python benchmarks/evaluation.py --count 80 --bool-count 150 --max-feature-nodes 1024

Generates fresh problems (seeded), lets the shipped reasoner solve them greedily, labels
every step, builds one attribution graph per step (cached under graphs/benchmark-evaluation/),
and writes benchmarks/results/evaluation.json (the issue's format, fractions in [0, 1]) and
benchmarks/results/evaluation.md (the table), plus the full run under runs/benchmark-evaluation/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.evaluate.methods import EvalConfig
from crv.evaluate.pipeline import run_evaluation
from crv.reasoner.generate import generate_records
from crv.tasks.cot import generate_problems
from crv.tasks.schema import read_records, write_records

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=80, help="arithmetic problems per n in {3, 5, 7, 10}")
    ap.add_argument("--bool-count", type=int, default=150, help="boolean problems per n in --bool-ns")
    ap.add_argument("--bool-ns", type=int, nargs="+", default=[10], help="boolean n (errors are rare below 10)")
    ap.add_argument("--seed", type=int, default=2027)
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-target", nargs="*", default=["uncertain"], help="also CRV on graphs at these step targets")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/benchmark-evaluation"))
    ap.add_argument("--graph-dir", type=Path, default=Path("graphs/benchmark-evaluation"))
    ap.add_argument("--reuse-steps", action="store_true",
                    help="reuse <run-dir>/steps.parquet of an earlier run on the same records (skips the graphs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/evaluation.py", *sys.argv[1:]])

    att = Attributor.load(config=AttributionConfig(max_feature_nodes=args.max_feature_nodes or None))
    records_path = args.run_dir / "records.jsonl"
    if records_path.is_file():
        records = read_records(records_path)
    else:
        problems = [p for n in (3, 5, 7, 10) for p in generate_problems("arith", n, args.count, seed=args.seed)]
        problems += [p for n in args.bool_ns for p in generate_problems("bool", n, args.bool_count, seed=args.seed)]
        records = generate_records(att.model, att.encoder, problems)
        write_records(records, records_path)
    steps_file = args.run_dir / "steps.parquet"
    table = pd.read_parquet(steps_file) if args.reuse_steps and steps_file.is_file() else None
    start = time.time()
    results = run_evaluation(records, att, args.run_dir, args.graph_dir, EvalConfig(), command=command,
                             extra_targets=tuple(args.extra_target), table=table)
    seconds = time.time() - start
    print(results["markdown"])

    out: dict = {}
    for task in ("arith", "bool"):
        r = results.get(task)
        if r is None:
            out[task] = {"skipped": results["skipped"].get(task, "no steps")}
            continue
        out[task] = {"n_steps": r["n_steps"], "n_faulty": r["n_faulty"], "n_test_steps": r["n_test_steps"],
                     "n_test_faulty": r["n_test_faulty"], "methods": r["methods"], "ablation_auroc": r["ablation_auroc"],
                     "chosen_on_train": r["chosen_on_train"], "ms_per_step": r.get("ms_per_step", {})}
    out["transfer"] = results["transfer"]
    out["transfer_trained_on_both"] = results["transfer_trained_on_both"]
    out["settings"] = {"max_feature_nodes": args.max_feature_nodes, "arith_count_per_n": args.count,
                       "bool_count_per_n": args.bool_count, "bool_ns": args.bool_ns, "seed": args.seed,
                       "threads": args.threads, "seconds": round(seconds),
                       "step_target": "last", "extra_targets": args.extra_target}
    out["command"] = command
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "evaluation.json").write_text(json.dumps(out, indent=2, default=float) + "\n")
    (RESULTS / "evaluation.md").write_text(f"# Evaluation\n\n`{command}`\n\n{results['markdown']}\n")
    print(f"wrote {RESULTS / 'evaluation.json'} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
