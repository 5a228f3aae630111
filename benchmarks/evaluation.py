"""Full evaluation of CRV against the baselines on reasoner-written CoT (arithmetic and boolean).

    python benchmarks/evaluation.py                      # build what is missing, then evaluate
    python benchmarks/evaluation.py --build-only         # graphs and step tables only (resumable)
    python benchmarks/evaluation.py --records-only       # solve and label the problems only
    python benchmarks/evaluation.py --archive-only       # graph store -> committed fingerprint archives
    python benchmarks/evaluation.py --model runs/smollm2-ft700 --transcoders runs/smollm2-ft-transcoders \
        --key smollm2 --arith 4=300 5=300 --bool 6=200 --seeds 2027   # another model: evaluation.json["smollm2"]

Several processes (or machines sharing the graph store) build one seed's graphs together with
``--shard I/N`` (each computes every N-th trace from the I-th and stores it); a final
``--build-only`` then assembles the step tables from the store. ``--device cuda`` puts the model,
the transcoders and the engine on a GPU.

Three datasets of fresh problems (one per ``--seeds`` value; counts per n below, weighted to
n = 7 and 10 where the shipped reasoner errs most), solved greedily by the shipped reasoner
and labelled; one attribution graph per step (at its last token and at its least confident
token), stored as computed in ``graphs/benchmark-evaluation/``; each seed's step table goes to
``runs/benchmark-evaluation/seed-<s>/<task>.parquet`` once complete.

A run may span sessions and machines: the records and the fingerprints of every trace built so
far (``--archive-only``, a few MB) are kept in ``benchmarks/data/evaluation/seed-<s>/``, which is
committed, while the graph store is not. A later build computes graphs only for the traces the
archives lack; the other columns of the archived traces (black-box scores, transcoder
statistics, hidden states) come from one forward pass each (:mod:`crv.extract.archive`). Then every method is scored out of fold (5 folds over problems) on the pooled
datasets of the seeds whose tables are complete, with intervals by problem and paired
differences to CRV, and once per seed for the spread across datasets (each seed's evaluation is kept in
``runs/benchmark-evaluation/seed-<s>/evaluation.json``, so a stop among them loses only the one in progress;
``--seed-prm`` trains the PRMs in them too).

Writes benchmarks/results/evaluation.json (fractions in [0, 1]), benchmarks/results/evaluation.md
and the full report (report.md, report.html, summary.png) under runs/benchmark-evaluation/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.evaluate.methods import EvalConfig, TextInputs
from crv.evaluate.pipeline import run_evaluation
from crv.evaluate.prm import PRMConfig
from crv.evaluate.report import markdown_table, models_png, write_report
from crv.evaluate.results import EvaluationResults
from crv.evaluate.run import seed_spread, stored_evaluation
from crv.extract import FingerprintArchive, archive_fingerprints, build_step_table, trace_keys
from crv.reasoner.generate import generate_records
from crv.tasks.cot import generate_problems
from crv.tasks.sampling import case_control
from crv.tasks.schema import Record, read_records, write_records

RESULTS = Path(__file__).parent / "results"
KEEP = ("n_steps", "n_faulty", "n_problems", "n_test_steps", "n_test_faulty", "scoring", "folds", "ci_method", "n_boot",
        "methods", "paired_vs_crv", "crv_plus_confidence_vs_best_confidence", "per_n", "ablation_auroc",
        "first_error", "chosen_on_train", "ms_per_step")


def counts(spec: list[str]) -> dict[int, int]:
    """``["3=40", "10=600"]`` -> ``{3: 40, 10: 600}``."""
    try:
        return {int(k): int(v) for k, v in (s.split("=") for s in spec)}
    except ValueError:
        raise SystemExit(f"counts are n=count pairs such as 7=400, not {spec}") from None


def task_ratio(spec: str) -> tuple[str, float]:
    """``"bool=1"`` -> ``("bool", 1.0)``."""
    key, _, value = spec.partition("=")
    try:
        return key, float(value)
    except ValueError:
        raise SystemExit(f"expected TASK=RATIO such as bool=1, not {spec!r}") from None


def shard(spec: str) -> tuple[int, int]:
    """``"3/8"`` -> ``(3, 8)``: the 4th of 8 shards."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shard is I/N such as 0/8, not {spec!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard {spec}: I must be in 0..N-1")
    return i, n


