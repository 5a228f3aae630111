"""Fingerprint features on hand-built graphs with known answers, and on a real step graph."""

import math

import pytest
import torch

import networkx as nx

from crv.fingerprint.features import BETWEENNESS_EXACT_NODES, TOPOLOGY, feature_families, feature_names, fingerprint_summary, to_networkx
from crv.fingerprint.summary import ERROR, FEATURE, LOGIT, TOKEN, GraphSummary, load_summaries, save_summaries


def summary(kinds, layers, edges, acts=None, infl=None, probs=(0.75, 0.25), n_layers=2, active=(3, 5)):
    m = len(kinds)
    src, dst, w = zip(*edges) if edges else ((), (), ())
    return GraphSummary(
        node_kind=torch.tensor(kinds, dtype=torch.int8), node_layer=torch.tensor(layers), node_pos=torch.zeros(m, dtype=torch.long),
        node_activation=torch.tensor(acts if acts is not None else [0.0] * m),
        node_influence=torch.tensor(infl if infl is not None else [0.0] * m),
        edge_src=torch.tensor(src, dtype=torch.long), edge_dst=torch.tensor(dst, dtype=torch.long),
        edge_weight=torch.tensor(w, dtype=torch.float32),
        active_per_layer=torch.tensor(active), logit_probabilities=torch.tensor(probs), n_layers=n_layers,
        error_influence_share=0.1,
    )


def networkx_topology(s: GraphSummary) -> dict[str, float]:
    """The topology family computed the plain way, on a networkx DiGraph (the reference for the bulk code)."""
    g = to_networkx(s)
    m = g.number_of_nodes()
    out = dict.fromkeys(TOPOLOGY, 0.0)
    if m < 2 or g.number_of_edges() == 0:
        out["n_weak_components"] = float(m)
        return out
    out["density"] = nx.density(g)
    for name, cent in (("in_deg", nx.in_degree_centrality(g)), ("out_deg", nx.out_degree_centrality(g))):
        vals = list(cent.values())
        out[f"{name}_mean"], out[f"{name}_max"] = sum(vals) / m, max(vals)
    k = None if m <= BETWEENNESS_EXACT_NODES else BETWEENNESS_EXACT_NODES
    bc = list(nx.betweenness_centrality(g, k=k, seed=0, normalized=True).values())
    out["betweenness_mean"], out["betweenness_max"] = sum(bc) / m, max(bc)
    out["n_weak_components"] = float(nx.number_weakly_connected_components(g))
    w = s.edge_weight.abs().double()
    out["edge_weight_mean"], out["edge_weight_max"], out["edge_weight_std"] = float(w.mean()), float(w.max()), float(w.std(unbiased=False))
    best: dict[int, float] = {}
    for v in nx.topological_sort(g):
        start = 0.0 if g.nodes[v]["kind"] == TOKEN else -math.inf
        best[v] = max([start] + [best[u] + 1 for u in g.predecessors(v)])
    ends = [best[v] for v in g if g.nodes[v]["kind"] == LOGIT and best[v] > -math.inf]
    out["longest_token_logit_path"] = float(max(ends)) if ends else 0.0
    return out


