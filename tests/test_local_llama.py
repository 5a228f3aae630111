"""A user's own Llama + circuit-tracer-format transcoders on disk: the same code path, on a tiny GQA stand-in."""

import pytest

from crv.testing.peer import require_circuit_tracer
import torch

from crv.attribution.attributor import Attributor
from crv.testing.checks import completeness
from crv.attribution.engine import AttributionConfig
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output
from crv.transcoders.io import TranscoderLoadError, save_transcoders
from crv.transcoders.transcoder import TopKTranscoder, TranscoderShape


@pytest.fixture(scope="module")
def local_dirs(tiny_gqa_llama_dir, tmp_path_factory):
    """The tiny GQA Llama and random crv-format (TopK + ReLU) transcoders for it."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("local")
    shape = TranscoderShape(d_model=32, d_transcoder=96, k=6)
    tcs = []
    for layer in range(2):
        tc = TopKTranscoder(shape, layer)
        for p in tc.parameters():
            p.data = 0.3 * torch.randn_like(p)
        tcs.append(tc)
    save_transcoders(tcs, root / "tc", model_name="tiny-llama", dtype=torch.float32)
    return tiny_gqa_llama_dir, root / "tc"


def test_local_llama_and_transcoders_give_complete_graphs(local_dirs):
    model_dir, tc_dir = local_dirs
    att = Attributor.load(model_dir, tc_dir, AttributionConfig(max_feature_nodes=None))
    assert att.model.config.num_key_value_heads == 2
    prob = generate_problems("arith", 3, 1, seed=2)[0]
    rec = label_output(prob, prob.completion)
    graphs = att.step_graphs(rec)
    assert len(graphs) == len(rec.steps) and all(g.n_features > 0 for g in graphs)
    c = completeness(att.trace("Q: 1+2*3\n2*3=6 => 1+6\n"))
    assert c.feature_rel_error <= 1e-4 and c.logit_rel_error <= 1e-4


def test_mismatched_transcoders_are_refused(local_dirs, tmp_path):
    model_dir, _ = local_dirs
    shape = TranscoderShape(d_model=48, d_transcoder=96, k=6)
    save_transcoders([TopKTranscoder(shape, i) for i in range(2)], tmp_path / "bad", model_name="x", dtype=torch.float32)
    with pytest.raises(TranscoderLoadError, match="d_model"):
        Attributor.load(model_dir, tmp_path / "bad")


@pytest.mark.slow
def test_local_llama_matches_circuit_tracer(local_dirs):
    require_circuit_tracer()
    from crv.attribution.engine import TraceAttribution
    from crv.testing.peer import CircuitTracerPeer, compare_graphs

    model_dir, tc_dir = local_dirs
    att = Attributor.load(model_dir, tc_dir)
    peer = CircuitTracerPeer.load(model_dir, tc_dir)
    ids = att.encode("Q: (4-2)*3\n4-2=2 => 2*3\n")
    for cap in (None, 50):
        cfg = AttributionConfig(max_feature_nodes=cap)
        report = compare_graphs(TraceAttribution(att.model, att.transcoders, ids, cfg).graph(), peer.graph(ids, cfg))
        assert report.ok(), (cap, report)
