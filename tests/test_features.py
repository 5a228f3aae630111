"""Feature descriptions: WeightLens finds a planted feature's tokens; activation examples are the true top contexts."""

import json

import pytest
import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.features.agreement import precision_at_k
from crv.features.corpus import Corpus
from crv.features.describe import DescribeConfig, describe_features
from crv.features.store import FeatureStore, save_store
from crv.features.weightlens import weight_lens
from crv.lm.load import load_model
from crv.transcoders.activations import mlp_io
from crv.transcoders.io import load_transcoders, save_transcoders
from crv.transcoders.transcoder import TopKTranscoder, TranscoderShape

LAYER, PLANTED = 1, 0


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The shipped reasoner with random 64-feature transcoders, feature 0 of layer 1 planted: its encoder reads
    token "7" alone (direct path), its decoder writes token "3"'s unembedding (through the final norm)."""
    model, tok = load_model()
    d = model.config.hidden_size
    shape = TranscoderShape(d, 64, 4)
    gen = torch.Generator().manual_seed(0)
    tcs = []
    for layer in range(model.config.num_hidden_layers):
        tc = TopKTranscoder(shape, layer)
        tc.reset_parameters(gen)
        tcs.append(tc)
    t_in, t_out = tok.convert_tokens_to_ids("7"), tok.convert_tokens_to_ids("3")
    with torch.no_grad():
        # gains far from 1, so that a lens that forgot a normalisation's gain would rank other tokens first
        norm, final = model.model.layers[LAYER].post_attention_layernorm, model.model.norm
        norm.weight.copy_(torch.rand(d, generator=gen) * 4 + 0.05)
        final.weight.copy_(torch.rand(d, generator=gen) * 4 + 0.05)
        E = model.get_input_embeddings().weight.float()
        En = E * torch.rsqrt(E.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight  # token alone -> MLP input
        tcs[LAYER].W_enc[PLANTED] = torch.linalg.pinv(En) @ torch.nn.functional.one_hot(torch.tensor(t_in), En.shape[0]).float()
        tcs[LAYER].b_enc[PLANTED] = 0.0
        WUg = model.lm_head.weight.float() * model.model.norm.weight.float()
        tcs[LAYER].W_dec[PLANTED] = torch.linalg.pinv(WUg) @ torch.nn.functional.one_hot(torch.tensor(t_out), WUg.shape[0]).float()
    out = tmp_path_factory.mktemp("planted")
    save_transcoders(tcs, out, "reasoner", dtype=torch.float32)
    att = Attributor(model, tok, load_transcoders(out, model=model), AttributionConfig(max_feature_nodes=None))
    return att, t_in, t_out


def test_weightlens_ranks_a_planted_features_tokens_first(planted):
    att, t_in, t_out = planted
    wl = weight_lens(att.model, att.transcoders, LAYER, n=5)
    assert int(wl.in_tokens[PLANTED, 0]) == t_in
    assert int(wl.out_tokens[PLANTED, 0]) == t_out
    # the planted maps are exact one-hots: scores 1 for the planted token, 0 for every other one
    assert wl.in_scores[PLANTED, 0] == pytest.approx(1.0, abs=1e-3) and abs(float(wl.in_scores[PLANTED, 1])) < 1e-3
    assert wl.out_scores[PLANTED, 0] == pytest.approx(1.0, abs=1e-3) and abs(float(wl.out_scores[PLANTED, 1])) < 1e-3
    # a vocabulary restriction keeps ids in the model's numbering
    sub = torch.tensor(sorted({t_in, t_out, 5, 9, 11}))
    wl_sub = weight_lens(att.model, att.transcoders, LAYER, n=3, vocab=sub)
    assert int(wl_sub.in_tokens[PLANTED, 0]) == t_in and set(wl_sub.in_tokens.flatten().tolist()) <= set(sub.tolist())


def _corpus(att, count=12):
    from crv.features.corpus import corpus_from_records
    from crv.tasks.cot import generate_problems
    from crv.tasks.label import label_output

    problems = generate_problems("arith", 3, count // 2, seed=3) + generate_problems("bool", 3, count // 2, seed=3)
    records = [label_output(p, p.completion) for p in problems]
    return corpus_from_records(att, records, "canonical test traces")


def test_activation_examples_are_the_true_top_contexts(planted, tmp_path):
    """Brute force: every sequence's transcoder activations from the MLP inputs; a feature's examples are its
    best sequences, highest first, each at its best position, with the activation there."""
    att, _, _ = planted
    corpus = _corpus(att)
    arrays, index = describe_features(att, corpus, DescribeConfig(top_examples=3, circuit_rows_per_trace=16), progress=False)
    save_store(arrays, index, lambda i: att.tokenizer.decode([i]), tmp_path / "store")
    store = FeatureStore(tmp_path / "store")
    F = att.transcoders.shape.d_transcoder
    best = torch.zeros(len(corpus), att.transcoders.shape.n_layers, F)  # max activation per sequence (position >= 1)
    where = torch.zeros_like(best, dtype=torch.long)
    counts = torch.zeros(att.transcoders.shape.n_layers, F, dtype=torch.long)
    for s in range(len(corpus)):
        ids = corpus.sequence(s)
        x, _ = mlp_io(att.model, ids.unsqueeze(0))
        for l in range(x.shape[0]):
            a = att.transcoders[l].encode(x[l, 0])[1:]  # [T - 1, F]
            best[s, l], where[s, l] = a.max(0).values, a.max(0).indices + 1
            counts[l] += (a > 0).sum(0)
    checked = 0
    for l in range(att.transcoders.shape.n_layers):
        assert torch.equal(store.get(l, "count"), counts[l])
        for f in range(0, F, 7):
            col = best[:, l, f]
            order = torch.argsort(col, descending=True, stable=True)[:3]
            order = order[col[order] > 0]
            got = store.get(l, "top_seq")[f]
            assert got[: len(order)].tolist() == order.tolist(), (l, f)
            assert torch.allclose(store.get(l, "top_act")[f][: len(order)], col[order], atol=1e-5)
            assert store.get(l, "top_pos")[f][: len(order)].tolist() == where[order, l, f].tolist()
            checked += len(order)
    assert checked > 50
    card = store.card(LAYER, 3)
    assert card.examples and card.examples[0].activation == pytest.approx(float(best[:, LAYER, 3].max()), abs=1e-5)
    hl = card.examples[0]
    assert hl.activations[hl.highlight] == pytest.approx(hl.activation, abs=1e-4)
    assert "L1:3" in card.text()


def test_circuit_tracer_feature_file_validates(planted, tmp_path):
    from crv.testing.peer import require_circuit_tracer

    require_circuit_tracer()
    from circuit_tracer.frontend.feature_models import Model

    att, _, _ = planted
    arrays, index = describe_features(att, _corpus(att, 4), DescribeConfig(circuit_rows_per_trace=8), progress=False)
    save_store(arrays, index, lambda i: att.tokenizer.decode([i]), tmp_path / "s")
    card = FeatureStore(tmp_path / "s").card(2, 5)
    doc = card.circuit_tracer_json("crv/reasoner", 7)
    Model.model_validate(json.loads(json.dumps(doc)))


def test_precision_at_k_counts_overlap_out_of_available_tokens():
    wl = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])
    act = torch.tensor([[2, 1, 7, -1, -1], [-1, -1, -1, -1, -1], [1, 2, 3, 4, 0]])
    p = precision_at_k(wl, act, 5)
    assert p[0] == pytest.approx(2 / 3) and torch.isnan(p[1]) and p[2] == 0
    assert isinstance(Corpus.from_sequences([[1, 2], [3]], "x").sequence(1), torch.Tensor)


