"""WeightLens: a feature's input and output tokens from the weights alone (no data, no explainer model).

For a feature ``f`` of the layer-``l`` transcoder (encoder row ``e_f``, bias ``b_f``, decoder row ``d_f``):

- **input tokens** by the direct path from the token embedding into the MLP input, through the MLP input
  normalisation with its gain ``g_l`` (``post_attention_layernorm``):

  ``s_in(t) = e_f . (g_l * E_t / rms(E_t)) + b_f``

  i.e. the pre-activation the token would give the feature on its own, with no context;
- **output tokens** by the logit lens of its decoder row through the final normalisation's gain ``g_F``:
  ``s_out(t) = W_U[t] . (g_F * d_f)`` (the positive and negative ends).

Tokens are ranked among ``vocab`` (:mod:`crv.features.describe` passes the tokens its corpus contains: a
char-level or BPE vocabulary holds many tokens the model never saw in training, whose normalised embeddings
give large, meaningless direct-path scores). Golimblevskaia et al. (2025), *Circuit Insights: Towards
Interpretability Beyond Activations*; they also filter the weight-based tokens by co-activation statistics
from data, and keep weight-based descriptions for context-independent features (both in
:mod:`crv.features.describe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from crv.lm.sites import hook_sites
from crv.transcoders.io import TranscoderSet


@dataclass(frozen=True)
class WeightLensLayer:
    """Top tokens per feature of one layer: ``[F, n]`` token ids and scores."""

    in_tokens: torch.Tensor
    in_scores: torch.Tensor
    out_tokens: torch.Tensor
    out_scores: torch.Tensor
    neg_tokens: torch.Tensor
    neg_scores: torch.Tensor


def _normalised_embeddings(model: PreTrainedModel, layer: int) -> torch.Tensor:
    """``g_l * E / rms(E)`` for every token ``[V, d]`` (float32): what a token alone puts into layer ``l``'s MLP input."""
    norm = hook_sites(model).post_attention_norm(layer)
    E = model.get_input_embeddings().weight.detach().float()
    return E * torch.rsqrt(E.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.detach().float()


@torch.no_grad()
def weight_lens(model: PreTrainedModel, transcoders: TranscoderSet, layer: int, n: int = 10,
                vocab: torch.Tensor | None = None, chunk: int = 8192) -> WeightLensLayer:
    """WeightLens of every feature of ``layer`` (see the module docstring) over the token ids ``vocab``
    (default: all); ``chunk``: vocabulary rows at a time."""
    tc = transcoders[layer]
    F = tc.b_enc.shape[0]
    idx = torch.arange(F)
    W_enc = tc.encoder_rows(idx).float().cpu()  # [F, d]
    b_enc = tc.b_enc.float().cpu()
    W_dec = tc.decoder_rows(idx).float().cpu()
    En = _normalised_embeddings(model, layer).cpu()
    ids = torch.arange(En.shape[0]) if vocab is None else vocab.long().cpu()
    En = En[ids]
    V = En.shape[0]
    n = min(n, V)
    best_s = torch.full((F, n), float("-inf"))
    best_t = torch.zeros((F, n), dtype=torch.long)
    for start in range(0, V, chunk):  # running top-n over vocabulary chunks: memory F x chunk, not F x V
        s = (En[start : start + chunk] @ W_enc.T + b_enc).T  # [F, c]
        cand_s = torch.cat([best_s, s], 1)
        cand_t = torch.cat([best_t, torch.arange(start, start + s.shape[1]).expand(F, -1)], 1)
        top = cand_s.topk(n, dim=1)
        best_s, best_t = top.values, cand_t.gather(1, top.indices)
    g_final = hook_sites(model).final_norm.weight.detach().float().cpu()
    W_U = model.get_output_embeddings().weight.detach().float().cpu()  # [V, d]
    W_U = W_U[ids]
    out = (W_dec * g_final) @ W_U.T  # [F, V]
    pos, neg = out.topk(n, dim=1), (-out).topk(n, dim=1)
    return WeightLensLayer(ids[best_t], best_s, ids[pos.indices], pos.values, ids[neg.indices], -neg.values)
