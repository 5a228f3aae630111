"""Exactness of the attribution engine on a tiny model with tiny transcoders."""

import pytest
import torch

from crv.lm.encode import TraceEncoder
from crv.lm.prompt import PlainFormat
from crv.attribution.engine import AttributionConfig, TraceAttribution, salient_logits
from crv.attribution.graph import Graph
from crv.attribution.prune import edge_influence, node_influence, prune, threshold_for
from crv.lm.load import load_model
from crv.lm.encode import encode_text
from crv.transcoders.io import load_transcoders
from crv.transcoders.train import TranscoderTrainConfig, train_transcoders

TEXT = "Q: (3+4)*2\n3+4=7 => 7*2\n7*2=14 => 14\nA: 14\n"


@pytest.fixture(scope="module")
def setup(tiny_reasoner_dir, tmp_path_factory):
    model, tok = load_model(tiny_reasoner_dir)
    out = tmp_path_factory.mktemp("tc")
    cfg = TranscoderTrainConfig(expansion=4, k=4, steps=30, batch_tokens=256, buffer_tokens=2048, dead_tokens=4000, warmup=5)
    train_transcoders(model, TraceEncoder(tok, PlainFormat()), cfg, out, progress=False)
    ids = torch.tensor(encode_text(tok, TEXT))
    return model, load_transcoders(out, model=model), ids


