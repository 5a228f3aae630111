"""Edge rows of many targets at once: one backward sweep per batch, from the highest layer down.

A target read at position ``p`` of ``mid_l`` has its row from the gradient of that read through
the frozen attention layers ``l, l-1, ..., 0`` (MLPs are nodes: the residual passes them). The
gradients of a batch of targets of *any* layers are carried together: sorted by layer, highest
first, the targets already descending at attention layer ``m`` are a prefix of one ``[B, T, d]``
tensor, so each crossing is one batched product (``T``: the batch's last position + 1; the
cache hands the kernel position-sorted batches). A target joins at its own layer as a single
vector at one position, whose first crossing is cheap (one attention row, no ``[T, d] x [d, d]``).
Edges into a layer's sources are read off the gradient as it passes: decoder vectors times
activations (features), error vectors (errors), embeddings (tokens). Token columns of many
targets can instead come from a per-trace token table (built once it pays: ski rental).

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
        # [H, d, dh]; W_V per kv head with the input-norm weight folded in [Hkv, dh, d]
        self.attn = [lin.cap.attn[m, :, :T, :T] * lin.cap.scale_in[m, :T][None, None, :] for m in range(lin.n_layers)]
        self.W_O = [w.view(d, H, dh).permute(1, 0, 2).contiguous() for w in lin.W_O]
        self.W_V_kv = [(w.view(Hkv, dh, d) * lin.w_in[m]).contiguous() for m, w in enumerate(lin.W_V)]  # [Hkv, dh, d]
        #: token columns of every feature's row ([n_features, T]), once building them beats the per-target way
        self.token_table: torch.Tensor | None = None
        self._token_work = 0  # multiply-adds spent on token columns the per-target way
        self._table_work = TOKEN_TABLE_COST_FACTOR * lin.n_layers * T * self._dense_crossing(T)
        self._table_fits = lin.n_features * T + T * T * d <= TOKEN_TABLE_MAX_FLOATS

    def _dense_crossing(self, T: int) -> int:
        """Multiply-adds of the dense backward of one target through one attention layer (positions < T)."""
        lin = self.lin
        return T * lin.d * lin.d + lin.n_heads * T * T * lin.d_head + T * lin.n_kv * lin.d_head * lin.d + T * lin.d

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
        """Compact rows ``[len(idx), columns(layer)]`` of features ``idx`` (all of layer ``layer``), in order."""
        if bool((self.lin.features.layer[idx] != layer).any()):
            raise ValueError(f"rows(layer={layer}, idx): every feature of idx must be of layer {layer}; sweep() takes any")
        ((_, got, rows),) = self.sweep(idx)
        return rows[_positions(got, idx)]

    def sweep(self, idx: Int[Tensor, " B"]) -> list[tuple[int, Int[Tensor, " n"], Float[Tensor, "n columns"]]]:
        """Compact rows of features ``idx`` of any layers, by one backward sweep from the highest layer down.

        Rows are sorted by layer, highest first, so the rows whose backward pass has started by
        attention layer ``m`` are a prefix ``G[:a_m]`` of one ``[B, T, d]`` gradient (``T``: the
        chunk's last position + 1): each crossing is one batched product over every row still
        descending, whatever layer it started at, instead of one small call per target layer.
        A row starting at layer ``m`` enters as the one-position vector ``v`` at ``p``, and its
        crossing of attention ``m`` costs ``T (H dh + Hkv dh d)``, not the dense ``T d (d + Hkv dh)``:
        ``g[q] = [q = p] v + sum_h A_h[p, q] (v W_O,h) W_V,h``. Returns ``(layer, feature indices,
        rows)`` per layer present, rows in :meth:`columns` layout.
        """
        lin = self.lin
        dev = lin.device
        idx = idx[torch.argsort(lin.features.layer[idx], descending=True, stable=True)]
        layer, pos = lin.features.layer[idx], lin.features.pos[idx]
        B, d, n_pos, off = len(idx), lin.d, lin.n_pos, lin.layer_offsets
        T, top = int(pos.max()) + 1, int(layer[0])
        # rows whose pass has started by layer m: a prefix of length n_ge[m]
        n_ge = (torch.bincount(layer, minlength=top + 2).flip(0).cumsum(0).flip(0)).tolist()
        vectors = lin.feature_reading_vectors(idx)
        err0 = off[top]
        tok0 = err0 + top * n_pos
        buf = torch.zeros(B, tok0 + n_pos, device=dev)  # every row in the layout of a layer-`top` row
        G = torch.empty(B, T, d, device=dev)
        table = self._use_token_table(B, T)
        for m in range(top, -1, -1):
            a0, a = n_ge[m + 1], n_ge[m]
            if m == 0 and table:
                break
            if a0:
                self._cross(m, G[:a0])
            if a > a0:
                G[a0:a] = self._enter(m, vectors[a0:a], pos[a0:a], T)
            D = G[:a]
            if m == 0:
                buf[:, tok0 : tok0 + T] = torch.einsum("btd,td->bt", D, lin.cap.embed[:T])
                break
            src = m - 1
            block, acts, index = lin._blocks[src]
            # edges from layer-src features: per position, D[b, t] . decoder[t, k] * act[t, k]
            contrib = torch.bmm(D.transpose(0, 1), block[:T].float().transpose(1, 2)).transpose(0, 1) * acts[:T]
            src_index = index[:T]
            valid = src_index >= 0
            buf[:a, src_index[valid]] = contrib[:, valid]  # feature columns = global feature indices
            e0 = err0 + src * n_pos
            buf[:a, e0 : e0 + T] = torch.einsum("btd,td->bt", D, lin.errors[src, :T])
        if table:
            buf[:, tok0 : tok0 + T] = self.token_table[idx, :T]  # type: ignore[index]
        out = []
        for l in range(top, -1, -1):
            r0, r1 = n_ge[l + 1], n_ge[l]
            if r1 > r0:
                rows = buf[r0:r1]
                out.append((l, idx[r0:r1], torch.cat([rows[:, : off[l]], rows[:, err0 : err0 + l * n_pos],
                                                      rows[:, tok0 : tok0 + n_pos]], 1)))
        return out

    def _cross(self, m: int, G: Float[Tensor, "B T d"]) -> None:
        """Backward through attention layer ``m`` in place (residual kept): ``G += sum_h A_h^T G W_O,h W_V,h``."""
        lin = self.lin
        B, T, _ = G.shape
        H, Hkv, dh = lin.n_heads, lin.n_kv, lin.d_head
        A = self.attn[m][:, :T, :T]
        u = torch.einsum("btd,hde->htbe", G, self.W_O[m]).reshape(H, T, B * dh)
        z = torch.bmm(A.transpose(1, 2), u).view(Hkv, H // Hkv, T, B, dh).sum(1)  # [Hkv, k, B, dh]
        G += torch.einsum("hkbe,hed->bkd", z, self.W_V_kv[m])

    def _enter(self, m: int, v: Float[Tensor, "b d"], p: Int[Tensor, " b"], T: int) -> Float[Tensor, "b T d"]:
        """Gradient below attention layer ``m`` of reads ``v`` at positions ``p`` (one position each)."""
        lin = self.lin
        b, H, Hkv, dh = len(p), lin.n_heads, lin.n_kv, lin.d_head
        u = torch.einsum("bd,hde->bhe", v, self.W_O[m])  # [b, H, dh]
        a = self.attn[m][:, p, :T].transpose(0, 1)  # [b, H, T]: A_h[p_b, q]
        z = (a[..., None] * u[:, :, None, :]).view(b, Hkv, H // Hkv, T, dh).sum(2)  # [b, Hkv, T, dh]
        g = torch.einsum("bkte,ked->btd", z, self.W_V_kv[m])
        g[torch.arange(b, device=v.device), p] += v
        return g


def _positions(got: Tensor, idx: Tensor) -> Tensor:
    """For each entry of ``idx``, its index in ``got`` (a permutation of ``idx`` with distinct entries)."""
    order = torch.argsort(got)
    return order[torch.searchsorted(got[order], idx.contiguous())]
