"""The structural fingerprint of one step graph: a fixed, named feature vector.

Computed on a :class:`~crv.fingerprint.summary.GraphSummary` (the graph pruned with
the paper's 0.8 / 0.98 thresholds). The pruned graph is the networkx ``DiGraph`` of
:func:`to_networkx`: edges source -> target (circuit-tracer's ``adjacency[target, source]``
transposed), weights ``|direct effect|``; the topology family is networkx's numbers on it,
computed in bulk by :mod:`crv.fingerprint.topology` (tests check them against networkx). Shortest paths are unweighted (signed or raw weights are
not distances). ``L`` = number of layers.

=============================  ========  =================================================================
name                           family    definition
=============================  ========  =================================================================
n_active_features              global    active transcoder features at positions <= the step's (unpruned)
n_pruned_features              global    feature nodes kept by pruning
n_pruned_errors                global    error nodes kept by pruning
top_logit_prob                 global    probability of the most likely attributed logit
logit_entropy                  global    -sum p log p over the attributed logits (<= 10, not renormalised)
error_influence_share          global    error nodes' share of the total influence of non-logit nodes
act_mean / act_max / act_std   node      activation of the kept feature nodes (0 if none)
infl_mean / infl_max /         node      influence on the logits of the kept non-logit nodes
infl_std
layer_hist_{l}, l < L          node      kept feature nodes in layer l
density                        topology  edges / (m (m - 1)) of the pruned graph (m nodes)
in_deg_mean / in_deg_max       topology  networkx in-degree centrality (in-degree / (m - 1))
out_deg_mean / out_deg_max     topology  networkx out-degree centrality
betweenness_mean / _max        topology  networkx betweenness centrality (unweighted, normalised; estimated
                                         from 100 seeded pivots on graphs of more than 100 nodes)
n_weak_components              topology  weakly connected components of the pruned graph
edge_weight_mean / _max / _std topology  |weight| of the kept edges
longest_token_logit_path       topology  edges on the longest path from a token node to a logit node (0 if none)
=============================  ========  =================================================================

Graphs with fewer than two nodes or no edges get zeros for the topology family
(never silently: every value is computed, none is padded).
"""

from __future__ import annotations

import networkx as nx
import torch

from crv.attribution.graph import Graph
from crv.attribution.prune import EDGE_THRESHOLD, NODE_THRESHOLD
from crv.fingerprint.summary import ERROR, FEATURE, LOGIT, TOKEN, GraphSummary, summarize
from crv.fingerprint.topology import EdgeGraph, betweenness, degree_centrality, density, longest_path_from, weak_components

GLOBAL = ("n_active_features", "n_pruned_features", "n_pruned_errors", "top_logit_prob", "logit_entropy", "error_influence_share")
NODE_STATS = ("act_mean", "act_max", "act_std", "infl_mean", "infl_max", "infl_std")
TOPOLOGY = (
    "density", "in_deg_mean", "in_deg_max", "out_deg_mean", "out_deg_max", "betweenness_mean", "betweenness_max",
    "n_weak_components", "edge_weight_mean", "edge_weight_max", "edge_weight_std", "longest_token_logit_path",
)
#: betweenness is exact up to this many nodes, then estimated from this many seeded pivot nodes
BETWEENNESS_EXACT_NODES = 100


def feature_names(n_layers: int) -> list[str]:
    """The fingerprint's column names, in order, for a model with ``n_layers`` layers."""
    return list(GLOBAL) + list(NODE_STATS) + [f"layer_hist_{l}" for l in range(n_layers)] + list(TOPOLOGY)


def feature_families(n_layers: int) -> dict[str, list[str]]:
    """Column names by family: ``global``, ``node``, ``topology``."""
    return {
        "global": list(GLOBAL),
        "node": list(NODE_STATS) + [f"layer_hist_{l}" for l in range(n_layers)],
        "topology": list(TOPOLOGY),
    }


def _stats(x: torch.Tensor) -> tuple[float, float, float]:
    if x.numel() == 0:
        return 0.0, 0.0, 0.0
    x = x.double()
    return float(x.mean()), float(x.max()), float(x.std(unbiased=False))


