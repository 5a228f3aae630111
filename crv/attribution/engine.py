"""Per-step attribution graphs of a whole trace from one forward pass.

Because the model is causal, activations, attention patterns, norm scales and
every feature's incoming edges at positions <= p are the same in a full trace
as in its prefix ending at p. :class:`TraceAttribution` therefore runs the
model once, computes each feature's edge row at most once (cached), and builds
the graph of any position from those rows plus its own logit rows and greedy
feature selection (circuit-tracer's procedure: visit features in order of
their current estimated influence on the logits, re-ranking every
``update_interval`` batches, up to ``max_feature_nodes``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import LlamaForCausalLM

from crv.attribution.capture import capture_forward
from crv.attribution.graph import Graph
from crv.attribution.linear import LinearReplacement
from crv.transcoders.io import TranscoderSet


@dataclass(frozen=True)
class AttributionConfig:
    """Attribution settings (the paper's: 10 logits / 0.95 probability / 4096 features)."""

    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    max_feature_nodes: int | None = 4096  # None: every active feature (uncapped)
    batch_size: int = 64
    update_interval: int = 4


def salient_logits(logits: torch.Tensor, max_n_logits: int, desired_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest set of top tokens whose probability reaches ``desired_prob`` (at most ``max_n_logits``)."""
    probs = torch.softmax(logits.float(), -1)
    top_p, top_idx = probs.topk(min(max_n_logits, probs.shape[-1]))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_prob))) + 1
    return top_idx[:cutoff], top_p[:cutoff]


def partial_influences(rows: torch.Tensor, logit_probs: torch.Tensor, row_nodes: torch.Tensor) -> torch.Tensor:
    """Influence on the logits of every node, from the rows computed so far."""
    b = rows.abs()
    b = b / b.sum(1, keepdim=True).clamp_min(1e-8)
    prod = torch.zeros(rows.shape[1])
    prod[-len(logit_probs) :] = logit_probs
    total = torch.zeros(rows.shape[1])
    for _ in range(1000):
        prod = prod[row_nodes] @ b
        if not prod.any():
            return total
        total += prod
    raise RuntimeError("influence did not converge")


class TraceAttribution:
    """Attribution graphs for any position of one token sequence (one forward pass)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        transcoders: TranscoderSet,
        ids: torch.Tensor,
        config: AttributionConfig = AttributionConfig(),
        meta: dict | None = None,
    ):
        self.config = config
        self.cap = capture_forward(model, ids)
        self.lin = LinearReplacement(model, transcoders, self.cap)
        self.meta = dict(meta or {})
        self._rows: dict[int, torch.Tensor] = {}
        self.rows_computed = 0

    # ---------------------------------------------------------------- rows
    def feature_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Edge rows (over all sources of the trace) of features ``idx``, computed once each."""
        missing = torch.tensor([i for i in idx.tolist() if i not in self._rows], dtype=torch.long)
        if len(missing):
            layers = self.lin.features.layer[missing]
            for layer in layers.unique().tolist():
                sel = missing[layers == layer]
                # targets sorted by position keep each batch's position range short
                sel = sel[self.lin.features.pos[sel].argsort(stable=True)]
                for start in range(0, len(sel), self.config.batch_size):
                    chunk = sel[start : start + self.config.batch_size]
                    rows, _ = self.lin.rows(layer, self.lin.features.pos[chunk], self.lin.feature_reading_vectors(chunk))
                    for i, r in zip(chunk.tolist(), rows):
                        self._rows[i] = r
                    self.rows_computed += len(chunk)
        if len(idx) == 0:
            return torch.zeros(0, self.lin.n_sources)
        return torch.stack([self._rows[i] for i in idx.tolist()])

    def logit_rows(self, pos: int, tokens: torch.Tensor) -> torch.Tensor:
        rows, _ = self.lin.rows(self.lin.n_layers, torch.full((len(tokens),), pos), self.lin.logit_reading_vectors(pos, tokens))
        return rows

    # ---------------------------------------------------------------- graphs
    def graph(self, pos: int | None = None, step_index: int | None = None) -> Graph:
        """The attribution graph for the next-token prediction at position ``pos`` (default: the last)."""
        lin, cfg = self.lin, self.config
        T = lin.n_pos
        pos = T - 1 if pos is None else pos
        if not 0 <= pos < T:
            raise IndexError(f"position {pos} out of range 0..{T - 1}")
        n_pos, L = pos + 1, lin.n_layers
        feats = (lin.features.pos <= pos).nonzero(as_tuple=True)[0]
        n_f = len(feats)
        error_cols = torch.cat([lin.error_offset + l * T + torch.arange(n_pos) for l in range(L)])
        token_cols = lin.token_offset + torch.arange(n_pos)
        nonfeature_cols = torch.cat([error_cols, token_cols])
        tokens, probs = salient_logits(self.cap.logits[pos], cfg.max_n_logits, cfg.desired_logit_prob)
        n_logits = len(tokens)
        logit_rows = self.logit_rows(pos, tokens)

        budget = n_f if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n_f)
        if budget == n_f:
            selected = torch.arange(n_f)
        else:
            selected = self._greedy(feats, nonfeature_cols, logit_rows, probs, budget)

        chosen = feats[selected]
        cols = torch.cat([chosen, nonfeature_cols])
        n_nodes = len(cols) + n_logits
        adjacency = torch.zeros(n_nodes, n_nodes)
        adjacency[: len(chosen), : len(cols)] = self.feature_rows(chosen)[:, cols]
        adjacency[-n_logits:, : len(cols)] = logit_rows[:, cols]
        active = torch.stack([lin.features.layer[feats], lin.features.pos[feats], lin.features.feat[feats]], 1)
        meta = {**self.meta, "position": pos, "step_index": step_index, "settings": asdict(cfg),
                "n_active_features": n_f}
        return Graph(
            tokens=self.cap.ids[:n_pos].clone(),
            active_features=active,
            activation_values=lin.features.act[feats].clone(),
            selected_features=selected,
            adjacency=adjacency,
            logit_tokens=tokens,
            logit_probabilities=probs,
            n_layers=L,
            meta=meta,
        )

    def _greedy(
        self, feats: torch.Tensor, nonfeature_cols: torch.Tensor, logit_rows: torch.Tensor, probs: torch.Tensor, budget: int
    ) -> torch.Tensor:
        """circuit-tracer's greedy visit order; returns the selected prefix-feature indices, ascending."""
        cfg = self.config
        n_f, n_logits = len(feats), len(probs)
        cols = torch.cat([feats, nonfeature_cols])
        logit_offset = len(cols)
        total = logit_offset + n_logits
        edges = torch.zeros(budget + n_logits, total)
        row_nodes = torch.zeros(budget + n_logits, dtype=torch.long)
        edges[:n_logits, :logit_offset] = logit_rows[:, cols]
        row_nodes[:n_logits] = logit_offset + torch.arange(n_logits)
        visited = torch.zeros(n_f, dtype=torch.bool)
        st, n_visited = n_logits, 0
        while n_visited < budget:
            influence = partial_influences(edges[:st], probs, row_nodes[:st])
            rank = torch.argsort(influence[:n_f], descending=True, stable=True)
            queue = rank[~visited[rank]][: min(cfg.update_interval * cfg.batch_size, budget - n_visited)]
            for start in range(0, len(queue), cfg.batch_size):
                chunk = queue[start : start + cfg.batch_size]
                edges[st : st + len(chunk), :logit_offset] = self.feature_rows(feats[chunk])[:, cols]
                row_nodes[st : st + len(chunk)] = chunk
                visited[chunk] = True
                st += len(chunk)
                n_visited += len(chunk)
        return visited.nonzero(as_tuple=True)[0]
