"""Evaluation reports: a summary plot, a markdown table, a JSON file and an HTML page with ROC and PR curves."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

from crv.evaluate.methods import METHODS
from crv.evaluate.results import EvaluationResults


def method_note(results: EvaluationResults) -> str:
    """How the numbers were made (scoring scheme and intervals), for the report's reader."""
    cfg = results.settings
    if cfg.get("scoring", "split") == "out_of_fold":
        scoring = (f"Out-of-fold scoring: the problems are dealt into {cfg.get('folds')} folds (grouped by problem, "
                   "stratified by faulty steps); every method is trained once per fold on the other folds, and each step "
                   "is scored by the fit that never saw its problem. Choices such as a probe's layer or a temperature "
                   "are made inside each fit's training folds. Metrics are on all steps.")
    else:
        scoring = (f"Held-out split: {100 * cfg.get('test_fraction', 0.2):.0f}% of the problems are the test set "
                   "(grouped by problem, stratified by faulty steps); metrics are on the test steps.")
    return (scoring + f" Intervals: 95% percentile bootstrap over problems ({cfg.get('n_boot')} resamples; all steps of a "
            "drawn problem go together, resamples without both classes skipped). Δ vs CRV is the paired difference "
            "(both methods on the same resamples).")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _ci(ci: list | None) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _n_seeds(spread: dict) -> int:
    """How many seeds' evaluations a task's spread summarises."""
    return max((v.get("n_seeds", 1) for v in spread.values()), default=0)