def to_networkx(s: GraphSummary) -> nx.DiGraph:
    """The pruned graph: nodes 0..m-1 with ``kind``/``layer``/``pos``, edges source -> target with ``weight`` = |effect|."""
    g = nx.DiGraph()
    for i, (k, l, p) in enumerate(zip(s.node_kind.tolist(), s.node_layer.tolist(), s.node_pos.tolist())):
        g.add_node(i, kind=k, layer=l, pos=p)
    g.add_weighted_edges_from(zip(s.edge_src.tolist(), s.edge_dst.tolist(), s.edge_weight.abs().tolist()))
    return g


#: finer groups of the fingerprint's names, for importance by group (name prefix -> group)
FEATURE_GROUPS = (
    ("n_active_features", "size"), ("n_pruned_", "size"), ("top_logit_prob", "logits"), ("logit_entropy", "logits"),
    ("error_influence_share", "errors"), ("act_", "activation"), ("infl_", "influence"), ("layer_hist_", "layers"),
    ("density", "density"), ("in_deg_", "degree"), ("out_deg_", "degree"), ("betweenness_", "betweenness"),
    ("n_weak_components", "components"), ("edge_weight_", "edge weights"), ("longest_token_logit_path", "paths"),
)


def feature_group(name: str) -> str:
    """The group of a fingerprint name (``"act_max"`` -> ``"activation"``; a ``"target:"`` prefix is kept in front)."""
    target, _, bare = name.rpartition(":")
    for prefix, group in FEATURE_GROUPS:
        if bare.startswith(prefix):
            return f"{target}:{group}" if target else group
    raise KeyError(f"{name!r} is not a fingerprint feature name")


def fingerprint_summary(s: GraphSummary) -> dict[str, float]:
    """The named feature vector of one summarised step graph."""
    kind = s.node_kind
    p = s.logit_probabilities.double()
    out: dict[str, float] = {
        "n_active_features": float(s.n_active_features),
        "n_pruned_features": float((kind == FEATURE).sum()),
        "n_pruned_errors": float((kind == ERROR).sum()),
        "top_logit_prob": float(p.max()) if p.numel() else 0.0,
        "logit_entropy": float(-(p * torch.log(p.clamp_min(1e-12))).sum()),
        "error_influence_share": float(s.error_influence_share),
    }
    out["act_mean"], out["act_max"], out["act_std"] = _stats(s.node_activation[kind == FEATURE])
    out["infl_mean"], out["infl_max"], out["infl_std"] = _stats(s.node_influence[kind != LOGIT])
    hist = torch.bincount(s.node_layer[kind == FEATURE], minlength=s.n_layers)[: s.n_layers]
    out.update({f"layer_hist_{l}": float(c) for l, c in enumerate(hist.tolist())})

    topo = dict.fromkeys(TOPOLOGY, 0.0)
    g = EdgeGraph(s.n_nodes, s.edge_src.numpy(), s.edge_dst.numpy())
    m = g.m
    if m >= 2 and g.n_edges > 0:
        topo["density"] = density(g)
        for name, cent in zip(("in_deg", "out_deg"), degree_centrality(g)):
            topo[f"{name}_mean"], topo[f"{name}_max"] = float(cent.sum()) / m, float(cent.max())
        bc = betweenness(g, k=None if m <= BETWEENNESS_EXACT_NODES else BETWEENNESS_EXACT_NODES, seed=0)
        topo["betweenness_mean"], topo["betweenness_max"] = float(bc.sum()) / m, float(bc.max())
        topo["n_weak_components"] = float(weak_components(g))
        topo["edge_weight_mean"], topo["edge_weight_max"], topo["edge_weight_std"] = _stats(s.edge_weight.abs())
        kinds = s.node_kind.numpy()
        topo["longest_token_logit_path"] = float(longest_path_from(g, kinds == TOKEN, kinds == LOGIT))
    elif m >= 1:
        topo["n_weak_components"] = float(m)
    out.update(topo)
    return {name: out[name] for name in feature_names(s.n_layers)}


def fingerprint(graph: Graph, node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD) -> dict[str, float]:
    """Prune a step graph and return its named structural fingerprint."""
    return fingerprint_summary(summarize(graph, node_threshold=node_threshold, edge_threshold=edge_threshold))


def step_fingerprint(view) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The fingerprint of a :class:`~crv.attribution.attributor.StepView` (its graph and pruned graph, computed once)."""
    return fingerprint_summary(summarize(view.graph, view.pruned))
