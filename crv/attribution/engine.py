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
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedModel

from crv.attribution.capture import capture_forward
from crv.attribution.graph import Graph
from crv.attribution.linear import LinearReplacement
from crv.attribution.row_kernel import RowKernel
from crv.attribution.timing import SectionTimer
from crv.transcoders.io import TranscoderSet


@dataclass(frozen=True)
class AttributionConfig:
    """Attribution settings (the paper's: 10 logits / 0.95 probability / 4096 features)."""

    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    max_feature_nodes: int | None = 4096  # None: every active feature (uncapped)
    #: greedy visit batch, in features -- part of what defines a capped graph, not only a speed setting:
    #: features are re-ranked every ``update_interval`` batches, so the visit order, and which features a
    #: cap keeps, depend on it (SmolLM2 at cap 1024: 45 of 1,024 features differ between 64 and 512).
    #: 64 lies in the paper's scripts' range (16-64); circuit-tracer 0.5.0's own default is 512, and
    #: ``batch_size=512`` gives exactly the graph of circuit-tracer's defaults. Uncapped graphs do not
    #: depend on it. Recorded in every graph's ``meta["settings"]`` and in the store key.
    batch_size: int = 64
    update_interval: int = 4  # batches visited between re-rankings (circuit-tracer's default)
    row_batch_size: int = 128  # rows computed per batched call (memory ~ row_batch_size x positions x d_model floats)


