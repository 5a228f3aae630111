"""Measure the reasoner's error regime on fresh problems -> benchmarks/results/reasoner.json.

    python benchmarks/reasoner.py                      # the shipped model, 300 problems per (task, n)
    python benchmarks/reasoner.py --model runs/reasoner/checkpoints/step001200 --out /tmp/r.json

Greedy decoding, so every error is the model's own. Targets (issue 4): step
accuracy >= 0.90 at every n in {3,5,7,10} and first-error rate at n=10 in
[0.10, 0.40], for arithmetic and boolean each.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from crv.reasoner.generate import GenerationConfig, generate_records
from crv.lm.encode import trace_encoder
from crv.lm.load import DEFAULT_MODEL_DIR, load_model
from crv.tasks.cot import generate_problems
from crv.tasks.stats import format_table, summarize_by

NS = (3, 5, 7, 10)
SEED = 2806  # disjoint from the training stream, which draws from random.Random(train seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--count", type=int, default=300, help="problems per task and n")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reasoner.json")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    problems = [p for task in ("arith", "bool") for n in NS for p in generate_problems(task, n, args.count, seed=SEED)]
    start = time.time()
    records = generate_records(model, trace_encoder(tok, args.model), problems, GenerationConfig(batch_size=100))
    seconds = time.time() - start
    summary = summarize_by(records)
    print(format_table(summary))
    print(f"{len(records)} traces in {seconds:.0f} s")

    training = {}
    info = args.model / "crv_training.json"
    if info.is_file():
        training = json.loads(info.read_text())
    result: dict = {}
    ok = True
    for task in ("arith", "bool"):
        result[task] = {}
        for n in NS:
            s = summary[task][str(n)]
            result[task][str(n)] = {
                "steps": s.steps,
                "step_accuracy": round(s.step_accuracy, 4),
                "first_error_rate": round(s.first_error_rate, 4),
                "final_accuracy": round(s.final_accuracy, 4),
            }
            ok &= s.step_accuracy >= 0.90
        fer10 = summary[task]["10"].first_error_rate
        ok &= 0.10 <= fer10 <= 0.40
    result["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    result["train_command"] = training.get("command", "unknown")
    result["train_seconds"] = training.get("seconds")
    result["model"] = str(args.model)
    result["targets_met"] = bool(ok)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"targets met: {ok}; wrote {args.out}")


if __name__ == "__main__":
    main()
