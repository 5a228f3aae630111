"""Quality of the shipped transcoders on held-out CoT -> benchmarks/results/transcoders.json.

    python benchmarks/transcoders.py
    python benchmarks/transcoders.py --transcoders runs/transcoders --out /tmp/t.json

Per layer: FVU, L0 and dead-feature fraction; for the replacement model (all MLPs
replaced at once): next-token argmax agreement and mean KL on CoT tokens.
Targets (issue 5): FVU <= 0.10 per layer, dead <= 10%, agreement >= 95%.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from crv.lm.load import DEFAULT_MODEL_DIR, load_model
from crv.lm.encode import trace_encoder
from crv.transcoders.activations import cot_sequences
from crv.transcoders.io import DEFAULT_TRANSCODER_DIR, load_transcoders
from crv.transcoders.metrics import layer_quality, replacement_quality

HELD_OUT_SEED = 424242  # training streams use the training seed (0 by default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--transcoders", type=Path, default=DEFAULT_TRANSCODER_DIR)
    ap.add_argument("--sequences", type=int, default=400, help="held-out CoT sequences (all tasks, n = 1..10)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transcoders.json")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--prompt-format", default=None, help="plain or chat (default: the model's own)")
    ap.add_argument("--key", default=None, help="write the figures under this key of --out, keeping the rest (e.g. smollm2)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    ts = load_transcoders(args.transcoders, model=model)
    encoder = trace_encoder(tok, args.model, args.prompt_format)
    seqs = cot_sequences(encoder, random.Random(HELD_OUT_SEED), args.sequences)
    layers = layer_quality(model, ts, seqs, tok.pad_token_id, batch=8)
    repl = replacement_quality(model, ts, seqs, tok.pad_token_id, batch=8)
    for q in layers:
        print(f"layer {q.layer}: FVU {q.fvu:.4f}  L0 {q.l0:.1f}  dead {q.dead_fraction:.3f}")
    print(f"replacement: argmax agreement {repl.argmax_agreement:.4f}  mean KL {repl.mean_kl:.5f}")
    ok = all(q.fvu <= 0.10 and q.dead_fraction <= 0.10 for q in layers) and repl.argmax_agreement >= 0.95
    result = {
        "layers": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(q).items()} for q in layers],
        "replacement": {"argmax_agreement": round(repl.argmax_agreement, 5), "mean_kl": round(repl.mean_kl, 6)},
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "train_command": ts.config.get("crv", {}).get("command"),
        "train_seconds": ts.config.get("crv", {}).get("seconds"),
        "k": ts.k,
        "d_transcoder": ts.shape.d_transcoder,
        "targets_met": ok,
        "prompt_format": encoder.format.name,
        "tokens_measured": sum(len(q) for q in seqs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.key:
        old = json.loads(args.out.read_text()) if args.out.is_file() else {}
        result = {**old, args.key: {**result, "model": str(args.model)}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"targets met: {ok}; wrote {args.out}")


if __name__ == "__main__":
    main()
