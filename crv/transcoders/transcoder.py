"""A per-layer TopK transcoder: a wide, sparse stand-in for one MLP.

``features = TopK_k(x @ W_enc.T + b_enc)`` and ``out = features @ W_dec + b_dec``,
where ``x`` is the MLP input (after the post-attention RMSNorm, gain included)
and ``out`` predicts the MLP output of the same layer. TopK keeps the k largest
pre-activations and, as circuit-tracer's TopK does, zeroes the negative ones
among them (so an active feature always has a positive activation).

Shapes follow circuit-tracer: ``W_enc`` and ``W_dec`` are ``[d_transcoder, d_model]``,
``b_enc`` is ``[d_transcoder]``, ``b_dec`` is ``[d_model]``. Decoder rows are kept
at unit norm during training (the scale lives in the encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TranscoderShape:
    """Size of one transcoder."""

    d_model: int
    d_transcoder: int
    k: int

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.d_transcoder:
            raise ValueError(f"k must be in 1..d_transcoder ({self.d_transcoder}), got {self.k}")


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of the last axis (ReLU'd), zero the rest."""
    values, indices = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, F.relu(values))


class TopKTranscoder(nn.Module):
    """One layer's transcoder."""

    def __init__(self, shape: TranscoderShape, layer: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.shape = shape
        self.layer = layer
        self.W_enc = nn.Parameter(torch.zeros(shape.d_transcoder, shape.d_model, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(shape.d_transcoder, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(shape.d_transcoder, shape.d_model, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(shape.d_model, dtype=dtype))

    @property
    def k(self) -> int:
        return self.shape.k

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder, encoder initialised to its transpose, zero biases."""
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=generator, dtype=self.W_dec.dtype)
            w /= w.norm(dim=-1, keepdim=True)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w)
            self.b_enc.zero_()
            self.b_dec.zero_()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations (exactly k or fewer nonzero per row)."""
        return topk_activation(self.pre_activations(x), self.k)

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Project decoder rows back to unit norm (done after every training step)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
