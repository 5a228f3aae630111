"""A step graph reduced to what its fingerprint reads: the pruned subgraph plus a few unpruned facts.

A dense step graph is tens of MB (thousands of nodes squared); its pruned subgraph is
a few hundred nodes and edges, so this is what ``graphs/`` caches. Saved without
pickle: one safetensors file per trace (tensors keyed ``"<step>.<field>"``) and a
JSON file with the per-step metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from crv.attribution.graph import Graph
from crv.attribution.prune import EDGE_THRESHOLD, NODE_THRESHOLD, Pruned, prune

FEATURE, ERROR, TOKEN, LOGIT = 0, 1, 2, 3
_TENSORS = (
    "node_kind", "node_layer", "node_pos", "node_activation", "node_influence",
    "edge_src", "edge_dst", "edge_weight", "active_per_layer", "logit_probabilities",
)


@dataclass
class GraphSummary:
    """The pruned subgraph of one step graph (nodes re-indexed 0..m-1) and unpruned statistics."""

    node_kind: torch.Tensor  # [m] int8: FEATURE, ERROR, TOKEN, LOGIT
    node_layer: torch.Tensor  # [m] (tokens -1, logits n_layers)
    node_pos: torch.Tensor  # [m]
    node_activation: torch.Tensor  # [m] feature activation (0 for other nodes)
    node_influence: torch.Tensor  # [m] influence on the logits (unpruned graph)
    edge_src: torch.Tensor  # [e] kept edges, source -> target
    edge_dst: torch.Tensor  # [e]
    edge_weight: torch.Tensor  # [e] signed direct effect
    active_per_layer: torch.Tensor  # [n_layers] active features per layer (unpruned, all positions)
    logit_probabilities: torch.Tensor  # [n_logits], descending
    n_layers: int
    error_influence_share: float  # error nodes' share of all non-logit influence (unpruned)
    meta: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return int(self.node_kind.shape[0])

    @property
    def n_active_features(self) -> int:
        return int(self.active_per_layer.sum())


def summarize(graph: Graph, pruned: Pruned | None = None, node_threshold: float = NODE_THRESHOLD,
              edge_threshold: float = EDGE_THRESHOLD) -> GraphSummary:
    """Prune ``graph`` (paper thresholds unless ``pruned`` is given) and keep what fingerprints need."""
    pr = pruned if pruned is not None else prune(graph, node_threshold, edge_threshold)
    nf, L, T = graph.n_features, graph.n_layers, graph.n_pos
    n = graph.n_nodes
    kind = torch.full((n,), FEATURE, dtype=torch.int8)
    layer = torch.empty(n, dtype=torch.long)
    pos = torch.empty(n, dtype=torch.long)
    act = torch.zeros(n)
    sel = graph.active_features[graph.selected_features]
    layer[:nf], pos[:nf] = sel[:, 0], sel[:, 1]
    act[:nf] = graph.activation_values[graph.selected_features]
    e0, t0, l0 = nf, nf + L * T, nf + L * T + T
    kind[e0:t0], kind[t0:l0], kind[l0:] = ERROR, TOKEN, LOGIT
    layer[e0:t0] = torch.arange(L).repeat_interleave(T)
    pos[e0:t0] = torch.arange(T).repeat(L)
    layer[t0:l0], pos[t0:l0] = -1, torch.arange(T)
    layer[l0:], pos[l0:] = L, T - 1
    infl = pr.node_influence
    non_logit = infl[:l0].sum().clamp_min(1e-12)
    keep = pr.node_mask.nonzero(as_tuple=True)[0]
    new_index = torch.full((n,), -1, dtype=torch.long)
    new_index[keep] = torch.arange(len(keep))
    dst, src = pr.edges()  # adjacency[target, source]
    return GraphSummary(
        node_kind=kind[keep], node_layer=layer[keep], node_pos=pos[keep], node_activation=act[keep],
        node_influence=infl[keep].float(),
        edge_src=new_index[src], edge_dst=new_index[dst], edge_weight=graph.adjacency[dst, src].float(),
        active_per_layer=torch.bincount(graph.active_features[:, 0], minlength=L)[:L],
        logit_probabilities=graph.logit_probabilities.float(),
        n_layers=L,
        error_influence_share=float(infl[e0:t0].sum() / non_logit),
        meta={k: graph.meta.get(k) for k in ("problem_id", "task", "step_index", "position", "model", "transcoders", "settings")},
    )


def save_summaries(summaries: list[GraphSummary], path: str | Path) -> Path:
    """Write the summaries of one trace to ``<path>.safetensors`` + ``<path>.json`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{i}.{k}": getattr(s, k).contiguous().clone() for i, s in enumerate(summaries) for k in _TENSORS}
    info = [{"n_layers": s.n_layers, "error_influence_share": s.error_influence_share, "meta": s.meta} for s in summaries]
    st = path.with_name(path.name + ".safetensors")
    js = path.with_name(path.name + ".json")
    save_file(tensors, str(st) + ".tmp")
    Path(str(st) + ".tmp").replace(st)
    Path(str(js) + ".tmp").write_text(json.dumps(info, default=str))
    Path(str(js) + ".tmp").replace(js)  # written last: its presence marks a complete cache entry
    return path


def load_summaries(path: str | Path) -> list[GraphSummary]:
    path = Path(path)
    info = json.loads(path.with_name(path.name + ".json").read_text())
    tensors = load_file(str(path.with_name(path.name + ".safetensors")))
    return [
        GraphSummary(**{k: tensors[f"{i}.{k}"] for k in _TENSORS}, n_layers=d["n_layers"],
                     error_influence_share=d["error_influence_share"], meta=d["meta"])
        for i, d in enumerate(info)
    ]
