"""Attribution cost of two reasoner + transcoder pairs on the same machine and the same traces.

Tells a slower machine from a slower model: both pairs build the step graphs of the same canonical
5-operator traces, in alternating passes.

    python benchmarks/model_speed.py --other /tmp/old/models     # a dir holding reasoner/ and transcoders/
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", type=Path, required=True, help="models dir with reasoner/ and transcoders/")
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    records = [label_output(p, p.completion) for p in generate_problems("arith", 5, args.count, seed=5)]
    cfg = AttributionConfig(max_feature_nodes=args.max_feature_nodes)
    atts = {"shipped": Attributor.load(config=cfg),
            "other": Attributor.load(args.other / "reasoner", args.other / "transcoders", config=cfg)}
    for rep in range(args.passes):
        for name, att in atts.items():
            t0, n = time.perf_counter(), 0
            for r in records:
                n += sum(1 for _ in att.iter_step_graphs(r))
            print(f"pass {rep} {name}: {1000 * (time.perf_counter() - t0) / n:.1f} ms per step graph ({n} steps)")


if __name__ == "__main__":
    main()