def frozen_forward(lin, drop_source=None):
    """Independent oracle: run the frozen linear replacement model, optionally without one source's write."""
    cap, L, T = lin.cap, lin.n_layers, lin.n_pos
    r = cap.embed.clone()
    if drop_source is not None and drop_source >= lin.token_offset:
        r[drop_source - lin.token_offset] = 0
    mids = []
    for l in range(L):
        x = r * lin.w_in[l] * cap.scale_in[l][:, None]
        v = (x @ lin.W_V[l].T).view(T, lin.n_kv, lin.d_head)
        v = v.repeat_interleave(lin.n_heads // lin.n_kv, 1)  # [T, H, dh]
        o = torch.einsum("hqk,khe->qhe", cap.attn[l], v).reshape(T, -1) @ lin.W_O[l].T
        mid = r + o
        mids.append(mid)
        writes = lin.errors[l].clone() + lin.b_dec[l]
        writes[0] += lin.bos_out[l]  # BOS's MLP output is a constant, not a node
        sel = (lin.features.layer == l).nonzero(as_tuple=True)[0]
        for i, vec in zip(sel.tolist(), lin.scaled_decoders(sel)):
            if i != drop_source:
                writes[lin.features.pos[i]] += vec
        if lin.W_skip[l] is not None:  # a skip connection is linear in the MLP input
            writes += (mid * lin.w_post[l] * cap.scale_post[l][:, None]) @ lin.W_skip[l].T
        if drop_source is not None and lin.error_offset <= drop_source < lin.token_offset:
            e = drop_source - lin.error_offset
            if e // T == l:
                writes[e % T] -= lin.errors[l, e % T]
        r = mid + writes
    return mids, r


def test_rows_are_complete(setup):
    model, ts, ids = setup
    tr = TraceAttribution(model, ts, ids, AttributionConfig(max_feature_nodes=None))
    lin = tr.lin
    assert lin.n_features > 0
    for layer in range(lin.n_layers):
        sel = (lin.features.layer == layer).nonzero(as_tuple=True)[0]
        rows, bias = lin.rows(layer, lin.features.pos[sel], lin.feature_reading_vectors(sel))
        pre = rows.sum(1) + bias + lin.b_enc[sel]
        assert torch.allclose(pre, lin.features.pre[sel], rtol=1e-4, atol=1e-5 * lin.features.pre.abs().max())
    pos = len(ids) - 1
    tokens, _ = salient_logits(tr.cap.logits[pos], 10, 0.95)
    rows, bias = lin.rows(lin.n_layers, torch.full((len(tokens),), pos), lin.logit_reading_vectors(pos, tokens))
    centred = tr.cap.logits[pos, tokens] - tr.cap.logits[pos].mean()
    assert torch.allclose(rows.sum(1) + bias, centred, rtol=1e-4, atol=1e-4)


def test_edges_equal_ablation_effects(setup):
    model, ts, ids = setup
    tr = TraceAttribution(model, ts, ids)
    lin = tr.lin
    target = int((lin.features.layer == lin.n_layers - 1).nonzero()[-1])  # a late-layer feature
    l, p = int(lin.features.layer[target]), int(lin.features.pos[target])
    read = lin.feature_reading_vectors(torch.tensor([target]))[0]
    row = tr.feature_rows(torch.tensor([target]))[0]
    base = frozen_forward(lin)[0][l][p] @ read
    assert torch.allclose(base + lin.b_enc[target], lin.features.pre[target], rtol=1e-4)
    candidates = [int(i) for i in (lin.features.layer < l).nonzero(as_tuple=True)[0][:5]]
    candidates += [lin.error_offset + 0 * lin.n_pos + p, lin.token_offset + p, lin.token_offset + 1]
    for s in candidates:
        ablated = frozen_forward(lin, drop_source=s)[0][l][p] @ read
        assert torch.allclose(base - ablated, row[s], rtol=1e-3, atol=1e-6), s


@pytest.mark.parametrize("cap", [None, 40])
def test_per_trace_graph_equals_graph_of_prefix(setup, cap):
    model, ts, ids = setup
    cfg = AttributionConfig(max_feature_nodes=cap, batch_size=8, update_interval=2)
    trace = TraceAttribution(model, ts, ids, cfg)
    for pos in (TEXT.index("\n3+4") + 1, TEXT.index("\n7*2") + 1, len(ids) - 2):
        g = trace.graph(pos)
        h = TraceAttribution(model, ts, ids[: pos + 1], cfg).graph()
        assert torch.equal(g.tokens, h.tokens) and torch.equal(g.logit_tokens, h.logit_tokens)
        assert torch.equal(g.selected_features, h.selected_features)
        assert torch.equal(g.active_features, h.active_features)
        assert torch.allclose(g.adjacency, h.adjacency, rtol=1e-4, atol=1e-6 * h.adjacency.abs().max())
        if cap is not None:
            assert g.n_features == min(cap, len(g.active_features))


def test_pruning_keeps_tokens_logits_and_reaches_thresholds(setup):
    model, ts, ids = setup
    g = TraceAttribution(model, ts, ids).graph()
    pr = prune(g, node_threshold=0.8, edge_threshold=0.98)
    keep = g.n_pos + g.n_logits
    assert pr.node_mask[-keep:].all()
    assert 0 < pr.node_mask[:-keep].sum() < g.n_nodes - keep
    weights = torch.zeros(g.n_nodes)
    weights[-g.n_logits:] = g.logit_probabilities
    infl = node_influence(g.adjacency, weights)
    assert torch.allclose(infl, pr.node_influence)
    thr = threshold_for(infl, 0.8)
    by_threshold = infl >= thr
    assert infl[by_threshold].sum() >= 0.8 * infl.sum() - 1e-6
    assert (pr.node_mask[:-keep] <= by_threshold[:-keep]).all()  # clean-up only removes nodes
    mask = by_threshold.clone()
    mask[-keep:] = True
    masked = g.adjacency.clone()
    masked[~mask] = 0
    masked[:, ~mask] = 0
    scores = edge_influence(masked, weights)
    assert scores[scores >= threshold_for(scores, 0.98)].sum() >= 0.98 * scores.sum() - 1e-6
    kept_edges = pr.edge_mask
    inner = pr.node_mask.clone()
    inner[-keep:] = False
    assert kept_edges[:, inner].any(0).all()  # every kept feature/error node feeds something
    feats = pr.node_mask[: g.n_features]
    assert kept_edges[: g.n_features][feats].any(1).all()  # every kept feature has an input
    with pytest.raises(ValueError):
        prune(g, node_threshold=1.5)


def test_graph_save_load_round_trip(setup, tmp_path):
    model, ts, ids = setup
    g = TraceAttribution(model, ts, ids, meta={"trace": "t1"}).graph(step_index=2)
    g.save(tmp_path / "g")
    back = Graph.load(tmp_path / "g")
    for name in ("tokens", "active_features", "activation_values", "selected_features", "adjacency", "logit_tokens"):
        assert torch.equal(getattr(g, name), getattr(back, name))
    assert back.meta["step_index"] == 2 and back.meta["trace"] == "t1"
    assert len(g.node_table()) == g.n_nodes


@pytest.mark.slow
@pytest.mark.parametrize("model_fixture", ["shipped", "gqa"])
def test_row_kernel_gives_the_reference_rows(model_fixture, request, tmp_path):
    """The batched row kernel (shared path coefficients, token table) = LinearReplacement.rows, on every layer."""
    from crv.attribution.capture import capture_forward
    from crv.attribution.linear import LinearReplacement
    from crv.attribution.engine import RowCache
    from crv.attribution.row_kernel import RowKernel
    from crv.transcoders.transcoder import TopKTranscoder, TranscoderShape
    from crv.transcoders.io import save_transcoders

    if model_fixture == "shipped":
        model, tok = load_model()
        ts = load_transcoders(model=model)
        text = "Q: 7-(2*3+5)\n2*3=6 => 7-(6+5)\n6+5=11 => 7-11\n7-11=-4 => -4\nA: -4\n"
    else:  # grouped-query attention, random TopK transcoders
        model, tok = load_model(request.getfixturevalue("tiny_gqa_llama_dir"))
        torch.manual_seed(1)
        shape = TranscoderShape(model.config.hidden_size, 48, 6)
        layers = [TopKTranscoder(shape, l) for l in range(model.config.num_hidden_layers)]
        for t in layers:
            for p in t.parameters():
                p.data = 0.3 * torch.randn_like(p)
        save_transcoders(layers, tmp_path, model_name="tiny-gqa", dtype=torch.float32)
        ts = load_transcoders(tmp_path, model=model)
        text = TEXT
    ids = torch.tensor(encode_text(tok, text))
    with torch.no_grad():
        lin = LinearReplacement(model, ts, capture_forward(model, ids))
    columns = RowCache(lin, 64).columns
    kernel = RowKernel(lin)
    for use_table in (False, True):
        if use_table:
            kernel.token_table = kernel._build_token_table()
        for layer in range(lin.n_layers):
            sel = (lin.features.layer == layer).nonzero(as_tuple=True)[0]
            sel = sel[lin.features.pos[sel].argsort(stable=True)]
            for chunk in (sel[:37], sel[-50:], sel[::3]):
                ref, _ = lin.rows(layer, lin.features.pos[chunk], lin.feature_reading_vectors(chunk))
                ref = ref[:, columns[layer]]
                got = kernel.rows(layer, chunk)
                assert got.shape == ref.shape
                assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())), (use_table, layer)
        # one sweep over features of every layer at once (how the cache calls it): each layer's rows as above
        mixed = torch.randperm(lin.n_features, generator=torch.Generator().manual_seed(0))[:97]
        seen = 0
        for layer, chunk, got in kernel.sweep(mixed):
            assert bool((lin.features.layer[chunk] == layer).all())
            ref, _ = lin.rows(layer, lin.features.pos[chunk], lin.feature_reading_vectors(chunk))
            ref = ref[:, columns[layer]]
            assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())), (use_table, layer)
            seen += len(chunk)
        assert seen == len(mixed)
