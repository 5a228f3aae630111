"""The language-model adapter: which architectures crv supports, how a model is loaded or
imported, how a question and steps become text (prompt formats) and text becomes token ids
with per-step token spans, and where a model's modules are (named hook sites). Nothing past this
package sees characters, file formats or Hugging Face module paths."""

from crv.lm.adapter import LoadedModel, open_model
from crv.lm.encode import EncodedTrace, TraceEncoder, UnknownCharacterError
from crv.lm.families import FAMILIES, ModelFamily, UnsupportedModelError, check_supported
from crv.lm.load import DEFAULT_MODEL_DIR, ModelLoadError, load_model, model_notes
from crv.lm.prompt import PROMPT_FORMATS, ChatFormat, PlainFormat, default_format_name, make_format
from crv.lm.sites import LAYER_PARTS, HookSites, hook_sites

__all__ = [
    "LoadedModel", "open_model",
    "EncodedTrace", "TraceEncoder", "UnknownCharacterError", "FAMILIES", "ModelFamily", "UnsupportedModelError",
    "check_supported", "DEFAULT_MODEL_DIR", "ModelLoadError", "load_model", "model_notes", "PROMPT_FORMATS",
    "ChatFormat", "PlainFormat", "default_format_name", "make_format", "LAYER_PARTS", "HookSites", "hook_sites",
]
