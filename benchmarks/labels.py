"""How well rollout labels (Math-Shepherd) agree with crv's exact step labels, on the shipped reasoner.

    python benchmarks/labels.py                 # arith and bool, n=5,7,10 (where the reasoner errs), 40 problems each, 8 rollouts

The shipped reasoner solves fresh problems (greedy, as in the evaluation); its traces carry exact
programmatic labels. Each step is relabelled from N sampled continuations (``crv label``), and the
rollout labels are compared with the exact ones: precision and recall of "faulty", and how often a
trace's first faulty step is the same (both none counts as the same). Writes
``benchmarks/results/labels.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from crv.lm.encode import trace_encoder
from crv.lm.load import DEFAULT_MODEL_DIR, load_model
from crv.reasoner.generate import generate_records
from crv.reasoner.rollout_labels import RolloutConfig, label_with_rollouts
from crv.tasks.cot import generate_problems

RESULTS = Path(__file__).parent / "results"


def agreement(records, relabelled) -> dict:  # type: ignore[no-untyped-def]
    tp = fp = fn = steps = same_first = 0
    for r, d in zip(records, relabelled):
        for truth, est in zip(r.labels, d.hard):
            steps += 1
            tp += truth == 0 and est == 0
            fp += truth == 1 and est == 0
            fn += truth == 0 and est == 1
        same_first += r.first_error == d.record.first_error
    return {"n_traces": len(records), "n_steps": steps, "n_faulty": sum(r.labels.count(0) for r in records),
            "precision_faulty": round(tp / (tp + fp), 3) if tp + fp else None,  # None: undefined (nothing called faulty)
            "recall_faulty": round(tp / (tp + fn), 3) if tp + fn else None,
            "first_error_agreement": round(same_first / max(len(records), 1), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=40)
    ap.add_argument("--n", type=int, nargs="+", default=[5, 7, 10])
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--batch-size", type=int, default=256, help="sequences sampled at once (rollouts x steps)")
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/labels.py", *sys.argv[1:]])
    torch.set_num_threads(2)
    model, tok = load_model()
    encoder = trace_encoder(tok, DEFAULT_MODEL_DIR)
    out: dict = {}
    for task in ("arith", "bool"):
        problems = [p for n in args.n for p in generate_problems(task, n, args.count, seed=args.seed + n)]
        records = [r for r in generate_records(model, encoder, problems) if r.steps]
        relabelled = label_with_rollouts(model, encoder, records, RolloutConfig(args.rollouts, args.temperature, args.max_new_tokens, args.batch_size, seed=args.seed))
        out[task] = agreement(records, relabelled)
        print(task, out[task], flush=True)
    out.update({"rollouts": args.rollouts, "temperature": args.temperature, "n": args.n, "count_per_n": args.count,
                "command": command})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "labels.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
