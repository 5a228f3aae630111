"""The model adapter: one object with everything crv needs to know about a loaded model.

    lm = open_model("runs/smollm2-ft700")             # or open_model() for the shipped reasoner
    lm.model, lm.tokenizer, lm.encoder               # weights, fast tokenizer, prompt format + step spans
    lm.family.name, lm.device, lm.dtype              # "llama", cpu, torch.float32
    lm.sites.mlp(3)                                  # named hook sites (crv.lm.sites)

Device and dtype are fixed here once (as circuit-tracer's ``ReplacementModel.from_pretrained``);
everything downstream reads them from the object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from crv.lm.encode import TraceEncoder, trace_encoder
from crv.lm.families import ModelFamily, family_of
from crv.lm.load import DEFAULT_MODEL_DIR, load_model, parse_dtype
from crv.lm.sites import HookSites, hook_sites


@dataclass(frozen=True)
class LoadedModel:
    """A checked, loaded model directory: weights in eval mode, tokenizer, prompt format, family and hook sites."""

    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    encoder: TraceEncoder
    family: ModelFamily

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def sites(self) -> HookSites:
        return hook_sites(self.model)


def open_model(path: str | Path | None = None, dtype: str | torch.dtype = torch.float32, device: str = "cpu",
               prompt_format: str | None = None) -> LoadedModel:
    """Load a model directory (default: the shipped reasoner) with its tokenizer and prompt format
    (``plain`` / ``chat``; default: the model's own), on ``device`` in ``dtype``."""
    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    model, tok = load_model(path, dtype=parse_dtype(dtype), device=device)
    return LoadedModel(path, model, tok, trace_encoder(tok, path, prompt_format), family_of(model.config.model_type))