def test_circuit_tracer_export_carries_feature_files_and_labels(tmp_path):
    """`crv attribute --export-circuit-tracer` on the shipped set (which ships descriptions): every feature node has a
    label (its description) and a feature file in circuit-tracer's layout where the graph's scan points."""
    from typer.testing import CliRunner

    from crv.cli import app
    from crv.tasks.cot import generate_problems
    from crv.tasks.label import label_output
    from crv.tasks.schema import write_records

    write_records([label_output(p, p.completion) for p in generate_problems("arith", 2, 1, seed=4)], tmp_path / "r.jsonl")
    out = tmp_path / "g"
    r = CliRunner().invoke(app, ["attribute", str(tmp_path / "r.jsonl"), "--out", str(out), "--max-feature-nodes", "64",
                                 "--export-circuit-tracer", "--threads", "1"])
    assert r.exit_code == 0, r.output
    ct = out / "circuit-tracer"
    graphs = [json.loads(p.read_text()) for p in ct.glob("*-step*.json")]
    assert graphs
    for g in graphs:
        assert g["metadata"]["scan"] == "./graph_data/features"
        feats = [n for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"]
        assert feats and all(n["clerp"] for n in feats)
        for n in feats:
            doc = json.loads((ct / "features" / f"{n['feature']}.json").read_text())
            assert doc["index"] == n["feature"] and doc["examples_quantiles"][0]["examples"]