def seed_records(att: Attributor, task: str, per_n: dict[int, int], seed: int, path: Path,
                 chunk: int = 256) -> list[Record]:
    """The seed's solved and labelled problems of one task: the first ``count`` problems of each n.

    Problems come in a fixed order per (task, n, seed), so a file written with smaller counts is
    extended (only the new problems are solved and appended) and one written with larger counts
    is read in part; a file whose problems are not this seed's is an error, never mixed in.
    """
    stored = read_records(path) if path.is_file() else []
    by_n: dict[int | None, list[Record]] = defaultdict(list)
    for r in stored:
        by_n[r.n].append(r)
    missing = []
    for n, c in per_n.items():
        problems = generate_problems(task, n, max(c, len(by_n[n])), seed=seed)
        have = [r.problem_id for r in by_n[n]]
        if have != [p.problem_id for p in problems[: len(have)]]:
            raise SystemExit(f"{path} does not hold the {task} problems of seed {seed} at n={n} in order; "
                             "move it away to generate them afresh")
        missing += problems[len(have):c]
    for start in range(0, len(missing), chunk):  # written after each chunk: a stop loses at most one
        new = generate_records(att.model, att.encoder, missing[start:start + chunk])
        stored += new
        write_records(stored, path)
        for r in new:
            by_n[r.n].append(r)
        print(f"{path.name}: {start + len(new)} of {len(missing)} new problems solved", flush=True)
    return [r for n, c in per_n.items() for r in by_n[n][:c]]


def complete_table(records: list[Record], path: Path) -> pd.DataFrame | None:
    """The stored step table of one seed's task if it covers every step of ``records``."""
    if path.is_file():
        table = pd.read_parquet(path)
        if len(table) == sum(len(r.steps) for r in records if r.steps):
            return table
    return None


