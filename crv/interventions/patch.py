"""Editing transcoder features inside the real model: MLP outputs patched by the decoder delta.

For an edited feature ``f`` of layer ``l`` whose activation at a position is ``a`` (the
layer's transcoder applied to the live MLP input there) and whose new value is ``a'``, the
MLP output at that position becomes ``mlp(x) + (a' - a) * W_dec[f]``. Everything else is the
original model (its MLPs, not their transcoder reconstructions), so an edit changes exactly
what the edited features contribute. Hooks live only inside :func:`feature_patch`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM

from crv.lm.sites import hook_sites
from crv.transcoders.io import TranscoderSet

MODES = ("clamp", "scale", "set")


@dataclass(frozen=True)
class FeatureEdit:
    """One transcoder feature to edit: ``clamp`` to 0, ``scale`` by ``value`` or ``set`` to ``value``."""

    layer: int
    feature: int
    mode: str = "clamp"
    value: float = 0.0

    def new_activation(self, a: torch.Tensor) -> torch.Tensor:
        if self.mode == "clamp":
            return torch.zeros_like(a)
        if self.mode == "scale":
            return a * self.value
        return torch.full_like(a, self.value)


def validate_edits(edits: Sequence[FeatureEdit], transcoders: TranscoderSet) -> None:
    """Clear errors for edits that name no real feature or mode."""
    if not edits:
        raise ValueError("no features to edit")
    n_layers, width = len(transcoders), transcoders.shape.d_transcoder
    for e in edits:
        if e.mode not in MODES:
            raise ValueError(f"unknown intervention mode {e.mode!r}; choose from {', '.join(MODES)}")
        if not 0 <= e.layer < n_layers:
            raise ValueError(f"feature {e.layer}/{e.feature}: layer {e.layer} out of range 0..{n_layers - 1}")
        if not 0 <= e.feature < width:
            raise ValueError(f"feature {e.layer}/{e.feature}: feature id {e.feature} out of range 0..{width - 1}")


@dataclass
class EditWindow:
    """Absolute token positions ``[start, stop)`` where edits apply; ``offset`` = position of the next input token."""

    start: int
    stop: int | None = None  # None: to the end
    offset: int = 0

    def mask(self, n: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(self.offset, self.offset + n, device=device)
        m = pos >= self.start
        if self.stop is not None:
            m &= pos < self.stop
        return m


@contextmanager
def feature_patch(model: LlamaForCausalLM, transcoders: TranscoderSet, edits: Sequence[FeatureEdit],
                  window: EditWindow) -> Iterator[EditWindow]:
    """Apply ``edits`` at the window's positions for every forward pass inside the block (batch size 1).

    The caller advances ``window.offset`` as tokens are fed (a KV-cached forward sees only
    the new tokens). The hooks are removed on exit, also when the block raises.
    """
    validate_edits(edits, transcoders)
    by_layer: dict[int, list[FeatureEdit]] = {}
    for e in edits:
        by_layer.setdefault(e.layer, []).append(e)
    handles = []

    def make_hook(layer: int, layer_edits: list[FeatureEdit]):  # type: ignore[no-untyped-def]
        tc = transcoders[layer]
        feats = torch.tensor([e.feature for e in layer_edits])

        def hook(module, args, output):  # type: ignore[no-untyped-def]
            x = args[0]
            mask = window.mask(x.shape[1], x.device)
            if not mask.any():
                return output
            acts = tc.encode(x[:, mask])[..., feats]  # [B, m, n_edits]
            new = torch.stack([e.new_activation(acts[..., i]) for i, e in enumerate(layer_edits)], -1)
            delta = (new - acts) @ tc.decoder_rows(feats).float()
            output = output.clone()
            output[:, mask] += delta.to(output.dtype)
            return output

        return hook

    try:
        sites = hook_sites(model)
        for layer, layer_edits in by_layer.items():
            handles.append(sites.mlp(layer).register_forward_hook(make_hook(layer, layer_edits)))
        yield window
    finally:
        for h in handles:
            h.remove()
