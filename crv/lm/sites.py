"""Named hook sites of a supported decoder, like TransformerLens' hook points.

Every part of crv that reads or edits a model's modules (the frozen forward of
``crv.attribution.capture``, the linear replacement's weights, the transcoders'
activation stream, feature interventions, WeightLens, the test oracle) asks for them
by name here; the attribute paths of a family live in its
:class:`~crv.lm.families.ModelFamily` (``sites``), nowhere else.

    s = hook_sites(model)
    s.mlp(3)                 # layer 3's MLP (what a transcoder replaces)
    s.post_attention_norm(3) # its input RMSNorm (gain g_3, frozen 1/rms)
    s["layers.3.mlp"]        # the same module by its site name
    s.final_norm, s.embedding, s.unembed

Site names: ``embedding``, ``final_norm``, ``unembed`` and ``layers.<i>.<part>`` with
``<part>`` one of :data:`LAYER_PARTS`.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from crv.lm.families import SiteNames, family_of

#: the per-layer sites every supported family has
LAYER_PARTS = ("attention", "mlp", "input_norm", "post_attention_norm")


def _get(root: torch.nn.Module, path: str) -> torch.nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class HookSites:
    """The named modules of one loaded model (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, names: SiteNames):
        self.model, self.names = model, names
        self.layers: list[torch.nn.Module] = list(_get(model, names.layers))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def embedding(self) -> torch.nn.Module:
        return _get(self.model, self.names.embedding)

    @property
    def final_norm(self) -> torch.nn.Module:
        return _get(self.model, self.names.final_norm)

    @property
    def unembed(self) -> torch.nn.Module:
        return _get(self.model, self.names.unembed)

    def attention(self, layer: int) -> torch.nn.Module:
        return _get(self.layers[layer], self.names.attention)

    def mlp(self, layer: int) -> torch.nn.Module:
        return _get(self.layers[layer], self.names.mlp)

    def input_norm(self, layer: int) -> torch.nn.Module:
        return _get(self.layers[layer], self.names.input_norm)

    def post_attention_norm(self, layer: int) -> torch.nn.Module:
        return _get(self.layers[layer], self.names.post_attention_norm)

    def __getitem__(self, site: str) -> torch.nn.Module:
        """A module by site name (``"final_norm"``, ``"layers.3.mlp"``); a wrong name lists the valid ones."""
        if site in ("embedding", "final_norm", "unembed"):
            return getattr(self, site)
        parts = site.split(".")
        if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in LAYER_PARTS:
            i = int(parts[1])
            if i >= self.n_layers:
                raise KeyError(f"site {site!r}: the model has layers 0..{self.n_layers - 1}")
            return getattr(self, parts[2])(i)
        raise KeyError(f"unknown hook site {site!r}; sites are embedding, final_norm, unembed and "
                       f"layers.<i>.<part> with part in {', '.join(LAYER_PARTS)}")


def hook_sites(model: PreTrainedModel) -> HookSites:
    """The hook sites of a model of a supported family (:class:`~crv.lm.families.UnsupportedModelError` otherwise)."""
    return HookSites(model, family_of(getattr(model.config, "model_type", "") or "").sites)