def salient_logits(logits: torch.Tensor, max_n_logits: int, desired_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest set of top tokens whose probability reaches ``desired_prob`` (at most ``max_n_logits``)."""
    probs = torch.softmax(logits.float(), -1)
    top_p, top_idx = probs.topk(min(max_n_logits, probs.shape[-1]))
    cutoff = int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_prob, device=top_p.device))) + 1
    return top_idx[:cutoff], top_p[:cutoff]


def layered_influences(
    logit_norm: torch.Tensor, logit_probs: torch.Tensor, layer_rows: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Influence on the logits of every feature, from the rows visited so far.

    Rows are |edge| rows normalised by their total |edge| (over all sources), as in
    circuit-tracer's ``compute_partial_influences``, and this is the same fixed point
    (influence = sum over paths of the products of normalised edge weights) computed in
    one top-down pass: a layer-``l`` feature's row only reaches features of layers ``< l``
    (the first ``k_l`` prefix features), so its influence is final once every higher
    layer's rows have been applied. ``layer_rows[l]`` is ``(feature indices [n], rows [n, k_l])``
    of the visited layer-``l`` features; ``logit_norm [n_logits, n_f]``. Error and token
    columns are dropped: they never start a row, so they pass no influence on.
    """
    total = logit_probs @ logit_norm
    for layer in range(len(layer_rows) - 1, 0, -1):
        idx, rows = layer_rows[layer]
        if len(idx):
            total[: rows.shape[1]] += total[idx] @ rows
    return total


class GrowingRows:
    """Rows of a fixed width appended in batches; storage grows by doubling (no per-batch list of chunks)."""

    def __init__(self, width: int, device: torch.device):
        self.data = torch.empty(0, width, device=device)
        self.n = 0

    def append(self, rows: torch.Tensor) -> tuple[int, int]:
        """Append ``rows``; returns the ``[start, end)`` range they occupy."""
        start, end = self.n, self.n + len(rows)
        if end > len(self.data):
            grown = torch.empty(max(2 * len(self.data), end, 64), self.data.shape[1], device=self.data.device)
            grown[:start] = self.data[:start]
            self.data = grown
        self.data[start:end] = rows
        self.n = end
        return start, end

    @property
    def rows(self) -> torch.Tensor:
        return self.data[: self.n]


class RowCache:
    """Feature edge rows of one trace, each computed once, stored compactly per target layer.

    A layer-``l`` feature only has edges from features and errors of layers ``< l`` and from
    tokens, so its row is stored over those source columns only. Rows are kept in the order
    they were computed (a per-layer store that grows by doubling), so memory follows the rows
    visited, never the number of active features.
    """

    def __init__(self, lin: LinearReplacement, batch_size: int, timer: SectionTimer | None = None):
        self.lin, self.batch_size = lin, batch_size  # rows computed per kernel call
        self.timer = timer or SectionTimer()
        dev = self.device = lin.device
        L, T, off = lin.n_layers, lin.n_pos, lin.layer_offsets
        self.columns: list[torch.Tensor] = []
        self.colmap: list[torch.Tensor] = []
        for l in range(L):
            cols = torch.cat([
                torch.arange(off[l], device=dev),
                lin.error_offset + torch.arange(l * T, device=dev),
                lin.token_offset + torch.arange(T, device=dev),
            ])
            cmap = torch.full((lin.n_sources,), -1, dtype=torch.long, device=dev)
            cmap[cols] = torch.arange(len(cols), device=dev)
            self.columns.append(cols)
            self.colmap.append(cmap)
        self.store = [GrowingRows(len(c), dev) for c in self.columns]
        self.slot = torch.full((lin.n_features,), -1, dtype=torch.long, device=dev)  # row of each feature in its store
        self.abs_sum = torch.zeros(lin.n_features, device=dev)  # sum of |edges| of each row
        self.rows_computed = 0
        #: batched rows for standard Llama-like models; others go through LinearReplacement.rows
        self.kernel = RowKernel(lin) if lin.factored else None

    def ensure(self, idx: torch.Tensor) -> None:
        """Compute the rows of features ``idx`` that are not cached yet (batched per layer, by position)."""
        missing = idx[self.slot[idx] < 0].unique()
        if len(missing) == 0:
            return
        with self.timer("rows"):
            self._compute(missing)

    def _compute(self, missing: torch.Tensor) -> None:
        lin = self.lin
        if self.kernel is not None:  # one sweep per batch of any layers, batches of nearby positions
            missing = missing[lin.features.pos[missing].argsort(stable=True)]
            for start in range(0, len(missing), self.batch_size):
                for layer, chunk, rows in self.kernel.sweep(missing[start : start + self.batch_size]):
                    self._store(layer, chunk, rows)
            return
        layers = lin.features.layer[missing]
        for layer in layers.unique().tolist():
            sel = missing[layers == layer]
            sel = sel[lin.features.pos[sel].argsort(stable=True)]  # short position range per batch
            for start in range(0, len(sel), self.batch_size):
                chunk = sel[start : start + self.batch_size]
                rows = lin.rows(layer, lin.features.pos[chunk], lin.feature_reading_vectors(chunk))[0][:, self.columns[layer]]
                self._store(layer, chunk, rows)

    def _store(self, layer: int, chunk: torch.Tensor, rows: torch.Tensor) -> None:
        start, end = self.store[layer].append(rows)
        self.slot[chunk] = torch.arange(start, end, device=self.device)
        self.abs_sum[chunk] = rows.abs().sum(1)
        self.rows_computed += len(chunk)

    def gather(self, idx: torch.Tensor, cols: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of features ``idx`` restricted to source columns ``cols`` (computing missing rows).

        ``out``, if given, must be zeros of shape ``[len(idx), len(cols)]``; it is filled in place.
        """
        self.ensure(idx)
        if out is None:
            out = torch.zeros(len(idx), len(cols), device=self.device)
        layers = self.lin.features.layer[idx]
        for layer in layers.unique().tolist():
            where = (layers == layer).nonzero(as_tuple=True)[0]
            m = self.colmap[layer][cols]
            keep = (m >= 0).nonzero(as_tuple=True)[0]
            sub = self.store[layer].rows.index_select(0, self.slot[idx[where]]).index_select(1, m[keep])
            w0, w1 = int(where[0]), int(where[-1]) + 1
            if len(keep) == len(cols):
                out.index_copy_(0, where, sub)
            elif w1 - w0 == len(where):  # rows of one layer are contiguous when idx is sorted by layer
                out[w0:w1].index_copy_(1, keep, sub)
            else:
                out.index_copy_(0, where, torch.zeros(len(where), len(cols), device=self.device).index_copy_(1, keep, sub))
        return out


class TraceAttribution:
    """Attribution graphs for any position of one token sequence (one forward pass)."""

    def __init__(
        self,
        model: PreTrainedModel,
        transcoders: TranscoderSet,
        ids: torch.Tensor,
        config: AttributionConfig = AttributionConfig(),
        meta: dict | None = None,
    ):
        self.config = config
        #: exclusive seconds per stage (forward, rows, greedy, adjacency, logits) over this trace's graphs
        self.timer = SectionTimer()
        with torch.no_grad(), self.timer("forward"):
            self.cap = capture_forward(model, ids)
            self.lin = LinearReplacement(model, transcoders, self.cap)
        self.meta = dict(meta or {})
        self.cache = RowCache(self.lin, config.row_batch_size, self.timer)

    @property
    def rows_computed(self) -> int:
        return self.cache.rows_computed

    # ---------------------------------------------------------------- what the forward pass saw
    @property
    def ids(self) -> torch.Tensor:
        """Token ids ``[T]`` of the sequence."""
        return self.cap.ids

    @property
    def logits(self) -> torch.Tensor:
        """The model's logits ``[T, V]`` (float32)."""
        return self.cap.logits

    @property
    def hidden_states(self) -> torch.Tensor:
        """Residual stream ``[L + 1, T, d]``: the embeddings, then after each layer (HF's ``hidden_states``)."""
        return self.cap.hidden

    @property
    def active_features(self):  # type: ignore[no-untyped-def]
        """The transcoders' active features (``layer``, ``pos``, ``feat``, ``act`` tensors, layer-major)."""
        return self.lin.features

    @property
    def n_layers(self) -> int:
        return self.lin.n_layers

    # ---------------------------------------------------------------- rows
    def feature_rows(self, idx: Int[Tensor, " B"]) -> Float[Tensor, "B n_sources"]:
        """Full edge rows (over all sources of the trace) of features ``idx``, computed once each."""
        return self.cache.gather(idx.to(self.lin.device), torch.arange(self.lin.n_sources, device=self.lin.device))

    def logit_rows(self, pos: int, tokens: Int[Tensor, " B"]) -> Float[Tensor, "B n_sources"]:
        dev = self.lin.device
        rows, _ = self.lin.rows(self.lin.n_layers, torch.full((len(tokens),), pos, device=dev),
                                self.lin.logit_reading_vectors(pos, tokens.to(dev)))
        return rows

    # ---------------------------------------------------------------- graphs
    def graph(self, pos: int | None = None, step_index: int | None = None) -> Graph:
        """The attribution graph for the next-token prediction at position ``pos`` (default: the last)."""
        lin, cfg = self.lin, self.config
        T = lin.n_pos
        pos = T - 1 if pos is None else pos
        if not 0 <= pos < T:
            raise IndexError(f"position {pos} out of range 0..{T - 1}")
        n_pos, L, dev = pos + 1, lin.n_layers, lin.device
        feats = (lin.features.pos <= pos).nonzero(as_tuple=True)[0]
        n_f = len(feats)
        error_cols = torch.cat([lin.error_offset + l * T + torch.arange(n_pos, device=dev) for l in range(L)])
        token_cols = lin.token_offset + torch.arange(n_pos, device=dev)
        nonfeature_cols = torch.cat([error_cols, token_cols])
        tokens, probs = salient_logits(self.cap.logits[pos], cfg.max_n_logits, cfg.desired_logit_prob)
        with self.timer("logits"):
            logit_rows = self.logit_rows(pos, tokens)

        budget = n_f if cfg.max_feature_nodes is None else min(cfg.max_feature_nodes, n_f)
        if 2 * budget >= n_f:  # most rows will be visited: compute them all in large batches first
            self.cache.ensure(feats)
        if budget == n_f:
            selected = torch.arange(n_f, device=dev)
        else:
            with self.timer("greedy"):
                selected = self._greedy(feats, logit_rows, probs, budget)

        chosen = feats[selected]
        cols = torch.cat([chosen, nonfeature_cols])
        with self.timer("adjacency"):
            adjacency = self._adjacency(chosen, n_pos, logit_rows[:, cols])
        active = torch.stack([lin.features.layer[feats], lin.features.pos[feats], lin.features.feat[feats]], 1)
        meta = {**self.meta, "position": pos, "step_index": step_index, "settings": asdict(cfg),
                "n_active_features": n_f}
        cpu = torch.device("cpu")  # graphs leave the engine on the CPU, whatever device computed them
        return Graph(
            tokens=self.cap.ids[:n_pos].clone(),
            active_features=active.to(cpu),
            activation_values=lin.features.act[feats].to(cpu, copy=True),
            selected_features=selected.to(cpu),
            adjacency=adjacency.to(cpu),
            logit_tokens=tokens.to(cpu),
            logit_probabilities=probs.to(cpu),
            n_layers=L,
            meta=meta,
        )

    def _adjacency(self, chosen: torch.Tensor, n_pos: int, logit_block: torch.Tensor) -> torch.Tensor:
        """The dense graph adjacency, assembled from the cached rows by slicing (each entry written once).

        Node order: chosen features (sorted by layer), errors (layer-major, ``n_pos`` each), tokens, logits.
        A layer-``l`` row's compact store holds the features below ``l`` (global indices first), then
        errors of layers ``< l`` (``n_pos`` of the trace's ``T`` each), then tokens.
        """
        lin, cache = self.lin, self.cache
        L, T, nc = lin.n_layers, lin.n_pos, len(chosen)
        n_logits = logit_block.shape[0]
        n_cols = nc + L * n_pos + n_pos
        n_nodes = n_cols + n_logits
        adjacency = torch.empty(n_nodes, n_nodes, device=lin.device)
        adjacency[nc:] = 0.0
        adjacency[-n_logits:, :n_cols] = logit_block
        cache.ensure(chosen)
        starts = torch.searchsorted(lin.features.layer[chosen], torch.arange(L + 1, device=lin.device)).tolist()
        tok = nc + L * n_pos
        for l in range(L):
            r0, r1 = starts[l], starts[l + 1]
            if r1 == r0:
                continue
            rows = cache.store[l].rows.index_select(0, cache.slot[chosen[r0:r1]])  # [n, width_l]
            block = adjacency[r0:r1]
            block[:, :r0] = rows.index_select(1, chosen[:r0])  # features of lower layers (sorted before layer l)
            block[:, r0:nc] = 0.0
            err = lin.layer_offsets[l]
            for j in range(L):
                dst = block[:, nc + j * n_pos : nc + (j + 1) * n_pos]
                if j < l:
                    dst.copy_(rows[:, err + j * T : err + j * T + n_pos])
                else:
                    dst.zero_()
            block[:, tok : tok + n_pos] = rows[:, err + l * T : err + l * T + n_pos]
            block[:, n_cols:] = 0.0
        return adjacency

    def _greedy(self, feats: torch.Tensor, logit_rows: torch.Tensor, probs: torch.Tensor, budget: int) -> torch.Tensor:
        """circuit-tracer's greedy visit order; returns the selected prefix-feature indices, ascending."""
        cfg, lin, dev = self.config, self.lin, self.lin.device
        n_f = len(feats)
        layer_of = lin.features.layer[feats]
        below = torch.searchsorted(layer_of, torch.arange(lin.n_layers, device=dev)).tolist()  # k_l: prefix features below layer l
        absl = logit_rows.abs()
        logit_norm = absl[:, feats] / absl.sum(1, keepdim=True).clamp_min(1e-8)
        visited_rows = [GrowingRows(below[l], dev) for l in range(lin.n_layers)]  # normalised |rows| of visited features
        visited_idx = [torch.empty(0, dtype=torch.long, device=dev) for _ in range(lin.n_layers)]
        visited = torch.zeros(n_f, dtype=torch.bool, device=dev)
        n_visited = 0
        while n_visited < budget:
            influence = layered_influences(logit_norm, probs, list(zip(visited_idx, (r.rows for r in visited_rows))))
            rank = torch.argsort(influence, descending=True)  # as circuit-tracer (its tie order among zero-influence features)
            # circuit-tracer visits update_interval batches of batch_size features before it re-ranks
            queue = rank[~visited[rank]][: min(cfg.update_interval * cfg.batch_size, budget - n_visited)]
            queue_layers = layer_of[queue]
            self.cache.ensure(feats[queue[queue_layers > 0]])  # the round's rows in few sweeps, not one call per layer
            for layer in queue_layers.unique().tolist():
                if layer == 0:
                    continue  # layer-0 features have no feature sources
                part = queue[queue_layers == layer]
                rows = self.cache.gather(feats[part], feats[: below[layer]]).abs_()
                visited_rows[layer].append(rows / self.cache.abs_sum[feats[part], None].clamp_min(1e-8))
                visited_idx[layer] = torch.cat([visited_idx[layer], part])
            visited[queue] = True
            n_visited += len(queue)
        return visited.nonzero(as_tuple=True)[0]
