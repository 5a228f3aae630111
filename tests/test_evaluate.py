"""`crv evaluate` end to end on a tiny labelled dataset (shipped model; some steps corrupted on purpose)."""

import json
import re

import pandas as pd
import pytest
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


def labelled_records():
    """16 problems per task at n = 3, every second one with its second step made wrong."""
    records = []
    for task in ("arith", "bool"):
        for i, prob in enumerate(generate_problems(task, 3, 16, seed=21)):
            text = corrupt(prob.completion, task, 1) if i % 2 else prob.completion
            records.append(label_output(prob, text))
    return records


def dataset(tmp_path):
    records = labelled_records()
    path = tmp_path / "records.jsonl"
    write_records(records, path)
    return path, records


@pytest.mark.slow
def test_evaluate_end_to_end(tmp_path):
    path, records = dataset(tmp_path)
    assert sum(r.labels.count(0) for r in records) == 16
    run_dir, graph_dir = tmp_path / "run", tmp_path / "graphs"
    args = ["evaluate", "--data", str(path), "--run-dir", str(run_dir), "--graph-dir", str(graph_dir), "--extra-target", "result",
            "--max-feature-nodes", "64", "--n-boot", "20", "--folds", "3", "--prm-epochs", "2", "--threads", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| crv |" in result.output and "| maxprob |" in result.output
    out = json.loads((run_dir / "evaluation.json").read_text())
    for task in ("arith", "bool"):
        assert out[task]["n_faulty"] == 8
        methods = out[task]["methods"]
        assert {"crv", "crv_gbc", "maxprob", "ppl", "entropy", "temp_scaling", "energy", "lr_probe", "mlp_probe", "tc_only",
                "crv_result", "prm_finetuned", "prm_frozen", "crv_plus_prm", "crv_plus_confidence"} == set(methods)
        for m in methods.values():
            assert 0 <= m["auroc"] <= 1 and 0 <= m["fpr95"] <= 1
            for k in ("auroc", "aupr", "fpr95"):
                assert m[f"{k}_ci"][0] <= m[f"{k}_ci"][1]
        # out of fold by default: every step scored, intervals by problem
        assert out[task]["scoring"] == "out_of_fold" and out[task]["ci_method"] == "problem_bootstrap"
        assert out[task]["n_test_steps"] == out[task]["n_steps"] and set(out[task]["per_n"]) == {"3"}
        assert set(out[task]["paired_vs_crv"]) == set(methods) - {"crv"}
        assert set(out[task]["ms_per_step"]) == {"crv", "prm_finetuned", "prm_frozen"}
        assert all(v > 0 for v in out[task]["ms_per_step"].values())
        assert set(out[task]["ablation_auroc"]) == {"without_global", "without_node", "without_topology"}
        fe = out[task]["first_error"]  # ProcessBench-style localisation for every method
        assert set(fe) == set(methods) and all(0 <= v["f1"] <= 1 and len(v["thresholds"]) == out[task]["folds"] for v in fe.values())
        assert fe["crv"]["traces_erroneous"] + fe["crv"]["traces_correct"] == out[task]["n_problems"]
    assert "First-error localisation" in (run_dir / "report.md").read_text()
    assert set(out["transfer"]) == {"arith->bool", "bool->arith"}
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64") == 2 and "bootstrap over problems" in html
    assert (run_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert "![AUROC per method and per n](summary.png)" in (run_dir / "report.md").read_text()
    fps = pd.read_parquet(graph_dir / "fingerprints.parquet")
    assert len(fps) == sum(len(r.steps) for r in records) and fps["faulty"].sum() == 16
    assert (run_dir / "classifiers" / "arith.xgb.json").is_file()
    # train-verifier records what made the table (its settings travel in the parquet file), not what it is told
    verifier = tmp_path / "verifier" / "v"
    result = CliRunner().invoke(app, ["train-verifier", str(run_dir / "steps.parquet"), "--out", str(verifier),
                                      "--max-feature-nodes", "999"])
    assert result.exit_code == 0, result.output
    prov = json.loads(verifier.with_name("v.meta.json").read_text())["provenance"]
    assert prov["model"] == out["model"]["id"] and prov["attribution"]["max_feature_nodes"] == 64
    assert prov["attribution"]["step_target"] == "last" and prov["tasks"] == ["arith", "bool"]
    other = pd.read_parquet(run_dir / "steps.parquet")
    other.attrs["settings"] = {**other.attrs["settings"], "transcoders": "another set"}
    other.to_parquet(tmp_path / "other.parquet")
    result = CliRunner().invoke(app, ["train-verifier", str(run_dir / "steps.parquet"), str(tmp_path / "other.parquet"),
                                      "--out", str(verifier)])
    assert result.exit_code != 0 and "different settings" in result.output
    # a second run reuses the cached graphs and gives the same fingerprints
    from crv.extract import TraceStore

    store = TraceStore(graph_dir)
    assert len(store.keys()) == len(records)
    entry = store.get(store.keys()[0])
    assert set(entry.summaries) == {"last", "result"} and len(entry.rows) == len(entry.summaries["last"])
    cached = list(graph_dir.glob("??/*"))  # the store entries
    mtimes = {p: p.stat().st_mtime_ns for p in cached}
    archive = tmp_path / "kept" / "fingerprints.parquet"
    result = CliRunner().invoke(app, args + ["--prm-epochs", "0", "--archive", str(archive)])
    assert result.exit_code == 0, result.output
    assert "prm_finetuned" not in json.loads((run_dir / "evaluation.json").read_text())["arith"]["methods"]
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in cached)
    pd.testing.assert_frame_equal(pd.read_parquet(graph_dir / "fingerprints.parquet"), fps)
    # the archive (filled from the store) rebuilds the same table in a fresh graph store, without graphs
    fresh = tmp_path / "fresh-graphs"
    args[args.index(str(graph_dir))] = str(fresh)
    result = CliRunner().invoke(app, args + ["--prm-epochs", "0", "--archive", str(archive)])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_parquet(fresh / "fingerprints.parquet"), fps)
    assert all(TraceStore(fresh).get(k).summaries == {} for k in TraceStore(fresh).keys())
    assert re.search(r"arith: \d+ steps \(8 faulty\)", (run_dir / "report.md").read_text())


