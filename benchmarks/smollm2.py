"""Attribution at real-model scale: SmolLM2-135M step graphs -- speed per cap, steadiness, the roofline.

    python benchmarks/smollm2.py                        # everything, circuit-tracer included (~30 min on 2 cores)
    python benchmarks/smollm2.py --peer-graphs 0        # crv only; circuit-tracer's figures kept from the file

The model and set are the fine-tuned SmolLM2 and its shipped transcoders (docs/your-model.md builds
``runs/smollm2-ft700``); the traces are the model's own arithmetic chat traces from the SmolLM2
evaluation's committed records (n = 5: about 100-150 tokens with the prompt), every step of each.

- ``caps``: per cap (1024, 4096) crv's ms per step graph as the pipeline does it (one forward pass per
  trace, then per step the graph, its pruning and its fingerprint), circuit-tracer 0.5.0's ``attribute``
  on the first ``--peer-graphs`` step prefixes of the same traces (same settings), the entry-wise
  comparison, and the process's peak RSS after crv's work (before circuit-tracer is loaded).
- ``roofline``: per component of a step graph, the floating-point operations counted from the shapes of
  every matrix product it runs (``torch.utils.flop_counter``), its ms (from the timed run, not the
  counted one), the rate achieved and its fraction of ``matmul_gflops``, the fp32 matrix-multiply rate of
  this machine measured in the same run (torch, ``--threads``).
- ``spread``: the same step graph built from scratch ``--repeats`` times in a fresh process, alone and
  while a second process keeps one core busy (a 1-thread fp32 matmul loop), with OpenMP's passive wait
  policy (crv's default) and, to show the cause, the active one: median ms and max / median.

Writes ``benchmarks/results/attribution.json`` key ``"smollm2"`` (other keys and this key's older
entries kept).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch
from torch.utils.flop_counter import FlopCounterMode

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig, TraceAttribution
from crv.attribution.prune import prune
from crv.fingerprint.features import fingerprint_summary
from crv.fingerprint.summary import summarize
from crv.tasks.schema import Record, read_records

sys.path.insert(0, str(Path(__file__).parent))
from attribution import every_step  # noqa: E402  (the pipeline's per-step work, timed the same way in both benchmarks)

RESULTS = Path(__file__).parent / "results" / "attribution.json"
RECORDS = Path(__file__).parent / "data" / "evaluation-smollm2" / "seed-2027" / "arith-records.jsonl"
COMPONENTS = ("forward", "logits", "greedy", "rows", "adjacency", "prune", "fingerprint")
BUSY = "import torch; torch.set_num_threads(1); a = torch.randn(1024, 1024)\nwhile True: a @ a"


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """This machine's fp32 matrix-multiply rate (GFLOP/s) with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def step_work(att: Attributor, rec: Record, count_flops: bool = False) -> tuple[dict[str, float], dict[str, int], int]:
    """Every step of one trace as the pipeline does it; (seconds, flops) per component and the number of steps."""
    counter = FlopCounterMode(display=False) if count_flops else None
    if counter is not None:
        counter.__enter__()
    try:
        before = counter.get_total_flops() if counter is not None else 0
        t0 = time.perf_counter()
        tr, enc = att.trace_record(rec)
        forward_s = time.perf_counter() - t0 - tr.timer.totals.get("forward", 0.0)  # encoding, outside the timer
        forward_flops = (counter.get_total_flops() - before) if counter is not None else 0
        if counter is not None:
            tr.timer.count_with(counter.get_total_flops)
        every_step(tr, enc, len(rec.steps))
    finally:
        if counter is not None:
            counter.__exit__(None, None, None)
    seconds = dict(tr.timer.totals)
    seconds["forward"] = seconds.get("forward", 0.0) + forward_s
    flops = dict(tr.timer.flops)
    flops["forward"] = forward_flops
    return seconds, flops, len(rec.steps)


