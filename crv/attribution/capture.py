"""One forward pass of a Llama with everything the local replacement model freezes.

The local replacement model of a prompt is the original model with, at every
position, its attention patterns and RMSNorm scales frozen at their values in
this pass and every MLP replaced by its transcoder plus an error term. Given
those frozen quantities the map from node writes (token embeddings, feature
decoder vectors, error vectors) to feature pre-activations and logits is linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedModel

from crv.lm.sites import hook_sites


@dataclass
class ForwardCapture:
    """Frozen quantities of one forward pass (batch of one sequence)."""

    ids: Int[Tensor, " T"]
    embed: Float[Tensor, "T d"]  # token embeddings (what token nodes write)
    attn: Float[Tensor, "L H T T"]  # attention patterns
    scale_in: Float[Tensor, "L T"]  # input norm 1/rms
    scale_post: Float[Tensor, "L T"]  # post-attention norm 1/rms
    scale_final: Float[Tensor, " T"]  # final norm 1/rms
    mlp_in: Float[Tensor, "L T d"]
    mlp_out: Float[Tensor, "L T d"]
    logits: Float[Tensor, "T V"]
    hidden: Float[Tensor, "L_plus_1 T d"]  # residual stream before each layer and after the last (HF hidden_states)

    @property
    def n_pos(self) -> int:
        return int(self.ids.shape[0])


def _inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return torch.rsqrt(x.pow(2).mean(-1) + eps)


@torch.no_grad()
def capture_forward(model: PreTrainedModel, ids: Int[Tensor, " T"]) -> ForwardCapture:
    """Run ``ids`` ([T]) through the model once (eager attention) and record the frozen parts."""
    if ids.ndim != 1:
        raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    sites = hook_sites(model)
    n = sites.n_layers
    rec: dict[str, list] = {k: [None] * n for k in ("attn", "s_in", "s_post", "mlp_in", "mlp_out")}
    final: dict[str, torch.Tensor] = {}
    handles = []

    def hook(store: str, i: int, what: str, eps: float = 0.0):  # type: ignore[no-untyped-def]
        def fn(module, args, out):  # type: ignore[no-untyped-def]
            if what == "scale":
                rec[store][i] = _inv_rms(args[0][0], eps)
            elif what == "attn":
                rec[store][i] = out[1][0].float()
            elif what == "in":
                rec[store][i] = args[0][0].float()
            else:
                rec[store][i] = out[0].float()
        return fn

    for i in range(n):
        norm_in, norm_post, mlp = sites.input_norm(i), sites.post_attention_norm(i), sites.mlp(i)
        handles += [
            norm_in.register_forward_hook(hook("s_in", i, "scale", norm_in.variance_epsilon)),
            norm_post.register_forward_hook(hook("s_post", i, "scale", norm_post.variance_epsilon)),
            sites.attention(i).register_forward_hook(hook("attn", i, "attn")),
            mlp.register_forward_hook(hook("mlp_in", i, "in")),
            mlp.register_forward_hook(hook("mlp_out", i, "out")),
        ]
    norm = sites.final_norm
    handles.append(norm.register_forward_hook(lambda m, a, o: final.__setitem__("s", _inv_rms(a[0][0], norm.variance_epsilon))))
    handles.append(sites.embedding.register_forward_hook(lambda m, a, o: final.__setitem__("e", o[0].float())))
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        out = model(input_ids=ids[None].to(model.device), output_hidden_states=True)
        logits = out.logits[0].float()
        hidden = torch.stack([h[0].float() for h in out.hidden_states])
    finally:
        model.config._attn_implementation = previous
        for h in handles:
            h.remove()
    return ForwardCapture(
        ids=ids.cpu(),
        embed=final["e"],
        attn=torch.stack(rec["attn"]),
        scale_in=torch.stack(rec["s_in"]),
        scale_post=torch.stack(rec["s_post"]),
        scale_final=final["s"],
        mlp_in=torch.stack(rec["mlp_in"]),
        mlp_out=torch.stack(rec["mlp_out"]),
        logits=logits,
        hidden=hidden,
    )