def seed_table(att: Attributor, records: list[Record], path: Path, graph_dir: Path, extra: tuple[str, ...],
               archive: Path) -> pd.DataFrame:
    """The step table of one seed's task: read back when complete, else built (resuming from the graph store,
    graphs only for traces the fingerprint archive lacks), and its fingerprints archived."""
    table = complete_table(records, path)
    if table is not None:
        return table
    table = build_step_table(att, records, graph_dir, extra_targets=extra, archive=archive)
    archive_fingerprints(att, records, graph_dir, archive, extra_targets=extra)
    tmp = path.with_suffix(".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arith", nargs="*", default=["3=40", "5=60", "7=400", "10=600"],
                    help="arithmetic problems per n, per seed (none: boolean only)")
    ap.add_argument("--bool", nargs="*", default=["3=20", "5=20", "7=40", "10=400"],
                    help="boolean problems per n, per seed (none: arithmetic only)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2027, 2028, 2029], help="one fresh dataset per seed")
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--prm-epochs", type=int, default=PRMConfig().epochs, help="0: no PRM baselines")
    ap.add_argument("--seed-prm", action="store_true", help="also train the PRMs in each per-seed evaluation (slow)")
    ap.add_argument("--extra-target", nargs="*", default=["uncertain"], help="also CRV on graphs at these step targets")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the shipped reasoner)")
    ap.add_argument("--transcoders", type=Path, default=None, help="its transcoder set (default: the shipped one)")
    ap.add_argument("--key", default=None,
                    help="write the figures under evaluation.json[KEY] (another model's section; the shipped reasoner's "
                         "top-level keys are kept) and use <dir>-KEY for the default run, graph and data directories")
    ap.add_argument("--run-dir", type=Path, default=None, help="default: runs/benchmark-evaluation[-KEY]")
    ap.add_argument("--graph-dir", type=Path, default=None, help="default: graphs/benchmark-evaluation[-KEY]")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="records and fingerprint archives per seed (committed: a later session rebuilds the tables "
                         "from them with forward passes only)")
    ap.add_argument("--archive-only", action="store_true",
                    help="add the graph store's fingerprints to the archives (while shards run, or before a session ends)")
    ap.add_argument("--build-only", action="store_true", help="build the records, graphs and step tables, then stop")
    ap.add_argument("--records-only", action="store_true", help="solve and label the problems, then stop")
    ap.add_argument("--shard", type=shard, default=None, metavar="I/N",
                    help="store the graphs of every N-th trace from the I-th (0-based) and stop; no step table")
    ap.add_argument("--case-control", nargs="*", default=[], metavar="TASK=RATIO",
                    help="for a task the model rarely errs on (e.g. bool=1): score every trace with an error and RATIO "
                         "times as many error-free ones per n (crv.tasks.sampling); generate many problems with the counts")
    ap.add_argument("--merge", nargs="+", default=None, metavar="KEY",
                    help="evaluate, then replace only these keys of each task's stored section (e.g. first_error, "
                         "added after the stored run), after checking that every method both runs scored has the "
                         "stored AUROC; everything else stored stays (e.g. PRMs not retrained: --prm-epochs 0)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--evaluate-only", action="store_true",
                    help="build nothing: evaluate the seeds whose step tables are complete (an unfinished build's progress)")
    args = ap.parse_args()
    if sum([args.build_only, args.records_only, args.evaluate_only, args.archive_only, args.shard is not None]) > 1:
        ap.error("--build-only, --records-only, --evaluate-only, --archive-only and --shard are exclusive")
    torch.set_num_threads(args.threads)
    suffix = f"-{args.key}" if args.key else ""
    args.run_dir = args.run_dir or Path(f"runs/benchmark-evaluation{suffix}")
    args.graph_dir = args.graph_dir or Path(f"graphs/benchmark-evaluation{suffix}")
    args.data_dir = args.data_dir or Path(__file__).parent / "data" / f"evaluation{suffix}"
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/evaluation.py", *sys.argv[1:]])
    extra = tuple(args.extra_target)
    att = Attributor.load(args.model, args.transcoders, AttributionConfig(max_feature_nodes=args.max_feature_nodes or None),
                          device=args.device)
    tasks = {t: c for t, c in (("arith", counts(args.arith)), ("bool", counts(args.bool))) if c}
    if not tasks:
        ap.error("no problems: give --arith or --bool counts")
    ratios = dict(task_ratio(x) for x in args.case_control)
    if set(ratios) - set(tasks):
        ap.error(f"--case-control names tasks without problems: {sorted(set(ratios) - set(tasks))}")
    designs: dict[str, dict] = {}

    start = time.time()
    records: dict[int, list[Record]] = {}
    tables: dict[int, pd.DataFrame] = {}
    for seed in args.seeds:
        d, data = args.run_dir / f"seed-{seed}", args.data_dir / f"seed-{seed}"
        d.mkdir(parents=True, exist_ok=True)
        data.mkdir(parents=True, exist_ok=True)
        if args.shard is not None and not all((data / f"{t}-records.jsonl").is_file() for t in tasks):
            raise SystemExit(f"seed {seed} has no records yet: run --records-only first (shards never generate them)")
        if (args.evaluate_only or args.archive_only) and not all((data / f"{t}-records.jsonl").is_file() for t in tasks):
            print(f"seed {seed}: not generated yet, left out", flush=True)
            continue
        recs = {t: seed_records(att, t, c, seed, data / f"{t}-records.jsonl") for t, c in tasks.items()}
        for t, ratio in ratios.items():
            if not args.records_only:
                recs[t], design = case_control(recs[t], ratio)
                designs.setdefault(t, {})[str(seed)] = design.to_dict()
                print(f"seed {seed}: {t} case-control: {design.with_error} of {design.generated} traces err, "
                      f"{design.kept_clean} of {design.clean} error-free kept", flush=True)
        print(f"seed {seed}: " + ", ".join(f"{t} {len(r)} traces" for t, r in recs.items()), flush=True)
        if args.records_only:
            continue
        if args.archive_only:
            for t in tasks:
                held, total = archive_fingerprints(att, recs[t], args.graph_dir, data / f"{t}-fingerprints.parquet",
                                                   extra_targets=extra)
                print(f"seed {seed}: {t} archive holds {held} of {total} traces", flush=True)
            continue
        if args.shard is not None:  # every N-th trace from the I-th, less those archived (--build-only reads them)
            i, n = args.shard
            for t in tasks:
                archive = FingerprintArchive(data / f"{t}-fingerprints.parquet")
                with_steps = [r for r in recs[t] if r.steps]
                mine = [r for r, k in list(zip(with_steps, trace_keys(att, with_steps, extra_targets=extra)))[i::n]
                        if k not in archive]
                print(f"seed {seed}: {t} shard {i}/{n}: {len(mine)} traces not archived", flush=True)
                if mine:
                    build_step_table(att, mine, args.graph_dir, extra_targets=extra)
            continue
        if args.evaluate_only:  # each task's table of this seed if complete
            done = {t: complete_table(recs[t], d / f"{t}.parquet") for t in tasks}
            for t in [t for t, v in done.items() if v is None]:
                print(f"seed {seed}: {t} step table not complete, left out", flush=True)
            done = {t: v for t, v in done.items() if v is not None}
            if not done:
                continue
        else:
            done = {t: seed_table(att, recs[t], d / f"{t}.parquet", args.graph_dir, extra, data / f"{t}-fingerprints.parquet")
                    for t in tasks}
        records[seed] = [r for t in done for r in recs[t]]
        tables[seed] = pd.concat(list(done.values()), ignore_index=True)
        print(f"seed {seed}: step tables complete for {', '.join(done)} ({len(tables[seed])} steps, "
              f"{int(tables[seed]['faulty'].sum())} faulty)", flush=True)
    build_seconds = time.time() - start
    if args.build_only or args.records_only or args.archive_only or args.shard is not None:
        print(f"built in {build_seconds:.0f} s")
        return
    if not tables:
        raise SystemExit("no step table is complete: run without --evaluate-only first")

    prm = PRMConfig(epochs=args.prm_epochs) if args.prm_epochs > 0 else None
    cfg = EvalConfig(folds=args.folds, n_boot=args.n_boot, prm=prm)
    pooled_records = [r for s in tables for r in records[s] if r.steps]
    pooled = pd.concat(list(tables.values()), ignore_index=True)
    t0 = time.time()
    results = run_evaluation(pooled_records, att, args.run_dir, args.graph_dir, cfg, command=command,
                             extra_targets=extra, table=pooled)
    # then one evaluation per seed for the spread across datasets (with one seed, the pooled evaluation is
    # that seed's). After the pooled one, not beside it: the PRMs' fine-tuning uses every core, and sharing them
    # with a second process made a pooled (3-seed) PRM fold take 684-2,180 s, against 65-97 s for one seed's
    # data with the cores to itself: far more than the overlap saves
    seed_cfg = cfg if args.seed_prm else EvalConfig(folds=args.folds, n_boot=args.n_boot, prm=None)
    settings = {"max_feature_nodes": args.max_feature_nodes, "arith_count_per_n": tasks.get("arith", {}),
                "bool_count_per_n": tasks.get("bool", {}), "seeds": list(tables), "seeds_requested": args.seeds,
                "folds": args.folds, "n_boot": args.n_boot, "prm_epochs": args.prm_epochs,
                "seed_evaluations_with_prm": bool(args.seed_prm and prm), "threads": args.threads,
                "build_seconds": round(build_seconds), "step_target": "last", "extra_targets": list(extra),
                "model": str(args.model or "models/reasoner"), "transcoders": str(args.transcoders or "models/transcoders"),
                "case_control": designs}
    if args.merge:
        merge_figures(results, args.merge, tasks, command, args.key)
        return
    if len(tables) > 1:  # the pooled figures first, so that a stop during the per-seed evaluations loses nothing
        write_figures(results, {}, tasks, {**settings, "eval_seconds": round(time.time() - t0)}, command, args.run_dir,
                      args.key)
    text = TextInputs(att.model, att.encoder, {r.problem_id: r for r in pooled_records}) if args.seed_prm and prm else None
    # each seed's evaluation is kept in its run folder: a stop among them loses only the one in progress
    per_seed = ([stored_evaluation(tables[s], seed_cfg, args.run_dir / f"seed-{s}" / "evaluation.json", text, progress=True)
                 for s in tables] if len(tables) > 1 else [results])
    write_figures(results, seed_spread(per_seed), tasks, {**settings, "eval_seconds": round(time.time() - t0)},
                  command, args.run_dir, args.key)


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON at ``path``, atomically (a temporary file renamed)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)


