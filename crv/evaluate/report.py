"""Evaluation reports: a markdown table, a JSON file and an HTML page with ROC and PR curves."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

from crv.evaluate.methods import METHODS
from crv.evaluate.run import public


def _tasks(results: dict) -> list[str]:
    return [k for k, v in results.items() if isinstance(v, dict) and "methods" in v]


def markdown_table(results: dict) -> str:
    """Methods as rows; AUROC [95% CI], AUPR and FPR@95 (percent) per task."""
    tasks = _tasks(results)
    head = "| method | " + " | ".join(f"{t} AUROC↑ | {t} AUPR↑ | {t} FPR@95↓" for t in tasks) + " |"
    sep = "|---|" + "---|---|---|" * len(tasks)
    lines = [head, sep]
    present = [m for m in METHODS if any(m in results[t]["methods"] for t in tasks)]
    present += sorted({m for t in tasks for m in results[t]["methods"] if m not in METHODS})
    for m in present:
        cells = []
        for t in tasks:
            r = results[t]["methods"].get(m)
            if r is None:
                cells += ["—"] * 3
                continue
            lo, hi = r["auroc_ci"]
            cells += [f"{100 * r['auroc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]", f"{100 * r['aupr']:.1f}", f"{100 * r['fpr95']:.1f}"]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{t}: {results[t]['n_steps']} steps ({results[t]['n_faulty']} faulty), test {results[t]['n_test_steps']} "
                       f"({results[t]['n_test_faulty']} faulty)" for t in tasks)
    lines.append("")
    lines.append(f"Steps: {counts}.")
    if results.get("transfer"):
        lines.append("Transfer (CRV AUROC): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in results["transfer"].items())
                     + "; trained on both: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in results["transfer_trained_on_both"].items()))
    for t in tasks:
        ab = results[t]["ablation_auroc"]
        lines.append(f"Leave-one-family-out ({t}, CRV AUROC): " + ", ".join(f"{k} {100 * v:.1f}" for k, v in ab.items()))
    for t in tasks:
        cost = results[t].get("ms_per_step", {})
        if cost:
            lines.append(f"Cost per step ({t}, ms, this machine): " + ", ".join(f"{k} {v:.1f}" for k, v in cost.items()))
    for t, why in results.get("skipped", {}).items():
        lines.append(f"Skipped {t}: {why}")
    return "\n".join(lines)


def _curves_png(results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    tasks = _tasks(results)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4.5 * len(tasks)), squeeze=False)
    for row, t in enumerate(tasks):
        y, scores = results[t]["_curves"]["y"], results[t]["_curves"]["scores"]
        for name, s in scores.items():
            fpr, tpr, _ = roc_curve(y, s)
            prec, rec, _ = precision_recall_curve(y, s)
            width = 2.5 if name == "crv" else 1.0
            axes[row, 0].plot(fpr, tpr, lw=width, label=f"{name} ({100 * results[t]['methods'][name]['auroc']:.1f})")
            axes[row, 1].plot(rec, prec, lw=width, label=f"{name} ({100 * results[t]['methods'][name]['aupr']:.1f})")
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


def write_report(results: dict, run_dir: str | Path, command: str) -> dict[str, Path]:
    """Write ``report.md``, ``evaluation.json`` and ``report.html`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_table(results)
    paths = {"markdown": run_dir / "report.md", "json": run_dir / "evaluation.json", "html": run_dir / "report.html"}
    paths["markdown"].write_text(f"# crv evaluation\n\n`{command}`\n\n{md}\n")
    data = public(results)
    data["command"] = command
    paths["json"].write_text(json.dumps(data, indent=2, default=float) + "\n")
    rows = "".join(f"<li><b>{m}</b>: {d}</li>" for m, d in METHODS.items())
    table_html = "<pre>" + md.replace("&", "&amp;").replace("<", "&lt;") + "</pre>"
    img = f'<img src="data:image/png;base64,{_curves_png(results)}"/>' if _tasks(results) else ""
    paths["html"].write_text(
        f"<!doctype html><meta charset='utf-8'><title>crv evaluation</title><h1>crv evaluation</h1>"
        f"<p><code>{command}</code></p>{table_html}<h2>Curves</h2>{img}<h2>Methods</h2><ul>{rows}</ul>"
    )
    return paths
