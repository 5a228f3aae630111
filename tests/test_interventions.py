"""Feature interventions on the shipped reasoner: exact edits, no leaked hooks, the experiment with controls."""


import pytest
import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.interventions import EditWindow, FeatureEdit, feature_patch, intervene, regenerate
from crv.interventions.controls import ActiveFeature, match_control, total_size
from crv.interventions.experiment import InterventionConfig, summarize
from crv.interventions.rules import active_at, select
from crv.interventions.select import candidates, logit_effects, wrong_result_offset
from crv.lm.encode import encode_text
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output


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
    with pytest.raises(ValueError, match="unknown selection rule"):
        InterventionConfig(rule="everywhere")
    with pytest.raises(ValueError, match="must be among rules"):
        InterventionConfig(rule="anomalous", rules=("logit",))


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




def test_matched_controls_share_layer_position_count_and_edit_size(att):
    """On a real step: a control set has the targeted set's layers, position and count, is disjoint from it, and its
    total edit size (sum of activation x decoder-row norm) is within 10% -- a random same-layer draw is not."""
    import numpy as np

    rec = faulty_record()
    tr, enc = att.trace_record(rec)
    rng = np.random.default_rng(0)
    checked = loose_misses = 0
    for pos in range(enc.spans[1][0] - 1, enc.last(1) + 1):  # every position of step 1
        active = active_at(att, tr, pos)
        g = tr.graph(pos=pos)
        for rule in ("logit", "fingerprint"):
            tgt = select(rule, g, pos, active, 3)
            ctl = match_control(tgt, active, rng, 0.10)
            if ctl is None:
                continue
            assert sorted(t.layer for t in tgt) == sorted(c.layer for c in ctl) and len(ctl) == len(tgt)
            assert not {(t.layer, t.feature) for t in tgt} & {(c.layer, c.feature) for c in ctl}
            assert all(c in active for c in ctl)  # active at the same position, with their activation there
            assert abs(total_size(ctl) - total_size(tgt)) <= 0.10 * total_size(tgt)
            checked += 1
            # a loose control (another active feature of the same layer, drawn at random) misses the size
            loose = [rng.choice([a for a in active if a.layer == t.layer and a not in tgt]) for t in tgt]
            loose_misses += abs(total_size(loose) - total_size(tgt)) > 0.10 * total_size(tgt)
    assert checked >= 10 and loose_misses >= checked // 2
    # unmatched when a layer has no other active feature, or no draw within the tolerance
    lone = [ActiveFeature(0, 1, 2.0, 1.0)]
    assert match_control(lone, lone, rng) is None
    assert match_control(lone, lone + [ActiveFeature(0, 2, 9.0, 1.0)], rng) is None
    assert match_control(lone, lone + [ActiveFeature(0, 2, 2.1, 1.0)], rng) == [ActiveFeature(0, 2, 2.1, 1.0)]


def test_self_correcting_traces_are_not_answer_fixes():
    """Answer fixes count only where the unedited regeneration\'s answer was wrong; steps whose fault is not
    reproduced never count; an unmatched control is left out of the control rate and of the difference."""
    base = {"reproduced": True, "none.step": False, "logit.n": 3, "logit.matched": True}
    k_t, k_c = "logit.targeted@0", "logit.control@0"
    rows = [
        {**base, "problem_id": "a", "none.solved": False, f"{k_t}.step": True, f"{k_t}.solved": True,
         f"{k_c}.step": False, f"{k_c}.solved": False},
        # self-correcting: the unedited regeneration repeats the fault but reaches the right answer anyway
        {**base, "problem_id": "b", "none.solved": True, f"{k_t}.step": True, f"{k_t}.solved": True,
         f"{k_c}.step": True, f"{k_c}.solved": True},
        # not reproduced: the unedited regeneration writes the step right; never counted
        {**base, "problem_id": "c", "reproduced": False, "none.step": True, "none.solved": True, f"{k_t}.step": True,
         f"{k_t}.solved": True, f"{k_c}.step": True, f"{k_c}.solved": True},
        # control unmatched
        {**base, "problem_id": "d", "none.solved": False, "logit.matched": False, f"{k_t}.step": False, f"{k_t}.solved": False},
    ]
    cfg = InterventionConfig(rules=("logit",), doses=(0.0,), bootstrap=50)
    s = summarize([None] * 4, rows, [], [], cfg)
    assert s["reproduced"] == 3
    assert s["targeted_fix_rate"] == pytest.approx(1 / 2)  # rows a and d; b corrects itself, c is not reproduced
    assert s["random_fix_rate"] == 0.0  # row a only (d unmatched)
    assert s["ci"]["answer_fix"]["difference"]["value"] == 1.0 and s["ci"]["answer_fix"]["difference"]["n"] == 1
    assert s["ci"]["step_fix"]["targeted"]["value"] == pytest.approx(2 / 3, abs=1e-3) and s["ci"]["unmatched"] == 1

