"""Export a crv graph to circuit-tracer's graph JSON (what its web frontend reads).

``write_circuit_tracer_files(graph, out_dir, slug, decode)`` writes ``<slug>.json``
and adds the graph to ``graph-metadata.json`` in ``out_dir``; serve that folder
with circuit-tracer's frontend to browse crv graphs. Nodes and links are those
kept by :func:`crv.attribution.prune.prune`, with circuit-tracer's node ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from crv.attribution.graph import Graph
from crv.attribution.prune import EDGE_THRESHOLD, NODE_THRESHOLD, Pruned, prune


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, js: str, feature: int, layer: str, pos: int, kind: str, **extra) -> dict:  # type: ignore[no-untyped-def]
    node = {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js,
            "clerp": "", "influence": None, "activation": None}
    node.update(extra)
    return node


def to_circuit_tracer_json(
    graph: Graph,
    decode: Callable[[int], str],
    slug: str,
    scan: str = "crv",
    node_threshold: float = NODE_THRESHOLD,
    edge_threshold: float = EDGE_THRESHOLD,
    prompt: str | None = None,
    describe: Callable[[int, int], str] | None = None,
) -> dict:
    """The graph as circuit-tracer's frontend JSON document; ``describe(layer, feature)`` fills each feature node's
    ``clerp`` (the label the frontend shows); ``prompt``: the text the graph was computed on,
    kept as given (default: the graph's ``meta["prompt"]``, else the joined per-token decodes, in which a
    character split across tokens shows as U+FFFD)."""
    pr = prune(graph, node_threshold, edge_threshold)
    scores = pr.cumulative_scores.tolist()
    nf, n_pos, L = graph.n_features, graph.n_pos, graph.n_layers
    err_end, tok_end = nf + L * n_pos, nf + L * n_pos + n_pos
    nodes: dict[int, dict] = {}
    for i in pr.node_mask.nonzero(as_tuple=True)[0].tolist():
        infl = scores[i]
        if i < nf:
            a = int(graph.selected_features[i])
            layer, pos, feat = graph.active_features[a].tolist()
            nodes[i] = _node(f"{layer}_{feat}_{pos}", f"{layer}_{feat}-0", _cantor(layer, feat), str(layer), pos,
                             "cross layer transcoder", influence=infl, activation=float(graph.activation_values[a]),
                             clerp=describe(layer, feat) if describe is not None else "")
        elif i < err_end:
            layer, pos = divmod(i - nf, n_pos)
            nodes[i] = _node(f"0_{layer}_{pos}", f"{layer}_{pos}-0", -1, str(layer), pos, "mlp reconstruction error",
                             influence=infl)
        elif i < tok_end:
            pos = i - err_end
            tok = int(graph.tokens[pos])
            nodes[i] = _node(f"E_{tok}_{pos}", f"E_{tok}-{pos}", pos, "E", pos, "embedding", influence=infl)
        else:
            j = i - tok_end
            tok, prob = int(graph.logit_tokens[j]), float(graph.logit_probabilities[j])
            layer = str(L + 1)
            nodes[i] = _node(f"{layer}_{tok}_{n_pos - 1}", f"L_{tok}-{n_pos - 1}", tok, layer, n_pos - 1, "logit",
                             token_prob=prob, is_target_logit=j == 0, clerp=f'Output "{decode(tok)}" (p={prob:.3f})')
    dst, src = pr.edges()
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[d]["node_id"], "weight": float(graph.adjacency[d, s])}
        for d, s in zip(dst.tolist(), src.tolist())
        if s in nodes and d in nodes
    ]
    connected = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    tokens = [decode(int(t)) for t in graph.tokens]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": tokens,
                "prompt": prompt if prompt is not None else graph.meta.get("prompt", "".join(tokens)),
                "node_threshold": node_threshold, "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


#: where exported feature files live, as the frontend's local server serves ``out_dir`` (``/graph_data/``)
FEATURE_SCAN = "./graph_data/features"


def write_circuit_tracer_files(
    graph: Graph, out_dir: str | Path, slug: str, decode: Callable[[int], str],
    feature_file: Callable[[int, int, int], dict] | None = None, **kwargs  # type: ignore[no-untyped-def]
) -> Path:
    """Write ``<slug>.json`` and register it in ``graph-metadata.json`` under ``out_dir``.

    With ``feature_file(layer, feature, index) -> dict`` (circuit-tracer's feature-file layout), each feature node's
    file is written to ``out_dir/features/<index>.json`` (``index``: the node's Cantor-paired feature id) and the
    graph's ``scan`` points there, so circuit-tracer's own frontend (``circuit_tracer.frontend.local_server.serve``
    on ``out_dir``) shows the examples and top logits of every feature."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if feature_file is not None:
        kwargs["scan"] = FEATURE_SCAN
    doc = to_circuit_tracer_json(graph, decode, slug, **kwargs)
    if feature_file is not None:
        (out_dir / "features").mkdir(exist_ok=True)
        for node in doc["nodes"]:
            if node["feature_type"] == "cross layer transcoder":
                layer, feat = int(node["layer"]), int(node["node_id"].split("_")[1])
                target = out_dir / "features" / f"{node['feature']}.json"
                if not target.is_file():
                    target.write_text(json.dumps(feature_file(layer, feat, node["feature"])))
    path = out_dir / f"{slug}.json"
    path.write_text(json.dumps(doc, indent=2))
    index = out_dir / "graph-metadata.json"
    meta = json.loads(index.read_text()) if index.is_file() else {"graphs": []}
    meta["graphs"] = [g for g in meta["graphs"] if g.get("slug") != slug] + [doc["metadata"]]
    index.write_text(json.dumps(meta, indent=2))
    return path


def graph_json(graph: Graph, pruned: Pruned, decode) -> dict:  # type: ignore[no-untyped-def]
    """The pruned graph as plain JSON: nodes (kind, layer, position, feature / token, activation, influence) and edges."""
    keep = pruned.node_mask.nonzero(as_tuple=True)[0].tolist()
    table = graph.node_table()
    index = {old: new for new, old in enumerate(keep)}
    nodes = []
    for old in keep:
        row = dict(table[old])
        if "token" in row:
            row["text"] = decode([row["token"]])
        row["influence"] = float(pruned.node_influence[old])
        nodes.append(row)
    dst, src = pruned.edges()
    edges = [{"source": index[s], "target": index[d], "weight": float(graph.adjacency[d, s])}
             for s, d in zip(src.tolist(), dst.tolist()) if s in index and d in index]
    return {"n_layers": graph.n_layers, "n_positions": graph.n_pos, "nodes": nodes, "edges": edges}


def write_pruned_graph(graph: Graph, pruned: Pruned, path: str | Path, decode) -> Path:  # type: ignore[no-untyped-def]
    """Write ``<path>.json.gz``: the pruned graph (kept nodes with their influence, kept edges, :func:`graph_json`),
    the graph's metadata and its size before pruning -- what the fingerprint and the viewer need, a few KB per step
    where the dense adjacency (``Graph.save``) is ``n_nodes^2`` floats."""
    import gzip
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"n_layers": graph.n_layers, "meta": graph.meta, "n_nodes_before_pruning": int(graph.adjacency.shape[0]),
           "n_active_features": int(graph.active_features.shape[0]), **graph_json(graph, pruned, decode)}
    out = path.with_name(path.name + ".json.gz")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        json.dump(doc, f, default=str, separators=(",", ":"))
    os.replace(tmp, out)
    return out
