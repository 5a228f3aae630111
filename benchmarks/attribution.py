"""Attribution speed and agreement: crv per-trace vs crv per-step-from-scratch vs circuit-tracer 0.5.0.

    python benchmarks/attribution.py                 # needs the peer extra: pip install -e '.[peer]'
    python benchmarks/attribution.py --no-peer       # crv only
    python benchmarks/attribution.py --caps 1024 4096 --count 1   # the per-cap table and profile only

``--caps``: for each cap, ms per step graph of crv *including pruning and the fingerprint* (the
pipeline's unit of work) on 5- and 10-operator traces, circuit-tracer's ``attribute`` on the same
step prefixes, and where crv's time goes (``profile_ms_per_step``: forward, rows, greedy,
adjacency, logits, prune, fingerprint, at the largest cap), all in one run.

On the shipped reasoner + transcoders, arithmetic traces (reference chains of thought) of 5 and
10 operators, default settings (10 logits / 0.95 / 4096 features, batch 64). Per step graph:
- crv_trace: one forward pass and one row cache per trace (total trace time / steps);
- crv_prefix: a fresh TraceAttribution on the prefix ending at the step;
- circuit_tracer: ``circuit_tracer.attribute`` on the same prefix.
Also the worst relative adjacency difference vs circuit-tracer (max |A-B| / max |B|), and the
peak RSS of a fresh process building every step graph of one 10-operator trace.
Writes benchmarks/results/attribution.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import TraceAttribution
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output

RESULTS = Path(__file__).parent / "results" / "attribution.json"


def records(n: int, count: int, seed: int):
    return [label_output(p, p.completion) for p in generate_problems("arith", n, count, seed=seed)]


def memory_probe(n: int, seed: int) -> None:
    """Build every step graph of one n-operator trace; print the peak RSS in MB."""
    att = Attributor.load()
    for _ in att.iter_step_graphs(records(n, 1, seed)[0]):
        pass
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_rss(n: int, seed: int, threads: int) -> float:
    """Peak RSS (MB) of a fresh process that builds every step graph of one n-operator trace."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", str(n), "--seed", str(seed), "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]
    return float(out)


def every_step(tr, enc, n_steps: int) -> None:  # type: ignore[no-untyped-def]
    """crv's work per step of one traced record: graph, pruning, fingerprint (timed in ``tr.timer``)."""
    from crv.attribution.prune import prune
    from crv.fingerprint.features import fingerprint_summary
    from crv.fingerprint.summary import summarize

    for k in range(n_steps):
        g = tr.graph(pos=enc.last(k), step_index=k)
        with tr.timer("prune"):
            pr = prune(g)
        with tr.timer("fingerprint"):
            fingerprint_summary(summarize(g, pr))


def crv_pipeline_ms(att: Attributor, recs: list, profile: dict[str, float] | None = None) -> tuple[float, int]:
    """Total ms and steps of crv's step work over ``recs``: graph, pruning, fingerprint (one forward per trace)."""
    steps, start = 0, time.perf_counter()
    for rec in recs:
        tr, enc = att.trace_record(rec)
        every_step(tr, enc, len(rec.steps))
        steps += len(rec.steps)
        if profile is not None:
            for name, sec in tr.timer.totals.items():
                profile[name] = profile.get(name, 0.0) + 1000 * sec
    return 1000 * (time.perf_counter() - start), steps


