"""`crv evaluate` end to end on a tiny labelled dataset (shipped model; some steps corrupted on purpose)."""

import json
import re

import pandas as pd
from typer.testing import CliRunner

from crv.cli import app
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output
from crv.tasks.schema import write_records


def corrupt(completion: str, task: str, step: int) -> str:
    lines = completion.split("\n")
    op, rest = lines[step].split("=", 1)
    result, state = rest.split(" => ", 1)
    wrong = {"True": "False", "False": "True"}.get(result) if task == "bool" else str(int(result) + 3)
    lines[step] = f"{op}={wrong} => {state}"
    return "\n".join(lines)


def dataset(tmp_path):
    records = []
    for task in ("arith", "bool"):
        for i, prob in enumerate(generate_problems(task, 3, 16, seed=21)):
            text = corrupt(prob.completion, task, 1) if i % 2 else prob.completion
            records.append(label_output(prob, text))
    path = tmp_path / "records.jsonl"
    write_records(records, path)
    return path, records


def test_evaluate_end_to_end(tmp_path):
    path, records = dataset(tmp_path)
    assert sum(r.labels.count(0) for r in records) == 16
    run_dir, graph_dir = tmp_path / "run", tmp_path / "graphs"
    args = ["evaluate", "--data", str(path), "--run-dir", str(run_dir), "--graph-dir", str(graph_dir), "--extra-target", "result",
            "--max-feature-nodes", "64", "--n-boot", "20", "--test-fraction", "0.25", "--threads", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| crv |" in result.output and "| maxprob |" in result.output
    out = json.loads((run_dir / "evaluation.json").read_text())
    for task in ("arith", "bool"):
        assert out[task]["n_faulty"] == 8
        methods = out[task]["methods"]
        assert {"crv", "crv_gbc", "maxprob", "ppl", "entropy", "temp_scaling", "energy", "lr_probe", "mlp_probe", "tc_only",
                "crv_result", "prm_finetuned", "prm_frozen", "crv_plus_prm"} == set(methods)
        for m in methods.values():
            assert 0 <= m["auroc"] <= 1 and 0 <= m["fpr95"] <= 1 and m["auroc_ci"][0] <= m["auroc_ci"][1]
        assert set(out[task]["ms_per_step"]) == {"crv", "prm_finetuned", "prm_frozen"}
        assert all(v > 0 for v in out[task]["ms_per_step"].values())
        assert set(out[task]["ablation_auroc"]) == {"without_global", "without_node", "without_topology"}
    assert set(out["transfer"]) == {"arith->bool", "bool->arith"}
    assert (run_dir / "report.html").read_text().count("data:image/png;base64") == 1
    fps = pd.read_parquet(graph_dir / "fingerprints.parquet")
    assert len(fps) == sum(len(r.steps) for r in records) and fps["faulty"].sum() == 16
    assert (run_dir / "classifiers" / "arith.xgb.json").is_file()
    # a second run reuses the cached graphs and gives the same fingerprints
    from crv.extract import TraceStore

    store = TraceStore(graph_dir)
    assert len(store.keys()) == len(records)
    entry = store.get(store.keys()[0])
    assert set(entry.summaries) == {"last", "result"} and len(entry.rows) == len(entry.summaries["last"])
    cached = list(graph_dir.glob("??/*"))  # the store entries
    mtimes = {p: p.stat().st_mtime_ns for p in cached}
    result = CliRunner().invoke(app, args + ["--prm-epochs", "0"])
    assert result.exit_code == 0, result.output
    assert "prm_finetuned" not in json.loads((run_dir / "evaluation.json").read_text())["arith"]["methods"]
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in cached)
    pd.testing.assert_frame_equal(pd.read_parquet(graph_dir / "fingerprints.parquet"), fps)
    assert re.search(r"arith: \d+ steps \(8 faulty\)", (run_dir / "report.md").read_text())
