"""``crv import-model``: a GGUF file or a local Hugging Face directory -> a local safetensors directory.

    import_model("…/SmolLM2-135M-Instruct.Q4_1.gguf", "runs/smollm2")   # dequantized through transformers' GGUF reader
    import_model("~/llama-3.2-1b-instruct", "runs/llama1b")              # an HF directory (safetensors or GGUF only)

The architecture is checked first (:mod:`crv.lm.families`). The output holds config.json,
model.safetensors, the fast tokenizer and ``crv_model.json`` (source, prompt format, fixes made).
Fixes: a chat model whose GGUF metadata names the turn-start token as EOS (SmolLM2 does) gets
the token that really ends its assistant turn as EOS, in the tokenizer and the generation config.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from crv.digest import record_digest
from crv.lm.families import check_supported
from crv.lm.load import CRV_MODEL_FILE, ModelLoadError
from crv.lm.prompt import default_format_name


def _source_id(path: Path) -> str:
    """Cheap identity of the source: name, size and a hash of its first and last MiB."""
    h = hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def turn_end_token(chat_template: str | None) -> str | None:
    """The special token that closes a chat turn in a template (``<|im_end|>``, ``<|eot_id|>``, ...), if any."""
    if not chat_template:
        return None
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        if tok in chat_template:
            return tok
    m = re.search(r"\+ *'(<\|[^']+\|>)'", chat_template)
    return m.group(1) if m else None


def import_model(source: str | Path, out: str | Path, dtype: torch.dtype = torch.float32,
                 prompt_format: str | None = None) -> Path:
    """Convert ``source`` (a .gguf file or an HF directory) into ``out``; returns ``out``."""
    source, out = Path(source).expanduser(), Path(out)
    if source.is_file() and source.suffix == ".gguf":
        if importlib.util.find_spec("gguf") is None:
            raise ModelLoadError("reading GGUF files needs the gguf package: pip install 'crv[gguf]' (or pip install gguf)")
        kw = {"gguf_file": source.name}
        where = source.parent
    elif (source / "config.json").is_file():
        kw, where = {}, source
        if not any(source.glob("*.safetensors")):
            raise ModelLoadError(f"{source}: no *.safetensors weights; crv reads safetensors or GGUF only (if you trust "
                                 "the checkpoint: AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
                                 "safe_serialization=True) converts it) "
                                 "(it never unpickles .bin files)")
    else:
        raise ModelLoadError(f"{source}: expected a .gguf file or a directory with config.json")
    config = AutoConfig.from_pretrained(str(where), local_files_only=True, **kw)
    family = check_supported(config)
    tok = AutoTokenizer.from_pretrained(str(where), local_files_only=True, **kw)
    model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, local_files_only=True, **kw)
    fixes = []
    end = turn_end_token(getattr(tok, "chat_template", None))
    if end is not None and end in tok.get_vocab() and tok.eos_token != end:
        fixes.append(f"eos_token {tok.eos_token!r} -> {end!r} (the token that ends the assistant turn)")
        tok.eos_token = end
        end_id = tok.convert_tokens_to_ids(end)
        before = model.generation_config.eos_token_id
        # a list of stop ids (Llama-3: <|end_of_text|>, <|eom_id|>, <|eot_id|>) is kept, the turn end added to it
        model.generation_config.eos_token_id = (list(before) + [end_id] * (end_id not in before)
                                                if isinstance(before, (list, tuple)) else end_id)
        model.config.eos_token_id = model.generation_config.eos_token_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        fixes.append(f"pad_token set to {tok.eos_token!r}")
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    record_digest(*sorted(out.glob("*.safetensors")))  # the identity crv names this model by (crv.digest)
    tok.save_pretrained(out, legacy_format=False)  # tokenizer.json only (a GGUF source would be copied as tokenizer.model)
    notes = {
        "source": str(source.resolve()),
        "source_id": _source_id(source) if source.is_file() else None,
        "family": family.name,
        "model_type": config.model_type,
        "prompt_format": prompt_format or default_format_name(tok),
        "dtype": str(dtype).removeprefix("torch."),
        "fixes": fixes,
    }
    (out / CRV_MODEL_FILE).write_text(json.dumps(notes, indent=2) + "\n")
    return out
