"""Per-layer transcoders: a wide, sparse stand-in for one MLP.

``features = act(x @ W_enc.T + b_enc)`` and ``out = features @ W_dec + b_dec (+ x @ W_skip.T)``,
where ``x`` is the MLP input (after the post-attention RMSNorm, gain included), ``out``
predicts the MLP output of the same layer and ``act`` is one of
:mod:`crv.transcoders.activation_functions`.

Shapes follow circuit-tracer: ``W_enc`` and ``W_dec`` are ``[d_transcoder, d_model]``,
``b_enc`` is ``[d_transcoder]``, ``b_dec`` is ``[d_model]``, ``W_skip`` is ``[d_model, d_model]``.

Every transcoder the engine sees offers the same reads (:class:`TranscoderLayer`): dense
``encode``, and ``encoder_rows`` / ``decoder_rows`` of chosen features, so the engine never
needs a whole ``W_dec``. :class:`Transcoder` keeps its weights in memory (training, tests);
:class:`crv.transcoders.io.FileTranscoder` reads them from disk as needed.

:class:`TopKTranscoder` is what crv trains: TopK with a ReLU (``topk_relu``), decoder rows at
unit norm during training (the scale lives in the encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from crv.transcoders.activation_functions import ActivationFunction, TopKReLU


class TranscoderLayer(Protocol):
    """What the attribution engine, metrics and interventions read from one layer's transcoder."""

    layer: int
    d_model: int
    d_transcoder: int
    activation: ActivationFunction

    @property
    def b_enc(self) -> torch.Tensor: ...
    @property
    def b_dec(self) -> torch.Tensor: ...
    @property
    def W_skip(self) -> torch.Tensor | None: ...
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor: ...
    def encode(self, x: torch.Tensor) -> torch.Tensor: ...
    def encoder_rows(self, idx: torch.Tensor) -> torch.Tensor: ...
    def decoder_rows(self, idx: torch.Tensor) -> torch.Tensor: ...
    def decode(self, features: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor: ...
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TranscoderShape:
    """Size of one TopK transcoder crv trains."""

    d_model: int
    d_transcoder: int
    k: int

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.d_transcoder:
            raise ValueError(f"k must be in 1..d_transcoder ({self.d_transcoder}), got {self.k}")


def topk_activation(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of the last axis (ReLU'd), zero the rest (crv's trained activation)."""
    return TopKReLU(k)(pre)


class Transcoder(nn.Module):
    """One layer's transcoder with its weights in memory."""

    def __init__(
        self,
        d_model: int,
        d_transcoder: int,
        activation: ActivationFunction,
        layer: int,
        skip: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.d_model, self.d_transcoder, self.layer, self.activation = d_model, d_transcoder, layer, activation
        self.W_enc = nn.Parameter(torch.zeros(d_transcoder, d_model, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_transcoder, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_transcoder, d_model, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_model, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model, dtype=dtype)) if skip else None

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.W_enc.dtype), self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations."""
        return self.activation(self.pre_activations(x))

    def encoder_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.W_enc[idx.to(self.W_enc.device)]

    def decoder_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.W_dec[idx.to(self.W_dec.device)]

    def decode(self, features: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        out = features @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip connection: decode needs the input x")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)


class TopKTranscoder(Transcoder):
    """The transcoder crv trains: TopK + ReLU, no skip."""

    def __init__(self, shape: TranscoderShape, layer: int, dtype: torch.dtype = torch.float32):
        super().__init__(shape.d_model, shape.d_transcoder, TopKReLU(shape.k), layer, dtype=dtype)
        self.shape = shape

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

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Project decoder rows back to unit norm (done after every training step)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
