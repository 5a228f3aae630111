"""Transcoder activation functions, one per name, as circuit-tracer 0.5.0 defines them.

==============  ===========================================================  ============================
name            activation of a pre-activation row ``x``                     circuit-tracer
==============  ===========================================================  ============================
``topk``        the k largest values of ``x`` kept as they are (may be < 0)  ``TopK`` (the CRV 8B set)
``topk_relu``   the k largest, then ReLU (active values are always > 0)      none: crv's own sets
``relu``        ``max(x, 0)``                                                 ``F.relu`` (no threshold)
``jumprelu``    ``x * (x > threshold)``, one threshold per feature            ``JumpReLU``
==============  ===========================================================  ============================

Each is a frozen dataclass; :data:`ACTIVATIONS` maps names to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TopK:
    """Keep the k largest entries of the last axis as they are, zero the rest (circuit-tracer's TopK)."""

    k: int
    name: str = field(default="topk", init=False)

    def __call__(self, pre: torch.Tensor) -> torch.Tensor:
        _, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))


@dataclass(frozen=True)
class TopKReLU:
    """Keep the k largest entries, ReLU'd (crv's trained sets: an active feature is always positive)."""

    k: int
    name: str = field(default="topk_relu", init=False)

    def __call__(self, pre: torch.Tensor) -> torch.Tensor:
        values, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, F.relu(values))


@dataclass(frozen=True)
class ReLU:
    """``max(x, 0)``."""

    name: str = field(default="relu", init=False)

    def __call__(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre)


@dataclass(frozen=True, eq=False)
class JumpReLU:
    """``x * (x > threshold)`` with one threshold per feature (``activation_function.threshold`` in the file)."""

    threshold: torch.Tensor
    name: str = field(default="jumprelu", init=False)

    def __call__(self, pre: torch.Tensor) -> torch.Tensor:
        th = self.threshold.to(device=pre.device, dtype=pre.dtype)
        return pre * (pre > th)


ActivationFunction = TopK | TopKReLU | ReLU | JumpReLU

#: activation names in config.yaml -> what needs ``k`` / a threshold tensor
ACTIVATIONS: dict[str, type] = {"topk": TopK, "topk_relu": TopKReLU, "relu": ReLU, "jumprelu": JumpReLU}
#: other spellings found in the wild
ALIASES = {"jump_relu": "jumprelu", "top_k": "topk"}
NEEDS_K = ("topk", "topk_relu")


def make_activation(name: str, k: int | None = None, threshold: torch.Tensor | None = None) -> ActivationFunction:
    """The activation called ``name`` (``k`` for the TopK ones, ``threshold`` for JumpReLU)."""
    name = ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; crv reads {', '.join(ACTIVATIONS)}")
    if name in NEEDS_K:
        if k is None:
            raise ValueError(f"activation {name} needs k")
        return ACTIVATIONS[name](k)
    if name == "jumprelu":
        if threshold is None:
            raise ValueError("activation jumprelu needs a threshold tensor")
        return JumpReLU(threshold)
    return ReLU()
