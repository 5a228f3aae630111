"""The fine-tuned SmolLM2's error regime on fresh problems -> benchmarks/results/reasoner.json["smollm2"].

    crv finetune --model runs/smollm2 --out runs/smollm2-ft --steps 700 --eval-every 250 --threads 2
    python benchmarks/smollm2_regime.py --model runs/smollm2-ft --count 64 --ns 2 3 4 5 6 7

Greedy decoding in the model's own (short chat) prompt, so every error is its own; labels by crv's
checker. Per task and n: ``step_accuracy``, ``first_error_rate`` (share of traces with a faulty step),
``mean_tokens`` (prompt + completion), ``problems``; per task ``confidence_auroc``: how well the model's
own confidence (MaxProb, perplexity, entropy, energy) separates its faulty steps from its correct ones
(the paper's Llama-3.1-8B: MaxProb 61.9 on arithmetic; crv's 1M reasoner ~99). Records are kept in
``runs/smollm2-regime/records.jsonl`` (resumable: problems already generated are not generated again).
Other keys of reasoner.json are kept.
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

from crv.evaluate.confidence import confidence_aurocs, step_confidence
from crv.lm.encode import trace_encoder
from crv.lm.load import load_model
from crv.reasoner.generate import GenerationConfig, generate_records
from crv.tasks.cot import generate_problems
from crv.tasks.schema import read_records, write_records
from crv.tasks.stats import format_table, summarize_by

SEED = 4242  # disjoint from crv finetune's stream ("finetune:<seed>:<step>") and its held-out check (10_007)
RESULTS = Path(__file__).parent / "results" / "reasoner.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/smollm2-ft"))
    ap.add_argument("--tasks", nargs="+", default=["arith", "bool"])
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7])
    ap.add_argument("--count", type=int, default=64, help="problems per task and n")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("runs/smollm2-regime"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--key", default="smollm2")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    encoder = trace_encoder(tok, args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "records.jsonl"
    have = {r.problem_id: r for r in read_records(store)} if store.is_file() else {}
    problems = [p for task in args.tasks for n in args.ns for p in generate_problems(task, n, args.count, seed=SEED)]
    todo = [p for p in problems if p.problem_id not in have]
    start = time.time()
    for i in range(0, len(todo), 4 * args.batch_size):  # written as it goes: a stop loses one chunk at most
        chunk = todo[i : i + 4 * args.batch_size]
        for r in generate_records(model, encoder, chunk, GenerationConfig(batch_size=args.batch_size)):
            have[r.problem_id] = r
        write_records([have[p.problem_id] for p in problems if p.problem_id in have], store)
    gen_seconds = time.time() - start
    records = [have[p.problem_id] for p in problems]
    summary = summarize_by(records)
    print(format_table(summary))

    result: dict = {}
    for task in args.tasks:
        result[task] = {}
        recs = [r for r in records if r.task == task]
        for n in args.ns:
            s = summary[task][str(n)]
            rn = [r for r in recs if r.n == n]
            tokens = [encoder.encode_record(r).n_tokens for r in rn if r.steps]
            result[task][str(n)] = {"step_accuracy": round(s.step_accuracy, 4), "first_error_rate": round(s.first_error_rate, 4),
                                    "final_accuracy": round(s.final_accuracy, 4), "mean_tokens": round(sum(tokens) / max(len(tokens), 1), 1),
                                    "problems": len(rn), "steps": s.steps}
        rows = step_confidence(model, encoder, recs)
        result[task]["confidence_auroc"] = confidence_aurocs(rows)
        result[task]["confidence_steps"] = {"faulty": sum(r["faulty"] for r in rows), "total": len(rows)}
        print(task, "confidence AUROC", result[task]["confidence_auroc"], result[task]["confidence_steps"])
    ft = args.model / "adapter" / "crv_finetune.json"
    if ft.is_file():
        info = json.loads(ft.read_text())
        pr, cfg = info.get("progress", {}), info.get("config", {})
        result["finetune"] = {"steps": pr.get("step"), "tokens_seen": pr.get("tokens_seen"), "seconds": pr.get("seconds"),
                              "lora_rank": cfg.get("lora_rank"), "device": info.get("device", "cpu"), "command": info.get("command")}
    hardest = str(max(args.ns))
    result["targets"] = {
        "step_accuracy_ge_0.90_every_n": all(result[t][str(n)]["step_accuracy"] >= 0.90 for t in args.tasks for n in args.ns),
        "first_error_rate_in_0.10_0.40_at_hardest_n": {t: 0.10 <= result[t][hardest]["first_error_rate"] <= 0.40 for t in args.tasks},
    }
    result["model"] = str(args.model)
    result["generation_seconds"] = round(gen_seconds, 1)
    result["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    old[args.key] = result
    args.out.write_text(json.dumps(old, indent=2) + "\n")
    print(json.dumps(result["targets"]), f"wrote {args.out}[{args.key!r}]")


if __name__ == "__main__":
    main()
