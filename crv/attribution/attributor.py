"""The public entry point: model + transcoders + settings -> one graph per CoT step.

    from crv.attribution.attributor import Attributor
    att = Attributor.load()                               # shipped reasoner + transcoders
    att = Attributor.load("runs/smollm2", "runs/smollm2-transcoders")   # any supported local model + set
    graphs = att.step_graphs(record)                      # one Graph per step of a labelled record

A record is rendered in the model's prompt format (:mod:`crv.lm.prompt`) and tokenized with
per-step token spans (:mod:`crv.lm.encode`). A step's graph is computed at the step's last
token (the paper's "after" setting), over the whole context: prompt and all steps so far,
tokenized as the paper does, ``tok(text[:end_k])`` (:meth:`TraceEncoder.encode_prefix`).
Where those ids are a prefix of the whole trace's ids (every step on character-level,
SentencePiece and GPT-2-style tokenizers) the steps share one forward pass; a step whose
prefix tokenizes otherwise (a Llama-3 / Qwen2 pre-token that joins ``"."`` and the newline
after it) gets its own (:class:`TraceSteps`, ``own_forwards``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from crv.attribution.engine import AttributionConfig, TraceAttribution
from crv.attribution.graph import Graph
from crv.attribution.prune import Pruned, prune
from crv.lm.adapter import open_model
from crv.lm.encode import EncodedTrace, TraceEncoder, tokenize, with_lead
from crv.lm.prompt import PlainFormat
from crv.tasks.schema import Record
from crv.transcoders.io import TranscoderSet, load_transcoders
from crv.digest import content_identity

#: where a step's graph is computed: "last" = the step's last token (the paper's "after");
#: "result" = the token holding the step's "=" (the model is about to write the result; "last" if there is none);
#: "uncertain" = the position whose prediction of one of the step's tokens was least confident
STEP_TARGETS = ("last", "result", "uncertain")


def step_position(trace: EncodedTrace, k: int, target: str = "last", logits: torch.Tensor | None = None) -> int:
    """Token index at which the graph of step ``k`` of ``trace`` is computed.

    ``logits [T, V]`` of the trace are needed for ``"uncertain"``.
    """
    if target not in STEP_TARGETS:
        raise ValueError(f"unknown step target {target!r}; choose from {STEP_TARGETS}")
    start, end = trace.spans[k]
    if target == "result":
        a, b = trace.step_chars[k]
        eq = trace.text.find("=", a, b)
        if eq >= 0:
            return trace.token_at(eq)
    if target == "uncertain":
        if logits is None:
            raise ValueError("the 'uncertain' step target needs the trace's logits")
        lo = max(start - 1, 0)  # position start-1 predicts the step's first token
        confidence = torch.softmax(logits[lo : end - 1].float(), -1).max(-1).values
        return lo + int(confidence.argmin()) if len(confidence) else end - 1
    return end - 1


@dataclass(frozen=True)
class AttributorSpec:
    """Everything that defines an attributor: where the model and transcoders are, how they are loaded and the
    attribution settings; ``to_dict`` / ``from_dict`` give plain JSON (for workers and metadata)."""

    model_dir: str | None = None  # None: the shipped reasoner
    transcoder_dir: str | None = None  # None: the shipped set
    device: str = "cpu"
    dtype: str = "float32"
    prompt_format: str | None = None  # None: the model's own
    k: int | None = None  # TopK size for a set whose config lacks it
    attribution: AttributionConfig = AttributionConfig()

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AttributorSpec":
        d = dict(d)
        d["attribution"] = AttributionConfig(**d.get("attribution", {}))
        return cls(**d)


@dataclass
class StepView:
    """One step's graph and its pruned graph, computed once each (its structural fingerprint:
    :func:`crv.fingerprint.features.step_fingerprint`).

    ``position`` indexes ``encoding`` (the step's own prefix ids); ``trace`` is the forward pass the graph
    was read from (shared by the record's steps unless ``own_forward``).
    """

    index: int
    target: str
    position: int
    encoding: EncodedTrace
    trace: TraceAttribution
    own_forward: bool

    @cached_property
    def graph(self) -> Graph:
        g = self.trace.graph(pos=self.position, step_index=self.index)
        g.meta.update({"step_target": self.target, "own_forward": self.own_forward,
                       "prompt": self.encoding.text})  # the text the graph is computed on, as given
        return g

    @cached_property
    def pruned(self) -> Pruned:
        return prune(self.graph)


class TraceSteps:
    """The steps of one encoded trace, each attributed on its own prefix as the paper tokenizes it.

    ``shared`` is the whole trace's forward pass (logits, hidden states and active features of every
    position); a step whose prefix ids (``tok(text[:end_k])``) are not a prefix of the trace's ids gets
    a forward pass of its own, counted in ``own_forwards``.
    """

    def __init__(self, att: "Attributor", encoding: EncodedTrace, meta: dict | None = None) -> None:
        self.att, self.encoding, self.meta = att, encoding, dict(meta or {})
        self.shared = att.trace(encoding.ids, self.meta)
        self.own_forwards = 0

    def __len__(self) -> int:
        return len(self.encoding.spans)

    def prefix(self, k: int) -> tuple[EncodedTrace, bool]:
        """Step ``k``'s own encoding, and whether its ids are a prefix of the whole trace's."""
        pk = self.att.encoder.encode_prefix(self.encoding, k)
        n = pk.n_tokens
        return pk, n <= self.encoding.n_tokens and torch.equal(pk.ids, self.encoding.ids[:n])

    def step(self, k: int, target: str = "last") -> StepView:
        """Step ``k``'s view at ``target`` (see :data:`STEP_TARGETS`)."""
        pk, shared = self.prefix(k)
        if shared:
            tr = self.shared
            logits = tr.cap.logits
        else:
            tr = self.att.trace(pk.ids, {**self.meta, "own_forward": True})
            logits = tr.cap.logits
            self.own_forwards += 1
        return StepView(k, target, step_position(pk, k, target, logits), pk, tr, not shared)


def model_checksum(path: Path) -> str:
    """Identity (16 hex digits) of a model directory: config, tokenizer and the sha256 of every weight file's bytes
    (cached beside them, :mod:`crv.digest`): other weights under the same names and sizes get another identity."""
    extra = b"".join((path / n).read_bytes() for n in ("config.json", "tokenizer.json") if (path / n).is_file())
    return content_identity(sorted(path.glob("*.safetensors")), extra)


@dataclass
class Attributor:
    """A model with its tokenizer, prompt format, transcoders and attribution settings."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    transcoders: TranscoderSet
    config: AttributionConfig
    model_id: str = "crv-reasoner"
    model_dir: Path | None = None  # where load() read the model and transcoders (None: built in memory)
    transcoder_dir: Path | None = None
    encoder: TraceEncoder = field(default=None)  # type: ignore[assignment]  # default: plain format

    def __post_init__(self) -> None:
        if self.encoder is None:
            self.encoder = TraceEncoder(self.tokenizer, PlainFormat())

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        transcoder_dir: str | Path | None = None,
        config: AttributionConfig = AttributionConfig(),
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        prompt_format: str | None = None,
        k: int | None = None,
    ) -> "Attributor":
        """Load a local model and its transcoders (defaults: the shipped ones) and check they fit.

        ``dtype``: the model's weights, and the precision the transcoders encode in (as circuit-tracer
        casts its set to the model dtype: in bfloat16 the k-th value's near-ties select as circuit-tracer's
        do); transcoder weights stay in their file dtype and the edges are computed in float32. ``device``: ``cpu`` or ``cuda[:i]``, for the model, the transcoder rows and every engine
        tensor. ``prompt_format``: ``plain`` or ``chat`` (default: the model's own, see :mod:`crv.lm.prompt`).
        ``k``: TopK size for a set whose config lacks it.
        """
        lm = open_model(model_dir, dtype, device, prompt_format)
        # the encoder runs in the model's dtype (circuit-tracer casts the set to it); the rest of the engine in float32
        ts = load_transcoders(transcoder_dir, model=lm.model, device=device, k=k, encode_dtype=dtype)
        return cls(lm.model, lm.tokenizer, ts, config, model_id=f"{lm.path.name}@{model_checksum(lm.path)}",
                   model_dir=lm.path.resolve(), transcoder_dir=ts.path.resolve(), encoder=lm.encoder)

    @property
    def prompt_format(self) -> str:
        return self.encoder.format.name

    @property
    def spec(self) -> "AttributorSpec":
        """What :meth:`load` needs to build this attributor again elsewhere (a Ray worker, another process, a
        classifier's metadata). Only for attributors made by :meth:`load`."""
        if self.model_dir is None or self.transcoder_dir is None:
            raise ValueError("only an attributor made by Attributor.load has a spec")
        return AttributorSpec(model_dir=str(self.model_dir), transcoder_dir=str(self.transcoder_dir),
                              device=str(self.model.device), dtype=str(self.model.dtype).removeprefix("torch."),
                              prompt_format=self.prompt_format, k=self.transcoders.k, attribution=self.config)

    @classmethod
    def from_spec(cls, spec: "AttributorSpec") -> "Attributor":
        """The attributor a spec describes."""
        from crv.lm.load import parse_dtype

        return cls.load(spec.model_dir, spec.transcoder_dir, spec.attribution, dtype=parse_dtype(spec.dtype),
                        device=spec.device, prompt_format=spec.prompt_format, k=spec.k)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of raw ``text`` as attribution reads them (BOS first where the prompt format adds one; a
        special token first in any case, as circuit-tracer does, see :func:`crv.lm.encode.with_lead`)."""
        ids, _ = with_lead(self.tokenizer, *tokenize(self.tokenizer, text, add_bos=self.encoder.format.add_bos))
        return torch.tensor(ids)

    def encode_record(self, record: Record) -> EncodedTrace:
        """A record as the model reads it, with each step's token span."""
        return self.encoder.encode_record(record)

    def trace(self, text: str | torch.Tensor, meta: dict | None = None) -> TraceAttribution:
        """One forward pass over ``text`` (or token ids); graphs of any position can then be read from it."""
        ids = self.encode(text) if isinstance(text, str) else text
        meta = {"model": self.model_id, "transcoders": self.transcoders.checksum(), "prompt_format": self.prompt_format,
                **(meta or {})}
        return TraceAttribution(self.model, self.transcoders, ids, self.config, meta)

    def trace_record(self, record: Record) -> tuple[TraceAttribution, EncodedTrace]:
        """The forward pass of a record, and its encoding (token spans of its steps)."""
        enc = self.encode_record(record)
        return self.trace(enc.ids, {"problem_id": record.problem_id, "task": record.task}), enc

    def steps(self, encoding: EncodedTrace, meta: dict | None = None) -> TraceSteps:
        """The per-step attribution of an encoded trace (one forward, more only where a prefix tokenizes otherwise)."""
        return TraceSteps(self, encoding, meta)

    def record_steps(self, record: Record) -> TraceSteps:
        """:meth:`steps` of a record."""
        return self.steps(self.encode_record(record), {"problem_id": record.problem_id, "task": record.task})

    def iter_step_graphs(self, record: Record, target: str = "last") -> Iterator[Graph]:
        """One attribution graph per step of a record (at the step's last token), lazily.

        The steps share one forward pass and one row cache where their prefixes allow; only the current
        graph is held.
        """
        steps = self.record_steps(record)
        for k in range(len(steps)):
            yield steps.step(k, target).graph

    def step_graphs(self, record: Record, target: str = "last") -> list[Graph]:
        """All step graphs of a record as a list (see :meth:`iter_step_graphs` for long traces)."""
        return list(self.iter_step_graphs(record, target))
