"""Edge rows of many targets of one layer at once, with path coefficients shared by position.

The backward pass of a target read at position ``p`` through frozen attention layers is a sum
over paths (skip, or one head per crossed layer): vector ``v K_path`` at every position ``q``
with coefficient ``C_path[p, q]`` (a product of attention patterns and norm scales). The
vectors depend on the target, the coefficients only on its position and the path, so they are
computed once per position for the whole batch (``[P, R, T]``), not once per target as
:meth:`LinearReplacement.rows` does. Edges into a layer's sources need the gradient densely
(``[B, T, d]``: one bmm per batch); once carrying ``R`` paths costs more than the dense backward
(``R (1 + H) T d`` against ``T d (2d + T)`` per target), the batch switches to the dense form.

Rows come out in the compact column layout of :class:`~crv.attribution.engine.RowCache`
(features and errors of lower layers, then tokens), never as a zero-filled ``[B, n_sources]``.
Only for models without attention biases or MLP skip connections (``LinearReplacement.factored``);
others use :meth:`LinearReplacement.rows`. ``tests/test_attribution.py`` checks both give the
same rows.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from crv.attribution.linear import LinearReplacement

#: the token table and its [T, T, d] working tensor stay under this many floats (1 GiB)
TOKEN_TABLE_MAX_FLOATS = 2**28
#: the table's real cost per modelled multiply-add, against the per-target path's: its einsums over
#: [T, T, d] tensors are bound by memory traffic, not by arithmetic. Measured on the shipped reasoner
#: (2 CPU cores): with the table charged at its bare multiply-adds, a 692-token trace took 20 s
#: instead of 6 s; charged 4x, the table is built only where it pays (short traces, many rows).
TOKEN_TABLE_COST_FACTOR = 4


class RowKernel:
    """Batched exact edge rows of one trace's features (targets grouped by layer)."""

    def __init__(self, lin: LinearReplacement):
        if not lin.factored:
            raise ValueError("the row kernel needs a model without attention biases or MLP skip connections")
        self.lin = lin
        H, Hkv, dh, d = lin.n_heads, lin.n_kv, lin.d_head, lin.d
        T = lin.n_pos
        # per layer: attention with the input-norm scale folded into the keys [H, q, k]; W_O per head
        # [H, d, dh]; W_V per head (kv heads repeated) with the input-norm weight folded in [H, dh, d]
        self.attn = [lin.cap.attn[m, :, :T, :T] * lin.cap.scale_in[m, :T][None, None, :] for m in range(lin.n_layers)]
        self.W_O = [w.view(d, H, dh).permute(1, 0, 2).contiguous() for w in lin.W_O]
        self.W_V_kv = [(w.view(Hkv, dh, d) * lin.w_in[m]).contiguous() for m, w in enumerate(lin.W_V)]  # [Hkv, dh, d]
        self.W_V = [w.repeat_interleave(H // Hkv, 0) for w in self.W_V_kv]  # per query head [H, dh, d]
        #: token columns of every feature's row ([n_features, T]), once building them beats the per-target way
        self.token_table: torch.Tensor | None = None
        self._token_work = 0  # multiply-adds spent on token columns the per-target way
        self._table_work = TOKEN_TABLE_COST_FACTOR * lin.n_layers * T * self._dense_crossing(T)
        self._table_fits = lin.n_features * T + T * T * d <= TOKEN_TABLE_MAX_FLOATS

    def _dense_crossing(self, T: int) -> int:
        """Multiply-adds of the dense backward of one target through one attention layer (positions < T)."""
        lin = self.lin
        return T * lin.d * lin.d + lin.n_heads * T * T * lin.d_head + T * lin.n_kv * lin.d_head * lin.d + T * lin.d

    def _factored_is_cheaper(self, R: int, T: int) -> bool:
        """Per target, over positions < T: carrying R paths through one more layer vs the dense backward."""
        lin = self.lin
        d, H, dh = lin.d, lin.n_heads, lin.d_head
        factored = R * (1 + H) * T * d + R * (d * d + H * dh * d)  # densify for the next edges + new vectors
        return factored < self._dense_crossing(T)

    def _use_token_table(self, B: int, T: int) -> bool:
        """Ski rental: build the token table once the per-target token work would pass its cost."""
        if self.token_table is None and self._table_fits:
            self._token_work += B * self._dense_crossing(T)
            if self._token_work >= self._table_work:
                self.token_table = self._build_token_table()
        return self.token_table is not None

    def _build_token_table(self) -> torch.Tensor:
        """Token columns of every feature, by carrying all T token embeddings forward at once.

        ``F[t, p]`` is the effect at position ``p`` of token ``t``'s embedding (``[T, T, d]``), pushed
        through each attention layer in turn (MLPs are frozen nodes: the stream passes them unchanged);
        a layer-``l`` feature's token columns are its reading vector dotted with ``F`` at ``mid_l``.
        """
        lin = self.lin
        T, d, H, Hkv, dh = lin.n_pos, lin.d, lin.n_heads, lin.n_kv, lin.d_head
        table = torch.zeros(lin.n_features, T, device=lin.device)
        F = torch.zeros(T, T, d, device=lin.device)  # [position, source token, d]
        F[torch.arange(T), torch.arange(T)] = lin.cap.embed[:T].float()
        for m in range(lin.n_layers):
            v = torch.einsum("qsd,ked->kqse", F, self.W_V_kv[m]).reshape(Hkv, T, T * dh)  # [Hkv, q, S*dh]
            A = self.attn[m].reshape(Hkv, (H // Hkv) * T, T)  # query heads grouped by their kv head
            z = torch.bmm(A, v).view(H, T, T, dh)  # [H, p, S, dh]
            F = F + torch.einsum("hpse,hde->psd", z, self.W_O[m])
            a, b = lin.layer_offsets[m], lin.layer_offsets[m + 1]
            if b == a:
                continue
            _, _, index = lin._blocks[m]  # [T, kmax] feature index per position and slot (-1: none)
            valid = index >= 0
            vec = torch.zeros(*index.shape, d, device=lin.device)
            vec[valid] = lin.feature_reading_vectors(index[valid])
            table[index[valid]] = torch.bmm(vec, F.transpose(1, 2))[valid]  # [T, kmax, S]
        return table

    def columns(self, layer: int) -> int:
        """Width of a layer-``layer`` row in the compact layout."""
        lin = self.lin
        return lin.layer_offsets[layer] + layer * lin.n_pos + lin.n_pos

    def rows(self, layer: int, idx: Int[Tensor, " B"]) -> Float[Tensor, "B columns"]:
        """Compact rows ``[len(idx), columns(layer)]`` of features ``idx`` (all of layer ``layer``)."""
        lin, dev = self.lin, self.lin.device
        pos, vectors = lin.features.pos[idx], lin.feature_reading_vectors(idx)
        B, d, H = len(pos), lin.d, lin.n_heads
        T = int(pos.max()) + 1
        off = lin.layer_offsets
        n_feat_cols = off[layer]
        out = torch.empty(B, self.columns(layer), device=dev)
        token_start = n_feat_cols + layer * lin.n_pos
        # columns a row has no edge into: errors at positions >= T, features written at positions >= T
        out[:, n_feat_cols:token_start].zero_()
        out[:, token_start:].zero_()
        upos, pidx = torch.unique(pos, return_inverse=True)
        vecs = vectors[:, None, :]  # [B, R, d]
        coef = torch.zeros(len(upos), 1, T, device=dev)  # [P, R, T]
        coef[torch.arange(len(upos), device=dev), 0, upos] = 1.0
        G: torch.Tensor | None = None

        def cross(m: int) -> None:
            """Backward through attention layer m (residual kept)."""
            nonlocal vecs, coef, G
            R = vecs.shape[1] if G is None else 0
            if G is None and self._factored_is_cheaper(R, T):
                u = torch.einsum("brd,hde->brhe", vecs, self.W_O[m])
                new_vecs = torch.einsum("brhe,hed->brhd", u, self.W_V[m]).reshape(B, R * H, d)
                A = self.attn[m][:, :T, :T]  # [H, q, k]
                new_coef = (coef.reshape(-1, T) @ A.permute(1, 0, 2).reshape(T, H * T)).view(len(upos), R * H, T)
                vecs, coef = torch.cat([vecs, new_vecs], 1), torch.cat([coef, new_coef], 1)
                return
            Gd = dense()
            A = self.attn[m][:, :T, :T]
            dh, Hkv = lin.d_head, lin.n_kv
            u = torch.einsum("btd,hde->htbe", Gd, self.W_O[m]).reshape(H, T, B * dh)
            z = torch.bmm(A.transpose(1, 2), u).view(Hkv, H // Hkv, T, B, dh).sum(1)  # [Hkv, k, B, dh]
            G = Gd + torch.einsum("hkbe,hed->bkd", z, self.W_V_kv[m])
            vecs = coef = None  # type: ignore[assignment]

        def dense() -> torch.Tensor:
            if G is not None:
                return G
            return torch.bmm(coef[pidx].transpose(1, 2), vecs)  # [B, T, R] @ [B, R, d]

        table = self._use_token_table(B, T)
        if layer == 0 and table:
            out[:, token_start : token_start + T] = self.token_table[idx, :T]  # type: ignore[index]
            return out
        j = layer
        cross(j)
        while j > 0:
            D = dense()
            src = j - 1
            block, acts, index = lin._blocks[src]
            # edges from layer-src features: per position, D[b, t] . decoder[t, k] * act[t, k]
            contrib = torch.bmm(D.transpose(0, 1), block[:T].float().transpose(1, 2)).transpose(0, 1) * acts[:T]
            src_index = index[:T]
            valid = src_index >= 0
            feat_out = out[:, off[src] : off[src + 1]]  # compact feature columns = global feature indices
            feat_out.zero_()
            feat_out[:, src_index[valid] - off[src]] = contrib[:, valid]
            e0 = n_feat_cols + src * lin.n_pos
            out[:, e0 : e0 + T] = torch.einsum("btd,td->bt", D, lin.errors[src, :T])
            j = src
            if j == 0 and table:
                out[:, token_start : token_start + T] = self.token_table[idx, :T]  # type: ignore[index]
                return out
            cross(j)
        D = dense()
        out[:, token_start : token_start + T] = torch.einsum("btd,td->bt", D, lin.cap.embed[:T])
        return out
