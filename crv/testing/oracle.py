"""An independent oracle for edge rows: the real Hugging Face model, frozen by hooks, differentiated by autograd.

The local replacement model freezes attention patterns and norm scales and replaces each MLP by its
transcoder plus an error. Here the model's own modules run, with forward hooks that

* return ``w * x * rsqrt(mean(x^2) + eps).detach()`` from every RMSNorm (scale frozen, gain kept),
* detach the outputs of ``q_proj`` / ``k_proj`` (the pattern is a constant; ``v_proj``, its bias and
  ``o_proj`` stay live, so attention biases and GQA are whatever the architecture does),
* replace each MLP's output by its value in a clean forward plus a zero leaf ``delta[l]``, and add a
  zero leaf to the embeddings.

The gradient of a target feature's pre-activation ``W_enc[t] . mlp_in[l_t][p_t]`` with respect to
``delta[l][p]`` is then the direction in which a write at (layer ``l``, position ``p``) reaches it, and
an edge is that write dotted with it: ``a_s W_dec[s]`` for a feature, the error vector for an error
node, the embedding for a token. No line of crv's engine is used for the propagation.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from crv.lm.sites import hook_sites


@torch.no_grad()
def _clean_mlp_outputs(model: PreTrainedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    sites = hook_sites(model)
    hooks = [sites.mlp(i).register_forward_hook(lambda m, a, o: outs.append(o[0].detach().clone()))
             for i in range(sites.n_layers)]
    try:
        model(input_ids=ids[None])
    finally:
        for h in hooks:
            h.remove()
    return outs


def reading_gradients(model: PreTrainedModel, ids: torch.Tensor, encoder_row: torch.Tensor, layer: int, pos: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d pre / d delta [L, T, d], d pre / d embedding [T, d])`` of ``pre = encoder_row . mlp_in[layer][pos]``
    in the frozen model (float32, eager attention)."""
    mlp_out = _clean_mlp_outputs(model, ids)
    sites = hook_sites(model)
    L, T, d = sites.n_layers, len(ids), model.config.hidden_size
    delta = torch.zeros(L, T, d, requires_grad=True)
    d_emb = torch.zeros(T, d, requires_grad=True)
    read: dict[str, torch.Tensor] = {}
    hooks = []

    def frozen_norm(mod, args, out):  # type: ignore[no-untyped-def]
        x = args[0]
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + mod.variance_epsilon).detach()
        return mod.weight * (x * scale)

    for l in range(L):
        hooks.append(sites.input_norm(l).register_forward_hook(frozen_norm))
        hooks.append(sites.post_attention_norm(l).register_forward_hook(frozen_norm))
        hooks.append(sites.attention(l).q_proj.register_forward_hook(lambda m, a, o: o.detach()))
        hooks.append(sites.attention(l).k_proj.register_forward_hook(lambda m, a, o: o.detach()))

        def mlp_hook(mod, args, out, l=l):  # type: ignore[no-untyped-def]
            if l == layer:
                read["x"] = args[0][0, pos]
            return (mlp_out[l] + delta[l])[None]

        hooks.append(sites.mlp(l).register_forward_hook(mlp_hook))
    hooks.append(sites.embedding.register_forward_hook(lambda m, a, o: o + d_emb[None]))
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        model(input_ids=ids[None], output_hidden_states=False)
        pre = read["x"].float() @ encoder_row.float()
        g_delta, g_emb = torch.autograd.grad(pre, [delta, d_emb], allow_unused=True)
    finally:
        model.config._attn_implementation = previous
        for h in hooks:
            h.remove()
    return (torch.zeros_like(delta) if g_delta is None else g_delta), (torch.zeros_like(d_emb) if g_emb is None else g_emb)
