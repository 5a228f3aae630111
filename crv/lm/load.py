"""Loading a local causal LM and its fast tokenizer, offline, after checking its family.

    model, tok = load_model("runs/smollm2")          # any directory written by `crv import-model`
    model, tok = load_model()                         # the shipped reasoner (models/reasoner)

Weights are read from safetensors only and no remote code is ever run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from crv.lm.families import check_supported

#: Where the shipped reasoner lives, relative to the repository root.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "reasoner"
#: crv's own notes on an imported model (prompt format, source, fixes), next to config.json
CRV_MODEL_FILE = "crv_model.json"


class ModelLoadError(ValueError):
    """A model directory cannot be used as given (the message names the fix)."""


def model_notes(path: str | Path) -> dict:
    """The ``crv_model.json`` of a model directory ({} if it has none)."""
    f = Path(path) / CRV_MODEL_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A model directory's fast tokenizer (offsets are needed to find step spans)."""
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(f"{path}: crv needs a fast tokenizer (tokenizer.json) to map steps to tokens; "
                             "re-save it with `crv import-model` or `AutoTokenizer.from_pretrained(..., use_fast=True)`")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    tok.padding_side = "left"  # generation pads on the left
    return tok


#: model dtypes by name (``--dtype``)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or fp32 / bf16 / fp16) as a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_device(name: str | torch.device) -> torch.device:
    """A usable torch device from ``cpu`` / ``cuda`` / ``cuda:1``; a CUDA device that is not there is an error."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ModelLoadError(f"unknown device {name!r} ({e}); use cpu or cuda[:index]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {name!r}: this torch has no usable CUDA device (torch {torch.__version__}, "
                                 "cuda available: False); install a CUDA build of torch or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ModelLoadError(f"device {name!r} is not supported; use cpu or cuda[:index]")
    return device


def load_model(
    path: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a local model directory (default: the shipped reasoner) and its tokenizer, checked and in eval mode."""
    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    device = resolve_device(device)
    if path.is_file() and path.suffix == ".gguf":
        raise ModelLoadError(f"{path} is a GGUF file: convert it once with `crv import-model {path} --out DIR`, "
                             "then pass --model DIR")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no model at {path} (expected config.json, *.safetensors and tokenizer.json; "
                             "`crv import-model` writes such a directory)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    check_supported(config)
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path}: no *.safetensors weights, and crv never unpickles .bin files (nor does "
                             "`crv import-model`); if you trust the checkpoint, convert it once with transformers: "
                             "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True, use_safetensors=True)
    model.to(device).eval()
    return model, load_tokenizer(path)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> set[int]:
    """Token ids that end a generation: the tokenizer's EOS and the generation config's (end of turn)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra) if isinstance(extra, (list, tuple)) else {extra}
    return {i for i in ids if i is not None}
