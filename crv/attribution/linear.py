"""The frozen linear replacement model of one sequence, and exact direct-effect rows.

Stream points of layer ``l``: ``r_l`` (layer input) -> attention -> ``mid_l`` ->
MLP (replaced: transcoder features + error + b_dec, plus ``x @ W_skip.T`` for sets with a skip
connection, a linear path from ``mid_l`` through the frozen norm) -> ``r_{l+1}``. With attention
patterns and RMSNorm scales frozen, every feature pre-activation (read from
``mid_l`` through the post-attention norm) and every centred logit (read from
``r_L`` through the final norm) is a linear function of the node writes:
token embeddings into ``r_0``, and feature decoder vectors and error vectors of
layer ``j`` into ``r_{j+1}``. A row of the adjacency matrix is that linear
function's coefficients (rows = targets, columns = sources), computed by
propagating the target's reading vector backwards through the attention layers
in closed form (no autograd).

Every tensor lives on the model's device (``self.device``); transcoder rows stay in their file
dtype and are upcast to float32 where they are used.

Source order (per sequence): ``[active features (layer, pos, feature order) |
error nodes (layer-major, L*T) | token nodes (T)]``. Features at position 0
(BOS) are zeroed and BOS's error vectors are constants (no node), as in circuit-tracer;
position 0 keeps its token node (and an error node that never has edges).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedModel

from crv.attribution.capture import ForwardCapture
from crv.lm.sites import hook_sites
from crv.transcoders.io import TranscoderSet


@dataclass
class ActiveFeatures:
    """Active transcoder features of a sequence, sorted by (layer, position, feature)."""

    layer: torch.Tensor  # [n] long
    pos: torch.Tensor  # [n] long
    feat: torch.Tensor  # [n] long
    act: torch.Tensor  # [n] activation values
    pre: torch.Tensor  # [n] pre-activations (= act for active TopK features)

    def __len__(self) -> int:
        return int(self.layer.shape[0])


class LinearReplacement:
    """Frozen linear model of one sequence: reading vectors and exact edge rows."""

    def __init__(self, model: PreTrainedModel, transcoders: TranscoderSet, cap: ForwardCapture):
        cfg = model.config
        self.cap = cap
        self.device = dev = cap.embed.device  # every tensor below lives here (the model's device)
        self.n_layers, self.n_pos, self.d = cfg.num_hidden_layers, cap.n_pos, cfg.hidden_size
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d_head = getattr(cfg, "head_dim", None) or self.d // self.n_heads
        sites = hook_sites(model)
        f32 = lambda t: t.detach().to(device=dev, dtype=torch.float32)  # noqa: E731  (no copy when already fp32 there)
        attn = [sites.attention(i) for i in range(sites.n_layers)]
        self.W_O = [f32(a.o_proj.weight) for a in attn]  # [d, H*dh]
        self.W_V = [f32(a.v_proj.weight) for a in attn]  # [Hkv*dh, d]
        self.v_bias = [None if a.v_proj.bias is None else f32(a.v_proj.bias) for a in attn]
        self.o_bias = [None if a.o_proj.bias is None else f32(a.o_proj.bias) for a in attn]
        self.w_in = [f32(sites.input_norm(i).weight) for i in range(sites.n_layers)]
        self.w_post = [f32(sites.post_attention_norm(i).weight) for i in range(sites.n_layers)]
        self.w_final = f32(sites.final_norm.weight)
        # the unembedding stays in the model's dtype (no float32 copy of a 128k-row matrix): rows are upcast when read
        self.W_U = sites.unembed.weight.detach()
        self.W_U_mean = torch.stack([c.float().sum(0) for c in self.W_U.split(8192)]).sum(0) / self.W_U.shape[0]

        # ---- transcoders: active features, errors, per-position padded decoder blocks
        L, T = self.n_layers, self.n_pos
        layer_l, pos_l, feat_l, act_l = [], [], [], []
        self.errors = torch.zeros(L, T, self.d, device=dev)
        self.b_dec = torch.zeros(L, self.d, device=dev)
        self.bos_out = torch.zeros(L, self.d, device=dev)
        #: skip connections (W_skip) of each layer, or None: the MLP then passes a linear function of its input on
        self.W_skip: list[torch.Tensor | None] = []
        enc_rows, dec_rows, b_enc = [], [], []
        for l in range(L):
            tc = transcoders[l]
            x = cap.mlp_in[l]
            acts = tc.encode(x).to(dev)
            acts[0] = 0.0  # no features at BOS
            p, f = acts.nonzero(as_tuple=True)
            values = acts[p, f]
            dec = tc.decoder_rows(f).to(dev)  # only the active features' rows are read
            recon = torch.zeros(T, self.d, device=dev).index_add_(0, p, dec.float() * values[:, None]) + tc.b_dec.to(dev)
            skip = None if tc.W_skip is None else tc.W_skip.to(dev)
            if skip is not None:
                recon += x @ skip.T
            self.W_skip.append(skip)
            self.errors[l] = cap.mlp_out[l] - recon
            # as in circuit-tracer, nothing at position 0 is a node: BOS's MLP output counts as a constant
            self.bos_out[l] = self.errors[l, 0]
            self.errors[l, 0] = 0.0
            self.b_dec[l] = tc.b_dec.to(dev)
            layer_l.append(torch.full_like(p, l))
            pos_l.append(p)
            feat_l.append(f)
            act_l.append(values)
            enc_rows.append(tc.encoder_rows(f).to(dev))
            dec_rows.append(dec)
            b_enc.append(tc.b_enc.to(dev)[f])
        self.features = ActiveFeatures(
            torch.cat(layer_l), torch.cat(pos_l), torch.cat(feat_l), torch.cat(act_l), torch.cat(act_l).clone()
        )
        #: encoder rows of the active features, in the transcoders' storage dtype (upcast per batch of targets)
        self.enc = torch.cat(enc_rows)  # [n, d]
        self.b_enc = torch.cat(b_enc)  # [n]
        self.n_features = len(self.features)
        self.error_offset = self.n_features
        self.token_offset = self.n_features + L * T
        self.n_sources = self.token_offset + T
        dec_all = torch.cat(dec_rows)
        self._blocks = [self._decoder_block(l, dec_all) for l in range(L)]
        # the factored backward pass assumes no attention biases (standard Llama) and no skip connections
        self.factored = all(b is None for b in self.v_bias + self.o_bias) and all(w is None for w in self.W_skip)
        #: first feature index of each layer (features are sorted by layer), plus the total
        self.layer_offsets = torch.searchsorted(self.features.layer, torch.arange(L + 1, device=dev)).tolist()

    # ------------------------------------------------------------------ sources
    def _decoder_block(self, layer: int, dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per position: decoder vectors [T, kmax, d], their activations [T, kmax] and source index [T, kmax] (-1 = none).

        Vectors stay in the decoder's storage dtype (bf16 stays bf16); :meth:`rows` upcasts a layer's block when it
        reads it and scales by the float32 activations, so bf16 weights give the float32 result of their values.
        """
        dev = self.device
        sel = (self.features.layer == layer).nonzero(as_tuple=True)[0]
        pos = self.features.pos[sel]
        counts = torch.bincount(pos, minlength=self.n_pos)
        kmax = int(counts.max()) if len(sel) else 1
        vecs = torch.zeros(self.n_pos, kmax, self.d, device=dev, dtype=dec.dtype)
        acts = torch.zeros(self.n_pos, kmax, device=dev)
        index = torch.full((self.n_pos, kmax), -1, dtype=torch.long, device=dev)
        # slot of each feature within its position (features are sorted by position)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(sel), device=dev) - starts[pos]
        vecs[pos, slot] = dec[sel]
        acts[pos, slot] = self.features.act[sel]
        index[pos, slot] = sel
        return vecs, acts, index

    def scaled_decoders(self, idx: torch.Tensor) -> torch.Tensor:
        """What features ``idx`` write (activation x decoder row), float32 ``[n, d]``."""
        out = torch.empty(len(idx), self.d, device=self.device)
        for layer in self.features.layer[idx].unique().tolist():
            where = (self.features.layer[idx] == layer).nonzero(as_tuple=True)[0]
            vecs, acts, index = self._blocks[layer]
            for w in where.tolist():
                t, k = (index == idx[w]).nonzero(as_tuple=True)
                out[w] = vecs[t[0], k[0]].float() * acts[t[0], k[0]]
        return out

    def error_index(self, layer: int, pos: torch.Tensor | int) -> torch.Tensor | int:
        return self.error_offset + layer * self.n_pos + pos

    # ------------------------------------------------------------------ targets
    def feature_reading_vectors(self, idx: Int[Tensor, " n"]) -> Float[Tensor, "n d"]:
        """Reading vectors at ``mid_l`` of features ``idx`` (pre-activation = v . mid_l[pos] + b_enc)."""
        layers, pos = self.features.layer[idx], self.features.pos[idx]
        w_post = torch.stack(self.w_post)[layers]  # [n, d]
        return self.enc[idx].float() * w_post * self.cap.scale_post[layers, pos][:, None]

    def logit_reading_vectors(self, pos: int, tokens: Int[Tensor, " n"]) -> Float[Tensor, "n d"]:
        """Reading vectors at ``r_L`` of the centred logits (logit minus its mean over the vocabulary)."""
        centred = self.W_U[tokens.to(self.W_U.device)].float() - self.W_U_mean
        return centred * self.w_final * self.cap.scale_final[pos]

    # ------------------------------------------------------------------ propagation
    def _attn_backward(self, layer: int, G: torch.Tensor) -> torch.Tensor:
        """Gradient at ``r_layer`` of a linear read of ``mid_layer`` through the frozen attention (excluding the skip)."""
        B, T, _ = G.shape
        H, Hkv, dh = self.n_heads, self.n_kv, self.d_head
        A = self.cap.attn[layer, :, :T, :T]  # [H, q, k]
        u = (G @ self.W_O[layer]).view(B, T, H, dh)  # [B, q, H, dh]
        u = u.permute(2, 1, 0, 3).reshape(H, T, B * dh)  # [H, q, B*dh]
        z = torch.bmm(A.transpose(1, 2), u)  # [H, k, B*dh]
        z = z.view(H, T, B, dh)
        if Hkv != H:
            z = z.view(Hkv, H // Hkv, T, B, dh).sum(1)
        z = z.permute(2, 1, 0, 3).reshape(B, T, Hkv * dh)
        g = z @ self.W_V[layer]  # [B, k, d]
        return g * self.w_in[layer] * self.cap.scale_in[layer, :T, None]

    def _bias_through_attention(self, layer: int, G: torch.Tensor) -> torch.Tensor:
        """Contribution of v_proj / o_proj biases of a layer to the reads (zero for standard Llama)."""
        out = torch.zeros(G.shape[0], device=self.device)
        if self.o_bias[layer] is not None:
            out += (G @ self.o_bias[layer]).sum(1)
        if self.v_bias[layer] is not None:
            B, T, _ = G.shape
            H, Hkv, dh = self.n_heads, self.n_kv, self.d_head
            A = self.cap.attn[layer, :, :T, :T]
            u = (G @ self.W_O[layer]).view(B, T, H, dh)
            vb = self.v_bias[layer].view(Hkv, dh).repeat_interleave(H // Hkv, 0)  # [H, dh]
            out += torch.einsum("bqhe,hq,he->b", u, A.sum(-1), vb)
        return out

    def _factored_attn_back(self, layer: int, vecs: torch.Tensor, coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``_attn_backward`` for G[b, t] = sum_i coef[b, i, t] * vecs[b, i] (skip kept): R vectors become R * (1 + H)."""
        B, R, _ = vecs.shape
        T = coef.shape[-1]
        H, Hkv, dh = self.n_heads, self.n_kv, self.d_head
        A = self.cap.attn[layer, :, :T, :T]  # [H, q, k]
        u = (vecs @ self.W_O[layer]).view(B, R, H, dh)
        W_V = self.W_V[layer].view(Hkv, dh, self.d).repeat_interleave(H // Hkv, 0)  # [H, dh, d]
        new_vecs = torch.einsum("brhe,hed->brhd", u, W_V) * self.w_in[layer]
        # new_coef[b, r, h, k] = s_in[k] * sum_q A[h, q, k] coef[b, r, q]
        new_coef = torch.bmm(A.transpose(1, 2), coef.reshape(B * R, T).T.expand(H, T, B * R))  # [H, k, B*R]
        new_coef = new_coef.permute(2, 0, 1).reshape(B, R * H, T) * self.cap.scale_in[layer, :T]
        return torch.cat([vecs, new_vecs.reshape(B, R * H, self.d)], 1), torch.cat([coef, new_coef], 1)

    def _factored_is_cheaper(self, R: int, T: int) -> bool:
        # factored: R*H*T^2 (coefficients) + R*(1+H)*T*d (densify for the edges); dense: T^2*d
        return self.factored and R * self.n_heads * T * T + R * (1 + self.n_heads) * T * self.d < T * T * self.d

    def rows(self, layer: int, pos: Int[Tensor, " B"], vectors: Float[Tensor, "B d"]
             ) -> tuple[Float[Tensor, "B n_sources"], Float[Tensor, " B"]]:
        """Edge rows for targets reading ``vectors`` at ``mid_layer`` (or ``r_L`` when ``layer == n_layers``).

        Returns ``rows [B, n_sources]`` and ``bias [B]``, the part of each target that comes from
        no node (b_dec of earlier layers, attention biases), so that ``rows.sum(1) + bias`` equals
        the read value (``pre-activation - b_enc`` for features, the centred logit for logits).

        The backward gradient over positions starts as one vector at one position; through the
        first attention layers it is kept factored (a few vectors with per-position coefficients,
        ``H + 1`` times more per layer) while that is cheaper than the dense ``[T, d]`` form.
        """
        B = vectors.shape[0]
        T = int(pos.max()) + 1
        vecs = vectors[:, None, :].clone()  # [B, R=1, d]
        coef = torch.zeros(B, 1, T, device=self.device)
        coef[torch.arange(B, device=self.device), 0, pos] = 1.0
        G: torch.Tensor | None = None  # dense form, once the factored one stops paying off

        def attn_back(j: int) -> None:
            nonlocal vecs, coef, G
            if G is None and self._factored_is_cheaper(vecs.shape[1], T):
                vecs, coef = self._factored_attn_back(j, vecs, coef)
                return
            if G is None:
                G, vecs, coef = torch.einsum("brt,brd->btd", coef, vecs), None, None
            G = G + self._attn_backward(j, G)

        def dense() -> torch.Tensor:
            return G if G is not None else torch.einsum("brt,brd->btd", coef, vecs)

        rows = torch.zeros(B, self.n_sources, device=self.device)
        bias = torch.zeros(B, device=self.device)
        j = layer
        if j < self.n_layers:
            bias += self._bias_through_attention(j, dense())
            attn_back(j)
        while True:
            D = dense()
            if j == 0:
                rows[:, self.token_offset : self.token_offset + T] = torch.einsum("btd,td->bt", D, self.cap.embed[:T])
                break
            src = j - 1
            block, acts, index = self._blocks[src]
            contrib = torch.einsum("btd,tkd->btk", D, block[:T].float()) * acts[:T]  # [B, T, kmax]
            idx = index[:T]
            valid = idx >= 0
            rows[:, idx[valid]] = contrib[:, valid]
            start = self.error_offset + src * self.n_pos
            rows[:, start : start + T] = torch.einsum("btd,td->bt", D, self.errors[src, :T])
            bias += (D @ self.b_dec[src]).sum(1) + D[:, 0] @ self.bos_out[src]
            j = src
            if self.W_skip[j] is not None:  # the MLP's skip passes r_{j+1}'s gradient on to mid_j through its input
                G = D = D + (D @ self.W_skip[j]) * self.w_post[j] * self.cap.scale_post[j, :T, None]
            bias += self._bias_through_attention(j, D)
            attn_back(j)
        return rows, bias
