"""Which fingerprint features carry CRV's signal, on each model (the paper's Figure 4 analogue).

    python benchmarks/importance.py                                   # the shipped reasoner (3 seeds' archives)
    python benchmarks/importance.py --model runs/smollm2-ft700 --transcoders models/smollm2-transcoders \\
        --key smollm2 --seeds 2027 --extra-target                     # the fine-tuned SmolLM2

Reads the committed evaluation data (records with their labels and the fingerprint archives of
``benchmarks/evaluation.py``): no graph is built, only the archive keys are recomputed (model and
transcoder checksums). Per task, on the pooled seeds: out-of-fold permutation importance of every
main-target fingerprint column and of each group of columns (:mod:`crv.evaluate.importance`; 5 folds
by problem, as the evaluation; intervals by problem). Traces not archived yet are left out (counted).

Writes ``benchmarks/results/evaluation.json[KEY][task]["importance"]`` (top level for the reasoner),
other keys kept, and ``benchmarks/results/importance[-KEY].png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
from crv.attribution.attributor import Attributor
from crv.evaluate.importance import permutation_importance
from crv.extract import FingerprintArchive, trace_keys
from crv.extract.steps import column_groups
from crv.tasks.schema import read_records

RESULTS = Path(__file__).parent / "results"


def task_table(att: Attributor, data_dirs: list[Path], task: str, extra: tuple[str, ...]) -> tuple[pd.DataFrame, int, int]:
    """Step rows (problem, label, fingerprint) of the archived traces of ``task``; traces archived and total."""
    rows, held, total = [], 0, 0
    for d in data_dirs:
        rec_path, arch_path = d / f"{task}-records.jsonl", d / f"{task}-fingerprints.parquet"
        if not rec_path.is_file() or not arch_path.is_file():
            continue
        recs = [r for r in read_records(rec_path) if r.steps]
        archive = FingerprintArchive(arch_path)
        for key, rec in zip(trace_keys(att, recs, extra_targets=extra), recs):
            total += 1
            fps = archive.get(key, len(rec.steps))
            if fps is None:
                continue
            held += 1
            for k, (fp, label) in enumerate(zip(fps, rec.labels)):
                rows.append({"problem_id": f"{d.name}/{rec.problem_id}", "n": rec.n, "step_index": k,
                             "faulty": label == 0, **fp})
    return pd.DataFrame(rows), held, total


def plot(sections: dict[str, dict], path: Path, title: str) -> None:
    """Horizontal bars of the groups' AUROC drops with their intervals, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sections), figsize=(5.5 * len(sections), 4), squeeze=False)
    for ax, (task, sec) in zip(axes[0], sections.items()):
        groups = sorted(sec["groups"].items(), key=lambda kv: kv[1]["auroc_drop"])
        names = [g.removeprefix("group:") for g, _ in groups]
        drops = [v["auroc_drop"] for _, v in groups]
        err = [[v["auroc_drop"] - v["ci"][0] for _, v in groups], [v["ci"][1] - v["auroc_drop"] for _, v in groups]]
        ax.barh(names, drops, xerr=err, color="#4c72b0", capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{title}: {task} (CRV AUROC {sec['intact_auroc']:.1f})")
        ax.set_xlabel("AUROC points lost, group permuted (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--transcoders", type=Path, default=None)
    ap.add_argument("--key", default=None, help="evaluation.json section (default: the reasoner's top level)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2027, 2028, 2029])
    ap.add_argument("--tasks", nargs="+", default=["arith", "bool"])
    ap.add_argument("--max-feature-nodes", type=int, default=1024, help="as the evaluation's graphs (part of the key)")
    ap.add_argument("--extra-target", nargs="*", default=["uncertain"],
                    help="the evaluation's extra step targets (part of the archive key; SmolLM2's: none)")
    ap.add_argument("--tables", type=Path, nargs="*", default=None,
                    help="step tables (parquet, <task>.parquet) to read instead of the archives, e.g. "
                         "runs/benchmark-evaluation-smollm2/seed-2027/arith.parquet")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=500)
    args = ap.parse_args()
    from crv.attribution.engine import AttributionConfig

    # the archives' keys need the model and set (checksums); step tables carry their rows already
    att = (None if args.tables is not None else
           Attributor.load(args.model, args.transcoders, AttributionConfig(max_feature_nodes=args.max_feature_nodes)))
    suffix = f"-{args.key}" if args.key else ""
    data_dirs = [Path(__file__).parent / "data" / f"evaluation{suffix}" / f"seed-{s}" for s in args.seeds]
    sections = {}
    for task in args.tasks:
        if args.tables is not None:  # complete step tables of the evaluation's run folder
            parts = [pd.read_parquet(p).assign(problem_id=lambda t, p=p: p.parent.name + "/" + t["problem_id"])
                     for p in args.tables if p.stem == task]
            table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
            held = total = int(table["problem_id"].nunique()) if parts else 0
        else:
            table, held, total = task_table(att, data_dirs, task, tuple(args.extra_target))  # type: ignore[arg-type]
        if table.empty or table["faulty"].nunique() < 2:
            print(f"{task}: {held} of {total} traces archived, nothing to score", flush=True)
            continue
        cols = column_groups(table)["fingerprint"]  # the keys (problem, n, step, label) are not among them
        singles, groups, intact = permutation_importance(table, cols, folds=args.folds, repeats=args.repeats,
                                                         n_boot=args.n_boot)
        sections[task] = {
            "intact_auroc": intact, "steps": len(table), "faulty": int(table["faulty"].sum()),
            "traces_archived": held, "traces": total,
            "groups": {g.name: g.to_dict() for g in groups},
            "top_columns": {i.name: i.to_dict() for i in singles[:12]},
            "columns": {i.name: round(i.auroc_drop, 3) for i in singles},
        }
        print(task, json.dumps({k: v for k, v in sections[task].items() if k != "columns"}, indent=1), flush=True)
    if not sections:
        raise SystemExit("no task had archived fingerprints")
    command = "python " + " ".join(["benchmarks/importance.py", *sys.argv[1:]])
    path = RESULTS / "evaluation.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    target = data.setdefault(args.key, {}) if args.key else data
    for task, sec in sections.items():
        target.setdefault(task, {})["importance"] = {**sec, "command": command}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)
    plot(sections, RESULTS / f"importance{suffix}.png", args.key or "reasoner")
    print(f"wrote {path} and {RESULTS / f'importance{suffix}.png'}")


if __name__ == "__main__":
    main()