@pytest.fixture(scope="module")
def step_table():
    """A real step table (shipped reasoner and transcoders, cap 64) and its records."""
    from crv.attribution.attributor import Attributor
    from crv.attribution.engine import AttributionConfig
    from crv.extract import build_step_table

    records = labelled_records()
    att = Attributor.load(config=AttributionConfig(max_feature_nodes=64))
    return build_step_table(att, records, None, progress=False), records, att


@pytest.mark.slow
def test_out_of_fold_never_scores_a_step_with_a_model_that_saw_its_problem(step_table, monkeypatch):
    from crv.classify.model import StepClassifier
    from crv.evaluate.methods import EvalConfig, TextInputs
    from crv.evaluate.prm import PRMConfig, ProcessRewardModel
    from crv.evaluate.run import evaluate_table

    table, records, att = step_table
    arith = table[table["task"] == "arith"].reset_index(drop=True)
    problem_of = arith["problem_id"].to_numpy()
    seen: dict[int, set] = {}
    scored: list[str] = []
    fit, proba = StepClassifier.fit, StepClassifier.predict_proba
    prm_fit, prm_score = ProcessRewardModel.fit, ProcessRewardModel.score

    def spy_fit(self, X, y):
        seen[id(self)] = set(problem_of[X.index])
        return fit(self, X, y)

    def spy_proba(self, X):
        assert not seen[id(self)] & set(problem_of[X.index]), "a classifier scored a problem it was trained on"
        scored.extend(problem_of[X.index])
        return proba(self, X)

    def spy_prm_fit(self, recs, progress=False):
        seen[id(self)] = {r.problem_id for r in recs}
        return prm_fit(self, recs, progress)

    def spy_prm_score(self, recs):
        assert not seen[id(self)] & {r.problem_id for r in recs}, "a PRM scored a problem it was trained on"
        return prm_score(self, recs)

    monkeypatch.setattr(StepClassifier, "fit", spy_fit)
    monkeypatch.setattr(StepClassifier, "predict_proba", spy_proba)
    monkeypatch.setattr(ProcessRewardModel, "fit", spy_prm_fit)
    monkeypatch.setattr(ProcessRewardModel, "score", spy_prm_score)
    cfg = EvalConfig(folds=4, n_boot=50, prm=PRMConfig(epochs=1, crossfit_folds=2))
    text = TextInputs(att.model, att.encoder, {r.problem_id: r for r in records})
    out = evaluate_table(arith, cfg, text).tasks["arith"].to_dict()
    assert out["scoring"] == "out_of_fold" and out["ci_method"] == "problem_bootstrap" and out["folds"] == 4
    # every step is scored (once per CRV-type classifier), all steps count
    assert out["n_test_steps"] == len(arith) and out["n_test_faulty"] == out["n_faulty"] == int(arith["faulty"].sum())
    assert set(scored) == set(problem_of)
    assert {"crv", "crv_plus_confidence", "crv_plus_prm", "prm_finetuned", "prm_frozen", "maxprob"} <= set(out["methods"])
    assert len(out["chosen_on_train"]["temperature"]) == 4  # chosen inside each fit's training folds
    # per-n rows add up to the totals
    assert sum(r["n_steps"] for r in out["per_n"].values()) == out["n_steps"]
    assert sum(r["n_faulty"] for r in out["per_n"].values()) == out["n_faulty"]
    # paired differences: CRV is the reference; intervals contain the point difference
    assert "crv" not in out["paired_vs_crv"]
    for d in out["paired_vs_crv"].values():
        assert d["ci"][0] - 1e-12 <= d["auroc_diff"] <= d["ci"][1] + 1e-12
        assert -1 <= d["auroc_diff"] <= 1
    v = out["crv_plus_confidence_vs_best_confidence"]
    assert v["baseline"] in ("maxprob", "ppl", "entropy", "temp_scaling", "energy")
    assert v["auroc_diff"] == pytest.approx(out["methods"]["crv_plus_confidence"]["auroc"] - out["methods"][v["baseline"]]["auroc"])