def cap_table(att: Attributor, args: argparse.Namespace) -> tuple[dict, dict]:
    """``caps`` and ``profile_ms_per_step`` (see the module docstring)."""
    import dataclasses

    peer = None
    if not args.no_peer:
        from crv.testing.peer import CircuitTracerPeer
        from crv.lm.load import DEFAULT_MODEL_DIR
        from crv.transcoders.io import DEFAULT_TRANSCODER_DIR

        peer = CircuitTracerPeer.load(DEFAULT_MODEL_DIR, DEFAULT_TRANSCODER_DIR)
        peer.graph(att.encode_record(records(3, 1, args.seed)[0]).ids[:20], att.config)  # warm-up
    by_n = {n: records(n, args.count, args.seed) for n in (5, 10)}
    caps, profile = {}, {}
    for cap in args.caps:
        att.config = dataclasses.replace(att.config, max_feature_nodes=cap)
        row: dict = {}
        crv_pipeline_ms(att, by_n[5][:1])  # warm-up
        ct_ms = ct_steps = 0.0
        for n, recs in by_n.items():
            prof: dict[str, float] = {}
            ms, steps = crv_pipeline_ms(att, recs, prof)
            row[f"ms_per_step_{n}op"] = ms / steps
            if cap == max(args.caps) and n == 5:
                profile = {k: round(v / steps, 2) for k, v in sorted(prof.items(), key=lambda kv: -kv[1])}
                profile["total"] = round(ms / steps, 2)
            if peer is not None:
                for rec in recs:
                    enc = att.encode_record(rec)
                    for k in range(len(rec.steps)):
                        ct_ms += 1000 * peer.graph(enc.ids[: enc.last(k) + 1], att.config).seconds
                        ct_steps += 1
            print(json.dumps({"cap": cap, "n": n, "crv_ms_per_step": ms / steps}), flush=True)
        if peer is not None:
            crv_all = sum(row[f"ms_per_step_{n}op"] * sum(len(r.steps) for r in recs) for n, recs in by_n.items()) / ct_steps
            row["circuit_tracer_ms_per_step"] = ct_ms / ct_steps
            row["speedup_vs_circuit_tracer"] = row["circuit_tracer_ms_per_step"] / crv_all
        row["steps"] = {f"{n}op": sum(len(r.steps) for r in recs) for n, recs in by_n.items()}
        caps[str(cap)] = row
        print(json.dumps({cap: row}), flush=True)
    return caps, profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2, help="traces per difficulty")
    ap.add_argument("--ns", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--seed", type=int, default=5150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true", help="skip circuit-tracer")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--caps", type=int, nargs="+", default=None,
                    help="only the per-cap table (crv incl. prune + fingerprint vs circuit-tracer) and the profile, "
                         "merged into --out")
    ap.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true",
                    help="only re-measure the peak RSS of the largest n and update it in --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args.memory_probe, args.seed)
        return
    if args.memory_only:
        n = max(args.ns)
        result = json.loads(args.out.read_text())
        result["peak_rss_mb"] = {str(n): peak_rss(n, args.seed, args.threads)}
        result["peak_rss_command"] = "python benchmarks/attribution.py " + " ".join(sys.argv[1:])
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["peak_rss_mb"]))
        return

    att = Attributor.load()
    if args.caps:
        caps, profile = cap_table(att, args)
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        result.update({"caps": caps, "profile_ms_per_step": profile,
                       "caps_command": "python benchmarks/attribution.py " + " ".join(sys.argv[1:]),
                       "caps_note": "crv's ms per step graph include pruning and the fingerprint (one forward per "
                                    "trace); circuit-tracer's are its attribute call on each step's prefix; "
                                    f"profile at cap {max(args.caps)}, 5-operator traces; {args.threads} threads"})
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({"caps": caps, "profile_ms_per_step": profile}, indent=2))
        return
    cfg = att.config
    peer = None
    if not args.no_peer:
        from crv.testing.peer import CircuitTracerPeer, compare_graphs
        from crv.lm.load import DEFAULT_MODEL_DIR
        from crv.transcoders.io import DEFAULT_TRANSCODER_DIR

        peer = CircuitTracerPeer.load(DEFAULT_MODEL_DIR, DEFAULT_TRANSCODER_DIR)
        # warm-up (first nnsight trace compiles/allocates)
        peer.graph(att.encode_record(records(3, 1, args.seed)[0]).ids[:20], cfg)

    by_n: dict[str, dict] = {}
    worst_rel, all_same = 0.0, True
    totals = {"crv_trace": [0.0, 0], "crv_prefix": [0.0, 0], "circuit_tracer": [0.0, 0]}
    for n in args.ns:
        recs = records(n, args.count, args.seed)
        n_steps = sum(len(r.steps) for r in recs)
        # crv timings first, circuit-tracer afterwards: never interleaved, so neither disturbs the other
        start = time.perf_counter()
        for rec in recs:
            for _ in att.iter_step_graphs(rec):
                pass
        t_trace = time.perf_counter() - start
        prefixes = []
        for rec in recs:
            enc = att.encode_record(rec)
            prefixes += [enc.ids[: enc.last(k) + 1] for k in range(len(rec.steps))]
        start = time.perf_counter()
        for prefix in prefixes:
            TraceAttribution(att.model, att.transcoders, prefix, cfg).graph()
        t_prefix = time.perf_counter() - start
        t_ct = 0.0
        if peer is not None:
            for k, prefix in enumerate(prefixes):
                pg = peer.graph(prefix, cfg)
                t_ct += pg.seconds
                cmp = compare_graphs(TraceAttribution(att.model, att.transcoders, prefix, cfg).graph(), pg)
                worst_rel = max(worst_rel, cmp.max_rel_diff)
                all_same &= cmp.same_nodes
                print(f"n={n} graph {k}: {len(prefix)} tokens, circuit-tracer {pg.seconds:.1f} s, "
                      f"rel diff {cmp.max_rel_diff:.2e}, same nodes {cmp.same_nodes}", flush=True)
        row = {"steps": n_steps, "crv_trace": 1000 * t_trace / n_steps, "crv_prefix": 1000 * t_prefix / n_steps}
        if peer is not None:
            row["circuit_tracer"] = 1000 * t_ct / n_steps
        by_n[str(n)] = row
        for key, t in (("crv_trace", t_trace), ("crv_prefix", t_prefix), ("circuit_tracer", t_ct)):
            totals[key][0] += t
            totals[key][1] += n_steps
        print(json.dumps({n: row}), flush=True)

    ms = {k: (1000 * t / c if c else None) for k, (t, c) in totals.items()}
    if peer is None:
        ms["circuit_tracer"] = None
    probe_n = max(args.ns)
    rss = peak_rss(probe_n, args.seed, args.threads)
    result = {
        "ms_per_step": ms,
        "speedup_vs_circuit_tracer": (ms["circuit_tracer"] / ms["crv_trace"]) if peer is not None else None,
        "max_rel_diff_vs_circuit_tracer": worst_rel if peer is not None else None,
        "same_nodes_as_circuit_tracer": all_same if peer is not None else None,
        "by_n": by_n,
        "peak_rss_mb": {str(probe_n): rss},
        "settings": {"max_n_logits": cfg.max_n_logits, "desired_logit_prob": cfg.desired_logit_prob,
                     "max_feature_nodes": cfg.max_feature_nodes, "batch_size": cfg.batch_size,
                     "threads": args.threads, "traces_per_n": args.count},
        "command": "python benchmarks/attribution.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result = {**{k: v for k, v in old.items() if k in ("smollm2", "gpu", "caps", "profile_ms_per_step", "caps_command", "caps_note")}, **result}  # other benchmarks' keys are kept
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
