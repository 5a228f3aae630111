"""Extraction throughput: local executor vs Ray with 1 and 2 workers on this machine (and the GPU when there is one).

    python benchmarks/scale.py

Extracts the step rows and pruned graphs (graph cap 1024, the evaluation setting) of the
reference solutions of 12 arithmetic problems with n = 5 (60 steps) into a fresh store each
time, and reports verified steps per second and the wall time (Ray: cluster start excluded,
actor start and model loading included). When CUDA is available it also times the local
executor on the GPU. Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.extract import LocalExecutor, RayExecutor, build_step_table
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output

RESULTS = Path(__file__).parent / "results"


def timed(att: Attributor, records, executor) -> dict:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        table = build_step_table(att, records, d, progress=False, executor=executor)
        wall = time.perf_counter() - start
    return {"steps": len(table), "wall_s": round(wall, 2), "steps_per_s": round(len(table) / wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/scale.py", *sys.argv[1:]])
    torch.set_num_threads(2)
    records = [label_output(p, p.completion) for p in generate_problems("arith", args.n, args.count, seed=5)]
    att = Attributor.load(config=AttributionConfig(max_feature_nodes=args.max_feature_nodes))
    out: dict = {"local": timed(att, records, LocalExecutor(progress=False))}
    print(f"local (2 threads): {out['local']}")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for workers in (1, 2):
            threads = 2 // workers
            res = timed(att, records, RayExecutor(num_workers=workers, batch_size=2, threads_per_worker=threads, progress=False))
            out[f"ray_{workers}"] = {**res, "threads_per_worker": threads}
            print(f"ray, {workers} worker(s) x {threads} thread(s): {out[f'ray_{workers}']}")
    finally:
        ray.shutdown()
    if torch.cuda.is_available():
        gpu_att = Attributor.load(config=AttributionConfig(max_feature_nodes=args.max_feature_nodes), device="cuda")
        out["gpu"] = {**timed(gpu_att, records, LocalExecutor(progress=False)), "device": torch.cuda.get_device_name()}
        print(f"gpu: {out['gpu']}")
    else:
        out["gpu"] = None
        out["gpu_note"] = "no GPU in this run (the device tool was not lent to this session); not measured"
    best = max(v["steps_per_s"] for k, v in out.items() if isinstance(v, dict))
    out["projection_100k_steps_hours_on_this_machine"] = round(100_000 / best / 3600, 1)
    out["settings"] = {"count": args.count, "n": args.n, "max_feature_nodes": args.max_feature_nodes, "cpus": 2}
    out["command"] = command
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'scale.json'}")


if __name__ == "__main__":
    main()