@pytest.mark.slow
def test_split_mode_scores_only_the_held_out_problems(step_table):
    from crv.evaluate.methods import EvalConfig
    from crv.evaluate.run import evaluate_table

    table, _, _ = step_table
    out = evaluate_table(table, EvalConfig(scoring="split", test_fraction=0.25, n_boot=50, prm=None))
    for task in ("arith", "bool"):
        r = out.tasks[task].to_dict()
        assert r["scoring"] == "split" and 0 < r["n_test_steps"] < r["n_steps"]
        assert sum(p["n_steps"] for p in r["per_n"].values()) == r["n_test_steps"]
    with pytest.raises(ValueError, match="scoring"):
        EvalConfig(scoring="loo")


@pytest.mark.slow
def test_stored_evaluation_is_read_back_only_for_the_same_table_and_config(step_table, tmp_path, monkeypatch):
    import crv.evaluate.run as run
    from crv.evaluate.methods import EvalConfig

    table, _, _ = step_table
    cfg = EvalConfig(folds=2, n_boot=20, prm=None)
    path = tmp_path / "seed" / "evaluation.json"
    first = run.stored_evaluation(table, cfg, path)
    assert path.is_file() and first.tasks["arith"].methods["crv"]["auroc"] == pytest.approx(
        run.evaluate_table(table, cfg).tasks["arith"].methods["crv"]["auroc"])
    calls = []
    evaluate = run.evaluate_table
    monkeypatch.setattr(run, "evaluate_table", lambda *a, **k: calls.append(a) or evaluate(*a, **k))
    assert run.stored_evaluation(table, cfg, path) == first and not calls  # read back, nothing refitted
    other = run.stored_evaluation(table, EvalConfig(folds=2, n_boot=30, prm=None), path)  # another config: recomputed
    assert len(calls) == 1 and other.settings["n_boot"] == 30
    run.stored_evaluation(table.iloc[: len(table) // 2 * 2 - 2], EvalConfig(folds=2, n_boot=30, prm=None), path)
    assert len(calls) == 2  # another table: recomputed
