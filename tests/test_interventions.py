"""Feature interventions on the shipped reasoner: exact edits, no leaked hooks, the experiment with controls."""


import pytest
import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.interventions import EditWindow, FeatureEdit, feature_patch, intervene, regenerate
from crv.interventions.controls import ActiveFeature, match_control, total_size
from crv.interventions.experiment import InterventionConfig, run_experiment, summarize
from crv.interventions.rules import active_at, select
from crv.interventions.select import candidates, logit_effects, wrong_result_offset
from crv.lm.encode import encode_text
from crv.reasoner.generate import generate_records
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



def planted_attributor(tmp_path, layer: int = 0, feature: int = 629, scale: float = 10.0, norm: float = 10.0,
                       decoys: int = 4):
    """The shipped reasoner with a planted error. Feature L0:629 of the shipped set fires on "=" (97% of its
    activation), where a result's first digit is predicted; it is made to fire ``scale`` times harder and to write,
    at a result's "=" (not the " =" of "=>"), the direction that raises token "9"'s logit alone (through the final
    norm's gain; decoder norm ``norm``) into the model's MLP output: results come out with a wrong 9. Layer 0, so
    that no feature upstream of it shares its effect. ``decoys`` other features get the same encoder (they fire
    exactly as hard) and decoder rows of the same norm in the null space of the unembedding: same layer, position
    and edit size, so each is a matched control, and not a cause of the error."""
    import shutil

    from safetensors.torch import load_file, save_file

    from crv.transcoders.io import DEFAULT_TRANSCODER_DIR, load_transcoders

    att = Attributor.load(config=AttributionConfig(max_feature_nodes=256))
    model, F = att.model, feature
    out = tmp_path / "planted-set"
    out.mkdir()
    for p in DEFAULT_TRANSCODER_DIR.iterdir():
        if p.is_file():
            shutil.copy(p, out / p.name)
    path = sorted(out.glob("*.safetensors"))[layer]
    t = {k: v.clone() for k, v in load_file(str(path)).items()}
    WUg = (model.lm_head.weight * model.model.norm.weight).detach().float()  # [V, d]: what the final logits read
    nine = att.tokenizer.convert_tokens_to_ids("9")
    v = torch.linalg.pinv(WUg) @ torch.nn.functional.one_hot(torch.tensor(nine), WUg.shape[0]).float()
    null = torch.linalg.svd(WUg, full_matrices=True).Vh[WUg.shape[0]:]  # directions no logit reads
    enc, b = (t["W_enc"][F].float() * scale).to(t["W_enc"].dtype), t["b_enc"][F] * scale
    decoy_ids = list(range(1000, 1000 + decoys))
    t["W_enc"][F], t["b_enc"][F], t["W_dec"][F] = enc, b, (norm * v / v.norm()).to(t["W_dec"].dtype)
    for j, d in zip(decoy_ids, null):
        t["W_enc"][j], t["b_enc"][j], t["W_dec"][j] = enc, b, (norm * d / d.norm()).to(t["W_dec"].dtype)
    save_file(t, str(path))
    ts = load_transcoders(out, model=model)
    tc, dec = ts[layer], ts[layer].decoder_rows(torch.tensor([F])).float()[0]
    eq, space = att.tokenizer.convert_tokens_to_ids("="), att.tokenizer.convert_tokens_to_ids(" ")
    nine_t = att.tokenizer.convert_tokens_to_ids("9")
    state: dict = {}

    def read_ids(module, args):  # a result's "=" (not the " =" of "=>", nor one after a 9), also under a KV cache
        ids = args[0]
        last = state.get("last")
        first = last if last is not None and last.shape[0] == ids.shape[0] else torch.full_like(ids[:, :1], space)
        prev = torch.cat([first, ids[:, :-1]], 1)
        state["gate"], state["last"] = ((ids == eq) & (prev != space) & (prev != nine_t)).unsqueeze(-1), ids[:, -1:]

    def planted(module, args, output):  # the model itself computes the planted feature's contribution there
        return output + state["gate"] * tc.encode(args[0])[..., F].unsqueeze(-1) * dec

    model.model.embed_tokens.register_forward_pre_hook(read_ids)
    model.model.layers[layer].mlp.register_forward_hook(planted)
    return Attributor(model, att.tokenizer, ts, att.config, encoder=att.encoder), (layer, F), decoy_ids


@pytest.mark.slow
def test_planted_error_is_fixed_by_the_targeted_edit_and_not_by_matched_controls(tmp_path):
    att, (L, F), decoys = planted_attributor(tmp_path)
    recs = generate_records(att.model, att.encoder, generate_problems("arith", 3, 12, seed=11), progress=False)
    faulty = [r for r in recs if r.labels[-1] == 0]
    assert len(faulty) >= 6, "the planted feature makes the model miscompute"
    scores = {(r.problem_id, len(r.steps) - 1): 1.0 for r in faulty}  # every faulty step flagged
    cfg = InterventionConfig(k=1, rules=("logit",), doses=(0.0,), locate="oracle", harm_steps=0, bootstrap=100)
    task = run_experiment(att, None, recs, cfg, progress=False, scores=scores).tasks["arith"]
    res, rows = task.figures, [r for r in task.rows if r["reproduced"]]
    assert len(rows) >= 6
    assert sum(r["logit.matched"] for r in rows) >= 0.8 * len(rows), "where the planted feature is edited, a decoy matches it"
    fixed = res["ci"]["step_fix"]
    assert fixed["targeted"]["value"] >= 0.75 and fixed["control"]["value"] == 0.0
    assert fixed["difference"]["ci"][0] > 0
