"""The model families crv computes exact attribution graphs for: an explicit registry.

crv's engine freezes attention patterns and RMSNorm scales and propagates reads
backwards through ``o_proj``/``v_proj`` and the norms' gains (``crv.attribution.linear``).
That is exact for a decoder whose layer is

    mid = r + o_proj(attn(v_proj(RMSNorm_in(r))))      (q/k only shape the frozen pattern)
    r'  = mid + MLP(RMSNorm_post(mid))                  (the MLP is replaced by a transcoder)

with ``RMSNorm(x) = w * x / rms(x)`` and logits ``lm_head(RMSNorm_final(r_L))``. A family is
listed here only when its Hugging Face implementation has exactly that shape; anything
else is refused at load (:func:`check_supported`) rather than given wrong graphs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SiteNames:
    """Attribute paths of a family's modules: model-level ones from the causal LM, per-layer ones from a layer."""

    layers: str = "model.layers"
    embedding: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    attention: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"


@dataclass(frozen=True)
class ModelFamily:
    """One supported architecture: the ``config.model_type`` values it covers and what it brings."""

    name: str
    model_types: tuple[str, ...]
    notes: str
    sites: SiteNames = SiteNames()  # where its modules are (crv.lm.sites names them)


@dataclass(frozen=True)
class RefusedFamily:
    """An architecture crv knows and refuses, with the reason."""

    model_types: tuple[str, ...]
    reason: str


#: architectures with exact graphs (checked against circuit-tracer and by the completeness check)
FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily("llama", ("llama",), "Llama-2/3.x, SmolLM2, crv's reasoner: GQA, tied or untied embeddings, "
                    "optional attention biases"),
        ModelFamily("qwen2", ("qwen2",), "Qwen2/2.5: q/k/v biases (the v bias is a constant through the frozen pattern)"),
        ModelFamily("qwen3", ("qwen3",), "Qwen3 (dense): q/k RMSNorms sit inside the frozen attention pattern"),
    )
}

#: architectures crv recognises but cannot attribute exactly (yet)
REFUSED: tuple[RefusedFamily, ...] = (
    RefusedFamily(("gemma", "gemma2", "gemma3", "gemma3_text"),
                  "Gemma's sandwich norms (a post-attention RMSNorm on the attention output, pre/post-feedforward "
                  "norms), (1 + w) norm gains, scaled embeddings and final-logit soft-capping are not modelled by "
                  "crv's linear replacement"),
    RefusedFamily(("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"),
                  "mixture-of-experts MLPs have no per-layer transcoder layout in crv"),
)


class UnsupportedModelError(ValueError):
    """A checkpoint's architecture is not one crv computes exact graphs for."""


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` crv accepts, sorted."""
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


def family_of(model_type: str) -> ModelFamily:
    """The family of a ``config.model_type``; :class:`UnsupportedModelError` names the supported ones."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    listed = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    why = next((r.reason for r in REFUSED if model_type in r.model_types), None)
    reason = f": {why}" if why else ""
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported{reason}. crv computes exact attribution graphs for: {listed}."
    )


def check_supported(config) -> ModelFamily:  # type: ignore[no-untyped-def]
    """Check a Hugging Face config (``config.model_type`` and the shapes the engine assumes)."""
    fam = family_of(getattr(config, "model_type", "") or "")
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        raise UnsupportedModelError(f"{config.model_type} checkpoint with experts: {REFUSED[1].reason}")
    if getattr(config, "mlp_only_layers", None) or getattr(config, "layer_types", None) and any(
        t not in ("full_attention", "sliding_attention") for t in config.layer_types
    ):
        raise UnsupportedModelError(f"{config.model_type}: layer types {config.layer_types} are not all attention layers")
    rope = getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type in LENGTH_DEPENDENT_ROPE:
        raise UnsupportedModelError(
            f"{config.model_type} with rope_type {rope_type!r}: its rotary frequencies depend on the length of the forward "
            "pass (transformers recomputes them from the longest position), so one forward per trace is not the graph of "
            "each step's prefix once a trace passes original_max_position_embeddings. Use a checkpoint with a static "
            "rope type (default, linear, llama3, yarn) or set rope_scaling to null in config.json if your traces stay "
            "within the original context.")
    return fam


#: rope types whose frequencies transformers recomputes from the sequence length
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
