"""The attribution engine on the shipped reasoner + transcoders (and against circuit-tracer when installed)."""

import pytest

from crv.testing.peer import require_circuit_tracer
import torch

from crv.attribution.attributor import Attributor
from crv.testing.checks import completeness
from crv.attribution.engine import AttributionConfig, TraceAttribution
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output


@pytest.fixture(scope="module")
def att():
    return Attributor.load()


@pytest.fixture(scope="module")
def record():
    prob = generate_problems("arith", 3, 1, seed=7)[0]
    return label_output(prob, prob.completion)


@pytest.mark.slow
def test_shipped_rows_are_complete(att, record):
    c = completeness(att.trace(att.encode_record(record).ids))
    assert c.n_features > 100 and c.n_logits >= 1
    assert c.feature_rel_error <= 1e-4
    assert c.logit_rel_error <= 1e-4


@pytest.mark.slow
def test_shipped_step_graphs_equal_prefix_graphs(att, record):
    graphs = att.step_graphs(record)
    assert len(graphs) == len(record.steps)
    enc = att.encode_record(record)
    ids = enc.ids
    cfg = AttributionConfig(max_feature_nodes=300)
    tr = TraceAttribution(att.model, att.transcoders, ids, cfg)
    for k in range(len(record.steps)):
        pos = enc.last(k)
        assert att.tokenizer.decode([int(ids[pos])]) == record.steps[k][-1]
        assert att.tokenizer.decode([int(ids[pos + 1])]) == "\n"
        assert graphs[k].meta["step_index"] == k and graphs[k].n_pos == pos + 1
        g = tr.graph(pos)
        h = TraceAttribution(att.model, att.transcoders, ids[: pos + 1], cfg).graph()
        assert torch.equal(g.selected_features, h.selected_features)
        assert torch.equal(g.logit_tokens, h.logit_tokens)
        assert torch.allclose(g.adjacency, h.adjacency, rtol=1e-4, atol=1e-6 * h.adjacency.abs().max())


@pytest.mark.slow
def test_same_graph_as_circuit_tracer(att, record):
    require_circuit_tracer()
    from crv.testing.peer import CircuitTracerPeer, compare_graphs
    from crv.lm.load import DEFAULT_MODEL_DIR
    from crv.transcoders.io import DEFAULT_TRANSCODER_DIR

    peer = CircuitTracerPeer.load(DEFAULT_MODEL_DIR, DEFAULT_TRANSCODER_DIR)
    enc = att.encode_record(record)
    ids = enc.ids[: enc.last(0) + 1]  # the first step's graph
    for cap in (None, 200):
        cfg = AttributionConfig(max_feature_nodes=cap)
        mine = TraceAttribution(att.model, att.transcoders, ids, cfg).graph()
        report = compare_graphs(mine, peer.graph(ids, cfg))
        assert report.same_nodes, cap
        assert report.max_rel_diff <= 1e-4, (cap, report)