def merge_figures(results: EvaluationResults, keys: list[str], tasks: dict, command: str, key: str | None = None,
                  tolerance: float = 0.002) -> None:
    """Replace ``keys`` of each task's stored section with this run's, only if the run reproduces the stored one:
    every method scored in both has the stored AUROC within ``tolerance`` (a rebuilt table, other thread counts).
    The merge is recorded in the section's settings as ``merged``: keys, command and the largest AUROC difference."""
    path = RESULTS / "evaluation.json"
    data = json.loads(path.read_text())
    section = data[key] if key else data
    worst = 0.0
    for task in tasks:
        new, old = results.tasks[task].to_dict(), section[task]
        both = set(new["methods"]) & set(old["methods"])
        diffs = {m: abs(new["methods"][m]["auroc"] - old["methods"][m]["auroc"]) for m in both}
        bad = {m: d for m, d in diffs.items() if d > tolerance}
        if bad:
            raise SystemExit(f"{task}: this run does not reproduce the stored AUROCs ({bad}); rerun the full evaluation")
        worst = max([worst, *diffs.values()])
        for k in keys:
            if k not in new:
                raise SystemExit(f"{task}: this run has no {k!r} to merge")
            old[k] = new[k]
    section["settings"].setdefault("merged", []).append(
        {"keys": keys, "command": command, "max_auroc_difference": round(worst, 6)})
    write_json(path, data)
    print(f"merged {keys} into {path} (methods' AUROCs within {worst:.2g} of the stored run)", flush=True)