def markdown_table(results: EvaluationResults) -> str:
    """Methods as rows; AUROC [95% CI], AUPR, FPR@95, the paired AUROC difference to CRV (percent) and, with
    several seeds' datasets, the AUROC mean ± sd across their evaluations, per task; then per-difficulty AUROC,
    transfer, ablation and costs."""
    tasks, R = list(results.tasks), results.tasks
    spread = {t: s for t, s in (results.extra.get("seeds") or {}).items() if t in tasks and _n_seeds(s) > 1}
    head = "| method | " + " | ".join(f"{t} AUROC↑ | {t} AUPR↑ | {t} FPR@95↓ | {t} ΔAUROC vs crv"
                                     + (f" | {t} AUROC over {_n_seeds(spread[t])} seeds" if t in spread else "")
                                     for t in tasks) + " |"
    sep = "|---|" + "".join("---|" * (5 if t in spread else 4) for t in tasks)
    lines = [head, sep]
    present = [m for m in METHODS if any(m in R[t].methods for t in tasks)]
    present += sorted({m for t in tasks for m in R[t].methods if m not in METHODS})
    for m in present:
        cells = []
        for t in tasks:
            r = R[t].methods.get(m)
            if r is None:
                cells += ["—"] * (5 if t in spread else 4)
                continue
            d = R[t].paired_vs_crv.get(m)
            cells += [f"{_pct(r['auroc'])}{_ci(r.get('auroc_ci'))}", f"{_pct(r['aupr'])}{_ci(r.get('aupr_ci'))}",
                      f"{_pct(r['fpr95'])}{_ci(r.get('fpr95_ci'))}",
                      "—" if d is None else f"{100 * d['auroc_diff']:+.1f}{_ci(d['ci'])}"]
            if t in spread:
                v = spread[t].get(m)
                cells.append("—" if v is None or v.get("n_seeds", 1) < 2
                             else f"{100 * v['auroc_mean']:.1f} ± {100 * v['auroc_sd']:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    counts = ", ".join(f"{t}: {R[t].n_steps} steps ({R[t].n_faulty} faulty) of "
                       f"{R[t].n_problems or '?'} problems, scored {R[t].n_test_steps} "
                       f"({R[t].n_test_faulty} faulty)" for t in tasks)
    lines.append(f"Steps: {counts}.")
    lines.append("")
    lines.append(method_note(results))
    for t in tasks:
        v = R[t].crv_plus_confidence_vs_best_confidence
        if v:
            lines.append(f"\nDoes the graph add to confidence ({t})? crv_plus_confidence − {v['baseline']} (the best "
                         f"black-box score here): {100 * v['auroc_diff']:+.1f} AUROC points{_ci(v['ci'])}.")
    for t in tasks:
        pn = R[t].per_n
        if not pn:
            continue
        ns = list(pn)
        lines += ["", f"AUROC per difficulty n ({t}):", "",
                  "| method | " + " | ".join(f"n={n} ({pn[n]['n_faulty']}/{pn[n]['n_steps']})" for n in ns) + " |",
                  "|---|" + "---|" * len(ns)]
        for m in present:
            if m in R[t].methods:
                lines.append(f"| {m} | " + " | ".join(_pct(pn[n]["methods"].get(m, {}).get("auroc")) for n in ns) + " |")
    seeds = results.extra.get("seeds")
    if seeds:
        for t in tasks:
            if t not in seeds or not seeds[t]:
                continue
            k = _n_seeds(seeds[t])
            if k < 2:
                lines += ["", f"Across datasets ({t}): one seed's dataset only, so no spread across seeds yet."]
                continue
            lines += ["", f"Across datasets ({t}, one evaluation per seed, {k} seeds): AUROC mean ± sd: "
                      + ", ".join(f"{m} {100 * v['auroc_mean']:.1f} ± {100 * v['auroc_sd']:.1f}" for m, v in seeds[t].items())]
            unseeded = [m for m in R[t].methods if m not in seeds[t]]
            if unseeded:
                lines[-1] += f"; not evaluated on each seed's dataset (no spread): {', '.join(unseeded)}"
    lines.append("")
    if results.transfer:
        lines.append("Transfer (CRV AUROC): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in results.transfer.items())
                     + "; trained on both: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in results.transfer_trained_on_both.items()))
    for t in tasks:
        ab = R[t].ablation_auroc
        lines.append(f"Leave-one-family-out ({t}, CRV AUROC): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in ab.items()))
    for t in tasks:
        fe = R[t].first_error
        if fe:
            lines += ["", f"First-error localisation ({t}, ProcessBench's convention; threshold chosen on the other folds):", "",
                      "| method | on traces with an error | on error-free traces | F1 [95% CI] |", "|---|---|---|---|"]
            for m, v in sorted(fe.items(), key=lambda kv: -kv[1]["f1"]):
                lines.append(f"| {m} | {_pct(v['acc_erroneous'])} | {_pct(v['acc_correct'])} | {_pct(v['f1'])} {_ci(v['f1_ci'])} |")
            lines.append("")
    for t in tasks:
        cost = R[t].ms_per_step
        if cost:
            lines.append(f"Cost per step ({t}, ms, this machine): " + ", ".join(f"{k} {v:.1f}" for k, v in cost.items()))
    for t, why in results.skipped.items():
        lines.append(f"Skipped {t}: {why}")
    return "\n".join(lines)


def summary_png(results: EvaluationResults) -> bytes:
    """The at-a-glance plot: per task, each method's AUROC with its interval (CRV highlighted), and AUROC per n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, R = list(results.tasks), results.tasks
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 0.32 * max(len(R[t].methods) for t in tasks) * len(tasks) + 2.5),
                             squeeze=False, gridspec_kw={"width_ratios": [1.2, 1]})
    for row, t in enumerate(tasks):
        ms = R[t].methods
        names = sorted(ms, key=lambda m: ms[m]["auroc"])
        ax = axes[row, 0]
        for i, m in enumerate(names):
            lo, hi = ms[m].get("auroc_ci") or (ms[m]["auroc"], ms[m]["auroc"])
            color = "crimson" if m == "crv" else ("darkorange" if m.startswith("crv") else "steelblue")
            ax.errorbar(100 * ms[m]["auroc"], i, xerr=[[100 * (ms[m]["auroc"] - lo)], [100 * (hi - ms[m]["auroc"])]],
                        fmt="o", color=color, ms=7 if m == "crv" else 4, lw=2.5 if m == "crv" else 1.2, capsize=2)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for lab in ax.get_yticklabels():
            if lab.get_text() == "crv":
                lab.set_color("crimson")
                lab.set_fontweight("bold")
        ax.axvline(50, color="k", ls=":", lw=0.8)
        ax.set(title=f"{t}: AUROC with 95% problem-bootstrap interval ({R[t].n_faulty} faulty steps)",
               xlabel="AUROC (%)")
        ax.title.set_fontsize(9)
        ax = axes[row, 1]
        pn = R[t].per_n
        ns = [int(n) for n in pn if n.lstrip("-").isdigit()]
        palette = plt.get_cmap("tab20").colors
        others = [m for m in names if m != "crv"]
        for m in names:
            vals = [pn[str(n)]["methods"].get(m, {}).get("auroc") for n in ns]
            vals = [float("nan") if v is None else 100 * v for v in vals]
            hl = m == "crv"
            color = "crimson" if hl else palette[(2 * others.index(m) + others.index(m) // 10) % 20]
            ax.plot(ns, vals, marker="o", lw=2.5 if hl else 1.0, color=color, zorder=3 if hl else 2,
                    ls="-" if hl or m.startswith("crv") else "--", alpha=1.0 if hl else 0.7, label=m)
        if not ns:
            ax.text(0.5, 0.5, "no difficulty n in this dataset", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(ns)
        few = [n for n in ns if pn[str(n)]["n_faulty"] < 5]
        ax.set(title=f"{t}: AUROC per difficulty n" + (f" (n={', '.join(map(str, few))}: < 5 faulty steps)" if few else ""),
               xlabel="n (operators)", ylabel="AUROC (%)")
        ax.title.set_fontsize(9)
        if ns:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _curves_png(results: EvaluationResults) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    tasks, R = list(results.tasks), results.tasks
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4.5 * len(tasks)), squeeze=False)
    for row, t in enumerate(tasks):
        y, scores = R[t].curves.y, R[t].curves.scores  # type: ignore[union-attr]
        for name, s in scores.items():
            fpr, tpr, _ = roc_curve(y, s)
            prec, rec, _ = precision_recall_curve(y, s)
            width = 2.5 if name == "crv" else 1.0
            axes[row, 0].plot(fpr, tpr, lw=width, label=f"{name} ({100 * R[t].methods[name]['auroc']:.1f})")
            axes[row, 1].plot(rec, prec, lw=width, label=f"{name} ({100 * R[t].methods[name]['aupr']:.1f})")
        axes[row, 0].plot([0, 1], [0, 1], "k:", lw=0.8)
        axes[row, 0].set(title=f"{t}: ROC (faulty = positive)", xlabel="false-positive rate", ylabel="true-positive rate")
        axes[row, 1].axhline(float(np.mean(y)), color="k", ls=":", lw=0.8)
        axes[row, 1].set(title=f"{t}: precision-recall (faulty)", xlabel="recall", ylabel="precision")
        for ax in axes[row]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_report(results: EvaluationResults, run_dir: str | Path, command: str) -> dict[str, Path]:
    """Write ``report.md``, ``evaluation.json`` and ``report.html`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_table(results)
    paths = {"markdown": run_dir / "report.md", "json": run_dir / "evaluation.json", "html": run_dir / "report.html",
             "plot": run_dir / "summary.png"}
    png = summary_png(results) if results.tasks else b""
    paths["plot"].write_bytes(png)
    paths["markdown"].write_text(f"# crv evaluation\n\n`{command}`\n\n![AUROC per method and per n](summary.png)\n\n{md}\n")
    data = {**results.to_dict(), "command": command}
    paths["json"].write_text(json.dumps(data, indent=2, default=float) + "\n")
    rows = "".join(f"<li><b>{m}</b>: {d}</li>" for m, d in METHODS.items())
    table_html = "<pre>" + md.replace("&", "&amp;").replace("<", "&lt;") + "</pre>"
    img = f'<img src="data:image/png;base64,{_curves_png(results)}"/>' if results.tasks and all(r.curves is not None for r in results.tasks.values()) else ""
    lead = f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}"/>' if png else ""
    paths["html"].write_text(
        f"<!doctype html><meta charset='utf-8'><title>crv evaluation</title><h1>crv evaluation</h1>"
        f"<p><code>{command}</code></p>{lead}<p>{method_note(results)}</p>{table_html}<h2>Curves</h2>{img}"
        f"<h2>Methods</h2><ul>{rows}</ul>"
    )
    return paths


def models_png(sections: dict[str, dict]) -> bytes:
    """Per task, every method's AUROC with its interval for several models side by side.

    ``sections``: model name -> its evaluation figures (the layout of ``evaluation.json``: task -> ``methods``).
    Methods are ordered by the first model's AUROC; a method a model has no figure for is left out for it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in dict.fromkeys(t for s in sections.values() for t in s) if any("methods" in s.get(t, {}) for s in
                                                                                        sections.values())]
    if not tasks:
        raise ValueError("no model has figures for any task")
    colors = ["crimson", "steelblue", "darkorange", "seagreen"]
    n_methods = max(len(s[t]["methods"]) for s in sections.values() for t in tasks if "methods" in s.get(t, {}))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 0.33 * n_methods + 2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        first = next(s[t]["methods"] for s in sections.values() if "methods" in s.get(t, {}))
        names = sorted(dict.fromkeys(m for s in sections.values() for m in s.get(t, {}).get("methods", {})),
                       key=lambda m: first.get(m, {}).get("auroc", 0.0))
        for j, (model, s) in enumerate(sections.items()):
            ms = s.get(t, {}).get("methods", {})
            off = (j - (len(sections) - 1) / 2) * 0.25
            label = f"{model} ({s[t]['n_faulty']} faulty)" if "n_faulty" in s.get(t, {}) else model
            for i, m in enumerate(names):
                if m not in ms:
                    continue
                a = 100 * ms[m]["auroc"]
                lo, hi = (100 * v for v in (ms[m].get("auroc_ci") or (ms[m]["auroc"], ms[m]["auroc"])))
                ax.errorbar(a, i + off, xerr=[[a - lo], [hi - a]], fmt="o", color=colors[j % len(colors)],
                            ms=6 if m == "crv" else 3.5, lw=2 if m == "crv" else 1, capsize=2,
                            label=label if i == next(k for k, n in enumerate(names) if n in ms) else None)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.axvline(50, color="k", ls=":", lw=0.8)
        ax.set(title=f"{t}: AUROC, 95% interval by problem", xlabel="AUROC (%)")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
