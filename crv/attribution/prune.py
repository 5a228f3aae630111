"""Influence on the logits, and pruning to the nodes / edges that carry most of it.

Same definitions as circuit-tracer: rows of ``|A|`` are normalised to sum to one,
node influence is ``w (B + B^2 + ...)`` where ``w`` puts the logit probabilities on
the logit nodes, and a threshold keeps the smallest set of nodes (then edges)
whose influence adds up to the requested fraction. Token and logit nodes are
always kept; feature and error nodes left without outgoing edges (and features
without incoming edges) are removed until nothing changes.

:func:`prune` never forms a normalised copy of the dense adjacency: only feature and logit
rows are non-zero, and feature rows only reach features of lower layers, so the influence
is one top-down pass over the layer blocks of ``|A|`` (:func:`graph_influence`); edges are
scored on the subgraph of the kept nodes. :func:`node_influence` / :func:`edge_influence`
are the dense definitions, kept as the reference (tests check both agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from crv.attribution.graph import Graph


@dataclass(frozen=True)
class Pruned:
    """What pruning keeps: nodes, edges (on the kept subgraph) and every node's influence."""

    node_mask: torch.Tensor  # [n_nodes] bool
    node_influence: torch.Tensor  # [n_nodes] raw influence on the logits
    cumulative_scores: torch.Tensor  # [n_nodes] cumulative-rank fraction of influence (circuit-tracer's scores)
    kept: torch.Tensor  # [k] node indices that passed the node threshold (ascending), a superset of node_mask's
    sub_edges: torch.Tensor  # [k, k] bool kept edges among ``kept`` (target, source)

    def edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept edges as ``(target, source)`` node indices, in row-major order (as ``edge_mask.nonzero()``)."""
        r, c = self.sub_edges.nonzero(as_tuple=True)
        return self.kept[r], self.kept[c]

    @property
    def edge_mask(self) -> torch.Tensor:
        """Kept edges as a dense ``[n_nodes, n_nodes]`` bool matrix (built on demand)."""
        n = self.node_mask.shape[0]
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[self.edges()] = True
        return mask


def normalize_rows(adjacency: torch.Tensor) -> torch.Tensor:
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def node_influence(adjacency: torch.Tensor, logit_weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """Total influence of every node on the weighted logits (the graph is acyclic, so the series ends)."""
    b = normalize_rows(adjacency)
    prod = logit_weights @ b
    total = torch.zeros_like(prod)
    for _ in range(max_iter):
        if not prod.any():
            return total
        total += prod
        prod = prod @ b
    raise RuntimeError("influence did not converge: the graph has a cycle")


def edge_influence(adjacency: torch.Tensor, logit_weights: torch.Tensor) -> torch.Tensor:
    """Influence carried by every edge: normalised edge weight times its target's influence."""
    b = normalize_rows(adjacency)
    target_influence = node_influence(adjacency, logit_weights) + logit_weights
    return b * target_influence[:, None]


def graph_influence(graph: Graph) -> Float[Tensor, " n_nodes"]:
    """:func:`node_influence` of a step graph's adjacency, by one top-down pass over its layer blocks.

    Error and token rows are zero and a layer-``l`` feature's row is zero on features of layers ``>= l``,
    so with ``y`` the features' influence, ``y = x[f] + y B[f, f]`` is solved layer by layer from the top
    and the rest is ``x + y B[f, :]`` (``x`` = the logits' normalised rows weighted by their probabilities).
    """
    A, nf, nl = graph.adjacency, graph.n_features, graph.n_logits
    logit_abs = A[-nl:].abs()
    x = (graph.logit_probabilities.to(A.dtype) / logit_abs.sum(1).clamp_min(1e-10)) @ logit_abs
    if nf == 0:
        return x
    layer = graph.active_features[graph.selected_features, 0]
    if bool((layer[1:] < layer[:-1]).any()):  # not in layer order (not made by crv's engine): the dense definition
        weights = torch.zeros(graph.n_nodes, dtype=A.dtype)
        weights[-nl:] = graph.logit_probabilities.to(A.dtype)
        return node_influence(A, weights)
    starts = torch.searchsorted(layer, torch.arange(graph.n_layers + 1)).tolist()
    other_abs = A[:nf, nf:].abs()  # features' edges from errors and tokens
    inv = other_abs.sum(1)
    y = x[:nf].clone()
    for l in range(graph.n_layers - 1, -1, -1):
        a, b = starts[l], starts[l + 1]
        if b == a:
            continue
        block = A[a:b, :a].abs()  # layer-l features' edges from lower-layer features (the rest of the row is 0)
        inv[a:b] = 1.0 / (inv[a:b] + block.sum(1)).clamp_min(1e-10)
        if a > 0:  # y[a:b] is final here: every higher layer has been applied
            y[:a] += (y[a:b] * inv[a:b]) @ block
    total = x.clone()
    total[:nf] = y
    total[nf:] += (y * inv) @ other_abs
    return total


def threshold_for(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Smallest score kept so that the kept scores sum to ``fraction`` of the total."""
    values = scores.flatten().sort(descending=True).values
    cum = values.cumsum(0) / values.sum().clamp_min(1e-12)
    k = int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype, device=cum.device)))
    return values[min(k, len(values) - 1)]


#: the paper's (and circuit-tracer's) pruning thresholds: the nodes, then the edges, carrying this share of the
#: influence on the logits are kept. Defined here once; every other default refers to these.
NODE_THRESHOLD, EDGE_THRESHOLD = 0.8, 0.98


def prune(graph: Graph, node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD) -> Pruned:
    """Keep the nodes carrying ``node_threshold`` of the influence, then edges carrying ``edge_threshold``.

    Edge scores are computed on the subgraph of the kept nodes only (the same numbers as on the
    full matrix with the other nodes zeroed, at a fraction of the cost); zero-weight edges are never kept.
    """
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {v}")
    A = graph.adjacency
    n = A.shape[0]
    n_keep_always = graph.n_pos + graph.n_logits
    influence = graph_influence(graph)
    node_mask = influence >= threshold_for(influence, node_threshold)
    node_mask[-n_keep_always:] = True
    kept = node_mask.nonzero(as_tuple=True)[0]
    sub = A[kept][:, kept]
    weights = torch.zeros(len(kept), dtype=A.dtype)
    weights[-graph.n_logits :] = graph.logit_probabilities.to(A.dtype)
    scores = edge_influence(sub, weights)
    positive = scores[scores > 0]
    sub_edges = (scores >= threshold_for(positive, edge_threshold)) & (scores > 0) if positive.numel() else scores > 0
    # clean-up on the subgraph: drop feature/error nodes with no outgoing edge, features with no incoming edge
    always = kept >= n - n_keep_always
    is_feature = kept < graph.n_features
    sub_nodes = torch.ones(len(kept), dtype=torch.bool)
    while True:
        old = sub_nodes.clone()
        sub_edges[~sub_nodes] = False
        sub_edges[:, ~sub_nodes] = False
        sub_nodes &= always | sub_edges.any(0)
        sub_nodes &= ~is_feature | sub_edges.any(1)
        if torch.equal(old, sub_nodes):
            break
    node_mask = torch.zeros(n, dtype=torch.bool)
    node_mask[kept[sub_nodes]] = True
    order = influence.sort(descending=True)
    cum = order.values.cumsum(0) / order.values.sum().clamp_min(1e-12)
    cumulative = torch.zeros_like(influence)
    cumulative[order.indices] = cum
    return Pruned(node_mask, influence, cumulative, kept, sub_edges)