def spread_worker(args: argparse.Namespace) -> None:
    """(In a fresh process) build one step graph from scratch ``--repeats`` times; print the ms of each as JSON."""
    torch.set_num_threads(args.threads)
    att = Attributor.load(args.model, args.transcoders, AttributionConfig(max_feature_nodes=args.spread_cap))
    rec = traces(args.traces)[0]
    times = []
    for _ in range(args.repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        tr, enc = att.trace_record(rec)
        g = tr.graph(pos=enc.last(0), step_index=0)
        fingerprint_summary(summarize(g, prune(g)))
        times.append(1000 * (time.perf_counter() - start))
    print(json.dumps({"ms": times[1:], "tokens": enc.last(0) + 1}))


def spread(args: argparse.Namespace, policy: str, busy: bool, repeats: int) -> dict:
    """Run :func:`spread_worker` in a fresh process under an OpenMP wait policy, with or without a busy core."""
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    hog = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        time.sleep(1.0 if busy else 0.0)
        out = subprocess.run([sys.executable, __file__, "--spread-worker", "--model", str(args.model),
                              "--transcoders", str(args.transcoders), "--threads", str(args.threads),
                              "--repeats", str(repeats), "--spread-cap", str(args.spread_cap)],
                             env=env, check=True, capture_output=True, text=True).stdout
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    ms = json.loads(out.strip().splitlines()[-1])["ms"]
    med = statistics.median(ms)
    row = {"omp_wait_policy": policy, "busy_process": busy, "graphs": len(ms), "median_ms": med,
           "max_ms": max(ms), "spread_max_over_median": max(ms) / med, "ms": [round(m, 1) for m in ms]}
    print(json.dumps({k: v for k, v in row.items() if k != "ms"}), flush=True)
    return row


def traces(count: int) -> list[Record]:
    return [r for r in read_records(RECORDS) if r.steps and r.n == 5][:count]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/smollm2-ft700"))
    ap.add_argument("--transcoders", type=Path, default=Path("models/smollm2-transcoders"))
    ap.add_argument("--caps", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--traces", type=int, default=4, help="traces whose every step crv builds, per cap")
    ap.add_argument("--peer-graphs", type=int, default=1,
                    help="step prefixes also built by circuit-tracer per cap; 0 keeps its figures already in --out")
    ap.add_argument("--repeats", type=int, default=20, help="graphs per spread measurement")
    ap.add_argument("--spread-cap", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--spread-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.spread_worker:
        return spread_worker(args)

    rate = matmul_gflops(args.threads)
    print(f"fp32 matmul: {rate:.1f} GFLOP/s on {args.threads} threads", flush=True)
    att = Attributor.load(args.model, args.transcoders)
    recs = traces(args.traces)
    n_steps = sum(len(r.steps) for r in recs)
    tokens = [att.encode_record(r).last(len(r.steps) - 1) + 1 for r in recs]
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    kept = old.get("smollm2", {})
    caps, roofline = {}, {}
    for cap in args.caps:
        att.config = AttributionConfig(max_feature_nodes=cap)
        step_work(att, recs[0])  # warm-up
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        for rec in recs:
            s, _, _ = step_work(att, rec)
            for k, v in s.items():
                seconds[k] = seconds.get(k, 0.0) + v
        ms = 1000 * (time.perf_counter() - start) / n_steps
        _, flops, steps0 = step_work(att, recs[0], count_flops=True)  # shapes are the same whether timed or counted
        s0, _, _ = step_work(att, recs[0])
        roofline[str(cap)] = {
            c: {"gflop": flops.get(c, 0) / 1e9 / steps0, "ms": 1000 * s0.get(c, 0.0) / steps0,
                "gflops_achieved": flops.get(c, 0) / 1e9 / max(s0.get(c, 0.0), 1e-9),
                "fraction_of_matmul_rate": flops.get(c, 0) / 1e9 / max(s0.get(c, 0.0), 1e-9) / rate}
            for c in COMPONENTS}
        caps[str(cap)] = {"ms_per_step": ms, "tokens": statistics.mean(tokens), "tokens_max": max(tokens),
                          "steps_timed": n_steps, "traces": len(recs),
                          "profile_ms_per_step": {k: round(1000 * v / n_steps, 1) for k, v in seconds.items()},
                          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        print(json.dumps({cap: caps[str(cap)], "roofline": roofline[str(cap)]}), flush=True)

    spreads = {"alone": spread(args, "PASSIVE", False, args.repeats), "shared": spread(args, "PASSIVE", True, args.repeats),
               "shared_active_wait": spread(args, "ACTIVE", True, max(3, args.repeats // 4))}
    if args.peer_graphs:
        from crv.testing.peer import CircuitTracerPeer, compare_graphs

        peer = CircuitTracerPeer.load(args.model, args.transcoders)
        prefixes = []
        for r in recs:
            enc = att.encode_record(r)
            prefixes += [enc.ids[: enc.last(k) + 1] for k in range(len(r.steps))]
        prefixes = prefixes[: args.peer_graphs]
        for cap in args.caps:
            att.config = AttributionConfig(max_feature_nodes=cap)
            ct_s, worst, same = [], 0.0, True
            for ids in prefixes:
                pg = peer.graph(ids, att.config)
                cmp = compare_graphs(TraceAttribution(att.model, att.transcoders, ids, att.config).graph(), pg)
                ct_s.append(pg.seconds)
                worst, same = max(worst, cmp.max_rel_diff), same and cmp.same_nodes
                print(f"cap {cap}: {len(ids)} tokens, circuit-tracer {pg.seconds:.1f} s, rel diff {cmp.max_rel_diff:.2e}, "
                      f"same nodes {cmp.same_nodes}", flush=True)
            ct_ms = 1000 * statistics.mean(ct_s)
            caps[str(cap)].update({"circuit_tracer_ms_per_step": ct_ms, "circuit_tracer_graphs": len(prefixes),
                                   "circuit_tracer_tokens": [len(p) for p in prefixes],
                                   "max_rel_diff_vs_circuit_tracer": worst, "same_nodes_as_circuit_tracer": same})
        # circuit-tracer's slowdown on the shared machine, on the first prefix at the smallest cap
        att.config = AttributionConfig(max_feature_nodes=min(args.caps))
        hog = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            shared_s = peer.graph(prefixes[0], att.config).seconds
        finally:
            hog.kill()
            hog.wait()
        spreads["circuit_tracer_shared_slowdown"] = 1000 * shared_s / caps[str(min(args.caps))]["circuit_tracer_ms_per_step"]
    for cap, row in caps.items():
        old_cap = kept.get("caps", {}).get(cap, {})
        ct = row.get("circuit_tracer_ms_per_step", old_cap.get("circuit_tracer_ms_per_step"))
        row["circuit_tracer_ms_per_step"] = ct
        row["circuit_tracer_rerun"] = bool(args.peer_graphs)
        row["speedup_vs_circuit_tracer"] = ct / row["ms_per_step"] if ct else None
        row["spread_max_over_median"] = spreads["alone"]["spread_max_over_median"]
    spreads["shared_slowdown"] = spreads["shared"]["median_ms"] / spreads["alone"]["median_ms"]
    command = "python " + " ".join(["benchmarks/smollm2.py", *sys.argv[1:]])
    smallest = caps[str(min(args.caps, key=int))]
    result = {**kept, "caps": {**kept.get("caps", {}), **caps}, "roofline": roofline[str(min(args.caps))],
              "roofline_by_cap": roofline, "matmul_gflops": rate, "spread": spreads,
              "ms_per_step_crv": smallest["ms_per_step"], "circuit_tracer_ms_per_step": smallest["circuit_tracer_ms_per_step"],
              "speedup_vs_circuit_tracer": smallest["speedup_vs_circuit_tracer"],
              "model": str(args.model), "transcoders": str(args.transcoders), "threads": args.threads,
              "prompt_format": att.prompt_format, "command": command,
              "note": "ms_per_step: one forward per trace, then per step graph + pruning + fingerprint (the pipeline's "
                      "unit), over every step of the traces; circuit-tracer: its attribute on the first step prefixes; "
                      "roofline gflop per step graph counted from matrix-product shapes (torch.utils.flop_counter)"}
    args.out.write_text(json.dumps({**old, "smollm2": result}, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("caps",)}, indent=1)[:4000])


if __name__ == "__main__":
    main()
