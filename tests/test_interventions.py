"""Feature interventions on the shipped reasoner: exact edits, no leaked hooks, the experiment with controls."""

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.classify.model import StepClassifier
from crv.cli import app
from crv.fingerprint.features import fingerprint
from crv.interventions import EditWindow, FeatureEdit, feature_patch, intervene, regenerate
from crv.interventions.experiment import InterventionConfig, run_experiment, write_results
from crv.interventions.select import candidates, logit_effects, wrong_result_offset
from crv.lm.encode import encode_text
from crv.reasoner.generate import generate_records
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output
from crv.tasks.schema import write_records


@pytest.fixture(scope="module")
def att():
    return Attributor.load(config=AttributionConfig(max_feature_nodes=128))


def faulty_record(step: int = 1, seed: int = 3):
    prob = generate_problems("arith", 3, 1, seed=seed)[0]
    lines = prob.completion.split("\n")
    op, rest = lines[step].split("=", 1)
    result, state = rest.split(" => ", 1)
    lines[step] = f"{op}={int(result) + 3} => {state}"
    return label_output(prob, "\n".join(lines))


def mlp_io(model, layer, ids):
    store = {}
    h = model.model.layers[layer].mlp.register_forward_hook(lambda m, a, o: store.update(x=a[0].detach(), y=o.detach()))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        h.remove()
    return store["x"], store["y"], logits


def test_clamp_changes_the_mlp_output_by_exactly_the_decoder_contribution(att):
    ids = torch.tensor([encode_text(att.tokenizer, "Q: (3+4)*2\n3+4=7 => 7*2\n")])
    layer, pos = 1, 9
    x, y, _ = mlp_io(att.model, layer, ids)
    tc = att.transcoders[layer]
    acts = tc.encode(x[0, pos])
    feat = int(acts.argmax())
    assert acts[feat] > 0
    with feature_patch(att.model, att.transcoders, [FeatureEdit(layer, feat, "clamp")], EditWindow(start=pos, stop=pos + 1)):
        _, y2, _ = mlp_io(att.model, layer, ids)
    expected = y[0, pos] - acts[feat] * tc.decoder_rows(torch.tensor([feat]))[0].float()
    torch.testing.assert_close(y2[0, pos], expected, rtol=1e-5, atol=1e-5)
    others = torch.ones(ids.shape[1], dtype=torch.bool)
    others[pos] = False
    torch.testing.assert_close(y2[0, others], y[0, others])  # other positions untouched


def test_hooks_are_removed_even_when_generation_raises(att):
    ids = torch.tensor([encode_text(att.tokenizer, "Q: 1+2\n")])
    before = att.model(input_ids=ids).logits.detach()
    with pytest.raises(RuntimeError, match="boom"):
        with feature_patch(att.model, att.transcoders, [FeatureEdit(0, 5, "scale", 10.0)], EditWindow(start=0)):
            raise RuntimeError("boom")
    assert all(not layer.mlp._forward_hooks for layer in att.model.model.layers)
    torch.testing.assert_close(att.model(input_ids=ids).logits.detach(), before, rtol=0, atol=0)


def test_intervene_returns_and_leaves_the_model_as_it_was(att):
    rec = faulty_record()
    ids = torch.tensor([encode_text(att.tokenizer, "Q: " + rec.question + "\n")])
    before = att.model(input_ids=ids).logits.detach()
    out = intervene(att.model, att.encoder, att.transcoders, rec, 1, [(0, 3), (2, 7)], mode="clamp")
    assert out.record.problem_id == rec.problem_id and out.continuation
    assert out.record.steps[0] == rec.steps[0]  # steps before the edited one are kept
    torch.testing.assert_close(att.model(input_ids=ids).logits.detach(), before, rtol=0, atol=0)
    # with no edits, regeneration reproduces the model's own greedy output for a correct prefix
    plain = regenerate(att.model, att.encoder, att.transcoders, rec, 1)
    from crv.reasoner.generate import complete

    own = complete(att.model, att.encoder, [att.encoder.prefix(rec.task, rec.question, rec.steps[:1])], 200)[0]
    assert plain.edits == [] and plain.continuation == own
    assert plain.step_correct == (plain.record.labels[1] == 1)


