"""The public entry point: model + transcoders + settings -> one graph per CoT step.

    from crv.attribution.attributor import Attributor
    att = Attributor.load()                           # shipped reasoner + transcoders
    att = Attributor.load("path/to/llama", "path/to/transcoders")   # any local Llama + circuit-tracer-layout set
    graphs = att.step_graphs(record)                  # one Graph per step of a labelled record

A step's graph is computed at the step's last token (the paper's "after"
setting), over the whole context: question and all steps so far. All steps of a trace share one forward pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from crv.attribution.engine import AttributionConfig, TraceAttribution
from crv.attribution.graph import Graph
from crv.reasoner.model import DEFAULT_REASONER_DIR, load_reasoner
from crv.reasoner.tokenizer import encode_text
from crv.tasks.cot import format_prompt
from crv.tasks.schema import Record
from crv.transcoders.io import TranscoderSet, load_transcoders


def trace_text(record: Record) -> tuple[str, list[int]]:
    """The trace as the model saw it, and the character offset of the newline ending each step."""
    return compose_trace(record.question, record.steps)


def compose_trace(question: str, steps: Sequence[str]) -> tuple[str, list[int]]:
    """The text of a question and its steps (one per line), and the offset of each step's newline."""
    text = format_prompt(question)
    ends = []
    for step in steps:
        text += step
        ends.append(len(text))
        text += "\n"
    return text, ends


def step_position(end: int) -> int:
    """Token index of a step's last character, given the character offset ``end`` of its newline.

    The paper's "after" setting: the graph of a step is the one for the next-token prediction
    at the step's last token (token index = character offset + 1, as BOS comes first).
    """
    return end


#: where a step's graph is computed: "last" = the step's last token (the paper's "after");
#: "result" = the step's "=" (the model is about to write the result; "last" if there is none);
#: "uncertain" = the position whose prediction of the step's next character was least confident
STEP_TARGETS = ("last", "result", "uncertain")


def step_target(step: str, end: int, target: str = "last", logits: torch.Tensor | None = None) -> int:
    """Token index at which the graph of ``step`` is computed (``end``: character offset of its newline).

    ``logits [T, V]`` of the trace are needed for ``"uncertain"``.
    """
    if target not in STEP_TARGETS:
        raise ValueError(f"unknown step target {target!r}; choose from {STEP_TARGETS}")
    start = end - len(step)  # character offset of the step's first character = token index predicting it
    if target == "result" and "=" in step:
        return start + step.index("=") + 1
    if target == "uncertain":
        if logits is None:
            raise ValueError("the 'uncertain' step target needs the trace's logits")
        confidence = torch.softmax(logits[start:end].float(), -1).max(-1).values
        return start + int(confidence.argmin())
    return step_position(end)


def model_checksum(path: Path) -> str:
    """SHA-256 (16 hex digits) of a model directory's weight files."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Attributor:
    """A model with its transcoders and attribution settings."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    transcoders: TranscoderSet
    config: AttributionConfig
    model_id: str = "crv-reasoner"
    model_dir: Path | None = None  # where load() read the model and transcoders (None: built in memory)
    transcoder_dir: Path | None = None

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        transcoder_dir: str | Path | None = None,
        config: AttributionConfig = AttributionConfig(),
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> "Attributor":
        """Load a local Llama and its transcoders (defaults: the shipped ones) and check they fit."""
        model_dir = Path(model_dir) if model_dir is not None else DEFAULT_REASONER_DIR
        model, tok = load_reasoner(model_dir, dtype=dtype, device=device)
        ts = load_transcoders(transcoder_dir, model=model, dtype=dtype, device=device)
        return cls(model, tok, ts, config, model_id=f"{model_dir.name}@{model_checksum(model_dir)}",
                   model_dir=model_dir.resolve(), transcoder_dir=ts.path.resolve())

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(encode_text(self.tokenizer, text))

    def trace(self, text: str, meta: dict | None = None) -> TraceAttribution:
        """One forward pass over ``text``; graphs of any position can then be read from it."""
        meta = {"model": self.model_id, "transcoders": self.transcoders.checksum(), **(meta or {})}
        return TraceAttribution(self.model, self.transcoders, self.encode(text), self.config, meta)

    def iter_step_graphs(self, record: Record, target: str = "last") -> Iterator[Graph]:
        """One attribution graph per step of a record (at the step's last token), lazily.

        All steps share one forward pass and one row cache; only the current graph is held.
        """
        text, ends = trace_text(record)
        tr = self.trace(text, {"problem_id": record.problem_id, "task": record.task})
        for i, end in enumerate(ends):
            yield tr.graph(pos=step_target(record.steps[i], end, target, tr.cap.logits), step_index=i)

    def step_graphs(self, record: Record, target: str = "last") -> list[Graph]:
        """All step graphs of a record as a list (see :meth:`iter_step_graphs` for long traces)."""
        return list(self.iter_step_graphs(record, target))