def test_three_node_chain():
    # token -> feature -> logit, weights -2 and 0.5
    s = summary([TOKEN, FEATURE, LOGIT], [-1, 1, 2], [(0, 1, -2.0), (1, 2, 0.5)], acts=[0, 3.0, 0], infl=[0.6, 0.4, 0])
    f = fingerprint_summary(s)
    assert list(f) == feature_names(2)
    assert f["density"] == pytest.approx(2 / 6)
    assert f["in_deg_mean"] == pytest.approx((0 + 0.5 + 0.5) / 3) and f["in_deg_max"] == pytest.approx(0.5)
    assert f["out_deg_max"] == pytest.approx(0.5)
    assert f["betweenness_max"] == pytest.approx(0.5) and f["betweenness_mean"] == pytest.approx(0.5 / 3)
    assert f["n_weak_components"] == 1
    assert f["longest_token_logit_path"] == 2
    assert f["edge_weight_mean"] == pytest.approx(1.25) and f["edge_weight_max"] == pytest.approx(2.0)
    assert f["edge_weight_std"] == pytest.approx(0.75)
    assert f["n_active_features"] == 8 and f["n_pruned_features"] == 1 and f["n_pruned_errors"] == 0
    assert f["top_logit_prob"] == pytest.approx(0.75)
    assert f["logit_entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert f["act_mean"] == 3.0 and f["act_std"] == 0.0
    assert f["infl_mean"] == pytest.approx(0.5) and f["infl_max"] == pytest.approx(0.6)
    assert f["layer_hist_0"] == 0 and f["layer_hist_1"] == 1


def test_components_paths_and_degenerate_graphs():
    # two tokens, an error node feeding a feature, a feature reaching the logit by a 3-edge path, and an isolated token
    kinds = [TOKEN, TOKEN, ERROR, FEATURE, FEATURE, LOGIT]
    s = summary(kinds, [-1, -1, 0, 0, 1, 2], [(0, 3, 1.0), (2, 3, 1.0), (3, 4, 1.0), (4, 5, 1.0)])
    f = fingerprint_summary(s)
    assert f["n_weak_components"] == 2  # token 1 is alone
    assert f["longest_token_logit_path"] == 3
    assert f["n_pruned_errors"] == 1
    g = to_networkx(s)
    assert set(g.edges) == {(0, 3), (2, 3), (3, 4), (4, 5)}
    assert networkx_topology(s)["longest_token_logit_path"] == 3
    empty = fingerprint_summary(summary([TOKEN, LOGIT], [-1, 2], []))
    assert empty["density"] == 0 and empty["longest_token_logit_path"] == 0 and empty["n_weak_components"] == 2


def test_names_and_families_are_stable():
    names = feature_names(4)
    assert len(names) == 6 + 6 + 4 + 12 and len(set(names)) == len(names)
    fams = feature_families(4)
    assert sorted(sum(fams.values(), [])) == sorted(names)


def test_summaries_round_trip(tmp_path):
    s = summary([TOKEN, FEATURE, LOGIT], [-1, 1, 2], [(0, 1, -2.0), (1, 2, 0.5)], acts=[0, 3.0, 0])
    s.meta = {"problem_id": "p1", "step_index": 0}
    save_summaries([s, s], tmp_path / "trace")
    back = load_summaries(tmp_path / "trace")
    assert len(back) == 2 and back[1].meta["problem_id"] == "p1"
    assert fingerprint_summary(back[0]) == fingerprint_summary(s)


def test_fingerprint_of_a_real_step_graph():
    from crv.attribution.attributor import Attributor
    from crv.attribution.engine import AttributionConfig
    from crv.fingerprint.features import fingerprint
    from crv.fingerprint.summary import summarize
    from crv.tasks.cot import generate_problems
    from crv.tasks.label import label_output

    att = Attributor.load(config=AttributionConfig(max_feature_nodes=256))
    prob = generate_problems("arith", 3, 1, seed=1)[0]
    g = att.step_graphs(label_output(prob, prob.completion))[1]
    s = summarize(g)
    assert s.n_active_features == len(g.active_features)
    assert (s.node_kind == TOKEN).sum() == g.n_pos and (s.node_kind == LOGIT).sum() == g.n_logits  # always kept
    assert 0 < (s.node_kind == FEATURE).sum() <= g.n_features
    f = fingerprint(g)
    assert f["n_pruned_features"] == float((s.node_kind == FEATURE).sum())
    assert 0 < f["density"] < 1 and f["longest_token_logit_path"] >= 1
    assert all(math.isfinite(v) for v in f.values())


def test_bulk_topology_is_networkx_on_real_step_graphs():
    """The fingerprint's topology family equals networkx's, exact and pivot-sampled betweenness alike."""
    from crv.attribution.attributor import Attributor
    from crv.attribution.engine import AttributionConfig
    from crv.fingerprint.summary import summarize
    from crv.fingerprint.topology import EdgeGraph, betweenness
    from crv.tasks.cot import generate_problems
    from crv.tasks.label import label_output

    att = Attributor.load(config=AttributionConfig(max_feature_nodes=512))
    sizes = []
    for prob in generate_problems("arith", 1, 1, seed=3) + generate_problems("arith", 5, 1, seed=3):
        for g in att.step_graphs(label_output(prob, prob.completion)):
            s = summarize(g)
            sizes.append(s.n_nodes)
            f, ref = fingerprint_summary(s), networkx_topology(s)
            for name in TOPOLOGY:
                assert f[name] == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name
            exact = nx.betweenness_centrality(to_networkx(s), normalized=True)  # every node a source
            bulk = betweenness(EdgeGraph(s.n_nodes, s.edge_src.numpy(), s.edge_dst.numpy()))
            assert bulk == pytest.approx([exact[v] for v in range(s.n_nodes)], rel=1e-9, abs=1e-12)
    assert max(sizes) > BETWEENNESS_EXACT_NODES  # the fingerprint's pivot-sampled regime was checked


@pytest.mark.slow
def test_engine_reproduces_stored_fingerprints():
    """Same fingerprints (1e-6) as the engine before the faster rows, pruning and topology (stored at 91cc206)."""
    import json
    from pathlib import Path

    from crv.attribution.attributor import Attributor
    from crv.attribution.engine import AttributionConfig
    from crv.fingerprint.features import fingerprint
    from crv.tasks.cot import generate_problems
    from crv.tasks.label import label_output

    stored = json.loads((Path(__file__).parent / "fixtures" / "fingerprints_91cc206.json").read_text())
    by_cap: dict[int, list[dict]] = {}
    for row in stored["graphs"]:
        by_cap.setdefault(row["cap"], []).append(row)
    spec = stored["problems"]
    for cap, rows in by_cap.items():
        att = Attributor.load(config=AttributionConfig(max_feature_nodes=cap))
        problems = [p for task in ("arith", "bool") for p in generate_problems(task, spec[task]["n"], spec[task]["count"], seed=spec[task]["seed"])]
        now = [fingerprint(g) for p in problems for g in att.iter_step_graphs(label_output(p, p.completion))]
        assert len(now) == len(rows)
        for f, row in zip(now, rows):
            for name, value in row["fingerprint"].items():
                assert f[name] == pytest.approx(value, rel=1e-6, abs=1e-6), (cap, row["task"], row["step"], name)