def test_invalid_requests_get_clear_errors(att):
    rec = faulty_record()
    with pytest.raises(ValueError, match="step index 7 out of range"):
        intervene(att.model, att.encoder, att.transcoders, rec, 7, [(0, 1)])
    with pytest.raises(ValueError, match="layer 9 out of range"):
        intervene(att.model, att.encoder, att.transcoders, rec, 0, [(9, 1)])
    with pytest.raises(ValueError, match="feature id .* out of range"):
        intervene(att.model, att.encoder, att.transcoders, rec, 0, [(0, 10**7)])
    with pytest.raises(ValueError, match="unknown intervention mode"):
        intervene(att.model, att.encoder, att.transcoders, rec, 0, [(0, 1)], mode="boost")
    with pytest.raises(ValueError, match="no features"):
        intervene(att.model, att.encoder, att.transcoders, rec, 0, [])
    with pytest.raises(ValueError, match="position 2 is not inside step 1"):
        intervene(att.model, att.encoder, att.transcoders, rec, 1, [(0, 1)], positions=2)
    with pytest.raises(ValueError, match="unknown positions"):
        intervene(att.model, att.encoder, att.transcoders, rec, 1, [(0, 1)], positions="everywhere")
    with pytest.raises(ValueError, match="unknown positions"):
        InterventionConfig(positions="everywhere")


def test_candidates_follow_the_graph(att):
    rec = faulty_record()
    assert wrong_result_offset(rec.steps[1], "arith") is not None and wrong_result_offset(rec.steps[0], "arith") is None
    tr, enc = att.trace_record(rec)
    g = tr.graph(pos=enc.last(1) - 3)
    effects = logit_effects(g)
    # a feature's direct edge to the logit is part of its total effect; tokens reach the logit
    assert effects.shape == (g.n_nodes,) and effects[g.n_features + g.n_errors : g.n_features + g.n_errors + g.n_pos].abs().sum() > 0
    cands = candidates(g, enc.spans[1][0] - 1)
    assert cands and all(a.effect >= b.effect for a, b in zip(cands, cands[1:]))


@pytest.mark.slow
def test_experiment_table_with_controls(att, tmp_path):
    # the reasoner's own mistakes (n = 10: about a quarter of the traces have one) and a verifier trained in the test
    recs = generate_records(att.model, att.encoder, generate_problems("arith", 10, 8, seed=100), progress=False)
    n_faulty = sum(r.labels[-1] == 0 for r in recs)
    assert 2 <= n_faulty < len(recs)
    from crv.attribution.attributor import step_position

    rows = []
    for r in recs:
        tr, enc = att.trace_record(r)
        for k in range(len(r.steps)):
            rows.append({**fingerprint(tr.graph(pos=step_position(enc, k, "last"))), "faulty": int(r.labels[k] == 0)})
    table = pd.DataFrame(rows)
    clf = StepClassifier().fit(table.drop(columns="faulty"), table["faulty"].to_numpy())
    cfg = InterventionConfig(k=2, threshold=0.0, harm_steps=2, seed=0)
    res = run_experiment(att, clf, recs, cfg, progress=False)
    a = res["arith"]
    assert a["faulty_steps"] == n_faulty and a["flagged_faulty"] == n_faulty and a["harm_steps"] <= 2
    assert a["reproduced"] >= 1  # the unedited regeneration repeats the model's own mistake
    rep = [r for r in a["_rows"] if r["reproduced"]]  # the rates are over the rows whose fault was reproduced
    assert a["reproduced"] == len(rep) >= 1
    for key, arms in (("targeted_fix_rate", ("targeted_suppress", "targeted_amplify")),
                      ("random_fix_rate", ("random_suppress", "random_amplify"))):
        fixed = [any(r.get(f"{arm}.solved", False) for arm in arms) for r in rep]
        assert a[key] == pytest.approx(sum(fixed) / len(fixed))
    assert set(a["arms"]) == {"targeted_suppress", "targeted_amplify", "random_suppress", "random_amplify"}
    assert a["harm_steps_flagged"] <= a["harm_steps"]  # threshold 0: every correct step is flagged
    assert a["harm_steps_flagged"] == a["harm_steps"]
    files = write_results(res, tmp_path, "test")
    out = json.loads(files["json"].read_text())
    assert len(out["rows"]["arith"]["faulty"]) == n_faulty
    assert "random fix" in files["md"].read_text()
    # CLI: the same experiment from a JSONL file and a saved classifier
    write_records(recs, tmp_path / "recs.jsonl")
    clf.save(tmp_path / "clf")
    result = CliRunner().invoke(app, ["intervene", "--data", str(tmp_path / "recs.jsonl"), "--classifier", str(tmp_path / "clf"),
                                      "--run-dir", str(tmp_path / "run"), "--k", "2", "--threshold", "0", "--harm-steps", "1",
                                      "--max-feature-nodes", "128", "--max-faulty", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "interventions.json").read_text())["arith"]["flagged_faulty"] == 2
    bad = CliRunner().invoke(app, ["intervene", "--data", str(tmp_path / "recs.jsonl"), "--classifier", str(tmp_path / "nope")])
    assert bad.exit_code != 0 and "classifier file not found" in bad.output
