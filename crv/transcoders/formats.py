"""What a transcoder directory holds, read from its ``config.yaml`` as circuit-tracer 0.5.0 reads it.

A per-layer set (``model_kind: transcoder_set``) is one safetensors file per layer with
``W_enc [d_transcoder, d_model]``, ``W_dec [d_transcoder, d_model]``, ``b_enc``, ``b_dec``,
optionally ``activation_function.threshold`` (JumpReLU) and ``W_skip [d_model, d_model]``
(a linear skip connection, ``out += x @ W_skip.T``).

The activation comes from ``activation`` in the config; where it is absent, as circuit-tracer
does, a threshold tensor means ``jumprelu`` and anything else ``relu`` -- unless the set is in
:data:`KNOWN_SETS` (the CRV 8B set is TopK, k=128, and its config says neither) or the config
gives ``k`` (then ``topk``). What was inferred is kept in :attr:`TranscoderFormat.notes`.

Hooks: crv's engine reads features from the MLP input (``mlp.hook_in``: the post-attention
norm's output ``w * x / rms(x)``) and writes to the MLP output (``mlp.hook_out`` / ``hook_mlp_out``).
``ln2.hook_normalized`` is refused: in TransformerLens (circuit-tracer loads models with
``fold_ln=False``) it is ``x / rms(x)`` *before* the gain ``w``, another point. Other hooks and
cross-layer transcoders are refused with the reason too.

``k``: the config's ``k``, else an integer tensor ``k`` in the layer files (sets saved from a
``state_dict`` carry one), else a known set's. An explicit ``activation`` is always taken as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crv.transcoders.activation_functions import ACTIVATIONS, ALIASES, NEEDS_K

INPUT_HOOKS = ("mlp.hook_in",)
#: input hooks crv knows and refuses, with the reason and the fix
REFUSED_INPUT_HOOKS = {
    "ln2.hook_normalized": (
        "in TransformerLens (circuit-tracer loads with fold_ln=False) ln2.hook_normalized is x / rms(x) before the "
        "post-attention norm's gain w, while crv's engine reads mlp.hook_in = w * x / rms(x). Fold the gain into the "
        "encoder once (W_enc[:, j] /= w[j], W_skip[:, j] /= w[j] likewise) and set feature_input_hook: mlp.hook_in"),
}
K_TENSOR = "k"  # an integer tensor holding k (state_dict-style files)
OUTPUT_HOOKS = ("mlp.hook_out", "hook_mlp_out")
THRESHOLD = "activation_function.threshold"
SKIP = "W_skip"
REQUIRED = ("W_enc", "W_dec", "b_enc", "b_dec")


@dataclass(frozen=True)
class KnownSet:
    """A published set whose config lacks what crv needs."""

    repo: str
    activation: str
    k: int | None
    model: str


#: sets recognised by their hub id (in the config's ``repo_id`` / ``scan`` / ``transcoders`` entries or the path)
KNOWN_SETS: tuple[KnownSet, ...] = (
    KnownSet("facebook/crv-8b-instruct-transcoders", "topk", 128, "meta-llama/Llama-3.1-8B-Instruct"),
)


class TranscoderFormatError(ValueError):
    """A transcoder set crv cannot read as it is; the message names the fix."""


@dataclass(frozen=True)
class TranscoderFormat:
    """How to read one transcoder set."""

    activation: str  # a key of ACTIVATIONS
    k: int | None
    input_hook: str
    output_hook: str
    skip: bool  # every layer has W_skip
    notes: tuple[str, ...] = ()  # what was inferred rather than read

    def describe(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        skip = ", skip connection" if self.skip else ""
        notes = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.activation}{k}{skip}, {self.input_hook} -> {self.output_hook}{notes}"


def known_set(config: dict, path: Path) -> KnownSet | None:
    """The entry of :data:`KNOWN_SETS` this set is, judged by hub ids in its config and path."""
    haystack = [str(config.get(key, "")) for key in ("repo_id", "scan", "name")]
    haystack += [str(t) for t in config.get("transcoders") or []]
    haystack.append(str(path.resolve()).replace("--", "/"))  # HF cache dirs: models--facebook--crv-...
    for entry in KNOWN_SETS:
        if any(entry.repo in h for h in haystack):
            return entry
    return None


def _missing_k_message(config_path: Path, activation: str) -> str:
    table = "; ".join(f"{s.repo}: {s.activation} k={s.k}" for s in KNOWN_SETS if s.k is not None)
    return (f"{config_path}: activation {activation} needs k (how many features fire per token), and the config has no "
            f"'k'. Pass it: `--k N` on the command line, or k=N to Attributor.load / load_transcoders, or add "
            f"'k: N' to config.yaml. Known sets: {table}.")


def read_format(
    config: dict, config_path: Path, tensor_names: list[set[str]], k: int | None = None, file_k: int | None = None
) -> TranscoderFormat:
    """The format of a set from its config and each layer file's tensor names (``k`` overrides the config;
    ``file_k``: the value of an integer ``k`` tensor in the layer files, if they hold one)."""
    kind = config.get("model_kind", "transcoder_set")
    if kind == "cross_layer_transcoder":
        raise TranscoderFormatError(
            f"{config_path}: this is a cross-layer transcoder (CLT). crv attributes per-layer transcoders only: a CLT "
            "feature writes to every later layer, which crv's engine does not model. Use circuit-tracer for CLTs, or a "
            "per-layer set (model_kind: transcoder_set).")
    if kind != "transcoder_set":
        raise TranscoderFormatError(f"{config_path}: model_kind {kind!r} is not a transcoder set (expected transcoder_set)")
    for i, names in enumerate(tensor_names):
        missing = [t for t in REQUIRED if t not in names]
        if missing:
            raise TranscoderFormatError(
                f"{config_path.parent}: layer {i} file lacks {', '.join(missing)} (has {', '.join(sorted(names))}); crv reads "
                f"circuit-tracer's per-layer layout: {', '.join(REQUIRED)}, optional {THRESHOLD} and {SKIP}")
    has_threshold = [THRESHOLD in n for n in tensor_names]
    has_skip = [SKIP in n for n in tensor_names]
    if len(set(has_threshold)) > 1 or len(set(has_skip)) > 1:
        raise TranscoderFormatError(f"{config_path.parent}: layers disagree on {THRESHOLD} / {SKIP}: every layer must have "
                                    "the same tensors")
    notes: list[str] = []
    known = known_set(config, config_path.parent)
    raw = config.get("activation")
    if raw is not None:
        activation = ALIASES.get(str(raw).lower(), str(raw).lower())
        if activation not in ACTIVATIONS:
            raise TranscoderFormatError(f"{config_path}: activation {raw!r} is not one crv reads ({', '.join(ACTIVATIONS)})")
    elif has_threshold[0]:
        activation = "jumprelu"
        notes.append("activation inferred from the threshold tensor")
    elif known is not None:
        activation = known.activation
        notes.append(f"activation from the known set {known.repo}")
    elif "k" in config or file_k is not None:
        activation = "topk"
        notes.append("activation inferred from 'k' in the config")
    else:
        activation = "relu"
        notes.append("no activation in the config and no threshold: relu, as circuit-tracer reads it")
    if activation == "jumprelu" and not has_threshold[0]:
        raise TranscoderFormatError(f"{config_path}: activation jumprelu needs {THRESHOLD} in every layer file; none has it")
    if activation != "jumprelu" and has_threshold[0]:
        raise TranscoderFormatError(f"{config_path}: the files hold {THRESHOLD} but the config says activation "
                                    f"{activation}; set activation: jumprelu (or remove the threshold)")
    if activation in NEEDS_K:
        if k is None:
            k = config.get("k")
            if k is None and file_k is not None:
                k = file_k
                notes.append(f"k={k} from the layer files' k tensor")
            if k is None and known is not None and known.k is not None:
                k = known.k
                notes.append(f"k={k} from the known set {known.repo}")
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            if k is None:
                raise TranscoderFormatError(_missing_k_message(config_path, activation))
            raise TranscoderFormatError(f"{config_path}: k must be a positive integer, got {k!r}")
    else:
        k = None
    in_hook = config.get("feature_input_hook", "mlp.hook_in")
    out_hook = config.get("feature_output_hook", "mlp.hook_out")
    if in_hook in REFUSED_INPUT_HOOKS:
        raise TranscoderFormatError(f"{config_path}: feature_input_hook {in_hook!r} is refused: {REFUSED_INPUT_HOOKS[in_hook]}.")
    if in_hook not in INPUT_HOOKS:
        raise TranscoderFormatError(
            f"{config_path}: feature_input_hook {in_hook!r} is not supported. crv's engine reads transcoder features from "
            f"the MLP input (after the post-attention norm): {' or '.join(INPUT_HOOKS)}.")
    if out_hook not in OUTPUT_HOOKS:
        raise TranscoderFormatError(
            f"{config_path}: feature_output_hook {out_hook!r} is not supported. crv's engine replaces the MLP output: "
            f"{' or '.join(OUTPUT_HOOKS)}.")
    return TranscoderFormat(activation, k, in_hook, out_hook, has_skip[0], tuple(notes))