def write_figures(results: EvaluationResults, spread: dict, tasks: dict, settings: dict, command: str, run_dir: Path,
                  key: str | None = None) -> None:
    """The report in ``run_dir`` and the figures under ``benchmarks/results/`` (``spread``: per task, each
    method's AUROC across the seeds' evaluations; empty until they ran): the shipped reasoner's at the top level
    of evaluation.json, another model's under ``key``; the other model's figures in the file are kept."""
    results.extra["seeds"] = spread
    results.extra["files"] = {k: str(v) for k, v in write_report(results, run_dir, command).items()}
    results.extra["markdown"] = markdown_table(results)
    print(results.extra["markdown"])
    out: dict = {}
    for task in tasks:
        r = results.tasks.get(task)
        if r is None:
            out[task] = {"skipped": results.skipped.get(task, "its step tables are not complete yet (build still running)")}
            continue
        section = r.to_dict()
        out[task] = {k: section[k] for k in KEEP if k in section}
        out[task]["seeds"] = spread.get(task, {})
    out["transfer"] = results.transfer
    out["transfer_trained_on_both"] = results.transfer_trained_on_both
    out["settings"] = settings
    out["command"] = command
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "evaluation.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if key:
        data = {**old, key: out}
    else:  # the reasoner's sections replace the top level; other models' sections stay
        data = {**{k: v for k, v in old.items() if k not in out and k not in tasks and isinstance(v, dict)
                   and "settings" in v}, **out}
    write_json(path, data)
    suffix = f"-{key}" if key else ""
    (RESULTS / f"evaluation{suffix}.md").write_text(f"# Evaluation\n\n`{command}`\n\n{results.extra['markdown']}\n")
    shutil.copy(run_dir / "summary.png", RESULTS / f"evaluation{suffix}.png")
    models = {"reasoner": {t: data[t] for t in ("arith", "bool") if t in data}}
    models.update({k: v for k, v in data.items() if isinstance(v, dict) and "settings" in v and k not in models})
    if len(models) > 1:  # every model's AUROCs side by side
        (RESULTS / "evaluation-models.png").write_bytes(models_png(models))
    print(f"wrote {RESULTS / 'evaluation.json'} (build {settings['build_seconds']} s, "
          f"evaluation {settings['eval_seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
