"""Regenerating a trace from one of its steps, with or without feature edits, and relabelling it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from crv.interventions.patch import MODES, EditWindow, FeatureEdit, feature_patch
from crv.lm.encode import TraceEncoder
from crv.lm.load import stop_token_ids
from crv.tasks.cot import Problem
from crv.tasks.label import label_output
from crv.tasks.schema import Record
from crv.transcoders.io import TranscoderSet

#: where edits apply: the regenerated step's tokens only, or every position from the step on
#: (or, passing an int, one absolute token position inside the step, e.g. its suspect position)
POSITIONS = ("step", "from_step")


@dataclass
class Regeneration:
    """The outcome of regenerating a trace from ``step_index``."""

    step_index: int
    edits: list[FeatureEdit]
    positions: str
    continuation: str  # the text generated from the start of the step
    record: Record  # the whole trace relabelled (prefix + continuation)
    step_correct: bool  # the regenerated step is labelled correct
    solved: bool  # the final answer is right
    new_step: str | None = field(default=None)  # the regenerated step (None: the model stopped first)


def problem_of(record: Record) -> Problem:
    """The synthetic problem a record came from (what the labeller needs).

    Records that carry their own ``text`` (e.g. the CRV release's Llama-3 chat texts, "Step 1: ... Now the
    original expression becomes ...") are refused: crv would re-render them in its own prompt format and
    grammar, so edits would land on other token positions than the graph's and its checker would judge a
    format the model was never asked to write; and they carry no answer to call a fix "solved"."""
    if record.text is not None:
        raise ValueError(f"{record.problem_id}: interventions regenerate in crv's own prompt format and step grammar, "
                         "and this record carries its own text (an imported release record) with no answer; edit and "
                         "regenerate it with the model that wrote it, or use records crv generated (crv generate)")
    if record.task not in ("arith", "bool") or record.n is None:
        raise ValueError(f"interventions need a synthetic task with a labeller (arith, bool), not {record.task!r}")
    return Problem(record.problem_id, record.task, record.n, record.question, record.answer)  # type: ignore[arg-type]


def check_step_index(record: Record, step_index: int) -> None:
    if not record.steps:
        raise ValueError(f"{record.problem_id}: the trace has no steps")
    if not 0 <= step_index < len(record.steps):
        raise ValueError(f"{record.problem_id}: step index {step_index} out of range 0..{len(record.steps) - 1}")


@torch.no_grad()
def greedy_continue(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, ids: list[int], max_new_tokens: int,
                    window: EditWindow | None = None, stop_edits_at_newline: bool = False) -> str:
    """Greedy continuation of token ``ids`` (KV cache, batch 1) up to EOS / end of turn; advances ``window.offset``."""
    limit = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    stops = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    x, past, out = torch.tensor([ids], device=device), None, []
    offset = 0
    for _ in range(max(0, limit)):
        if window is not None:
            window.offset = offset
        o = model(input_ids=x, past_key_values=past, use_cache=True)
        offset += x.shape[1]
        past = o.past_key_values
        tok = int(o.logits[0, -1].argmax())
        if tok in stops:
            break
        out.append(tok)
        if stop_edits_at_newline and window is not None and window.stop is None and "\n" in tokenizer.decode([tok]):
            window.stop = offset  # the step ends: its newline (fed next, at position offset) and later are not edited
        x = torch.tensor([[tok]], device=device)
    return tokenizer.decode(out, skip_special_tokens=True)


def regenerate(model: PreTrainedModel, encoder: TraceEncoder, transcoders: TranscoderSet, record: Record,
               step_index: int, edits: Sequence[FeatureEdit] = (), positions: str | int = "step",
               max_new_tokens: int | None = None) -> Regeneration:
    """Regenerate ``record`` from the start of step ``step_index`` with ``edits`` applied, then relabel it.

    ``positions="step"`` edits the positions that predict the step's tokens and its newline,
    ``"from_step"`` every position from the step on, an int that one token position (it must
    predict a character of the step). With no edits this is the unedited control.
    """
    check_step_index(record, step_index)
    problem = problem_of(record)
    prefix = encoder.prefix(record.task, record.question, record.steps[:step_index])
    if max_new_tokens is None:
        max_new_tokens = 2 * len(encoder.tokenizer(record.raw_output or "\n".join(record.steps))["input_ids"]) + 64
    first = len(prefix) - 1  # the prefix's last token predicts the step's first token
    if isinstance(positions, int):
        last = encoder.encode_record(record).last(step_index)  # it predicts the step's newline
        if not first <= positions <= last:
            raise ValueError(f"position {positions} is not inside step {step_index} (token positions {first}..{last})")
        window = EditWindow(start=positions, stop=positions + 1)
    elif positions in POSITIONS:
        window = EditWindow(start=first)
    else:
        raise ValueError(f"unknown positions {positions!r}; choose from {', '.join(POSITIONS)} or a token position")
    if edits:
        with feature_patch(model, transcoders, list(edits), window):
            continuation = greedy_continue(model, encoder.tokenizer, prefix, max_new_tokens, window, positions == "step")
    else:
        continuation = greedy_continue(model, encoder.tokenizer, prefix, max_new_tokens)
    earlier = "".join(s + "\n" for s in record.steps[:step_index])
    relabelled = label_output(problem, earlier + continuation, source=f"{record.source}+intervention")
    new_steps = continuation.split("\n")
    new_step = new_steps[0] if continuation else None
    step_correct = len(relabelled.labels) > step_index and relabelled.labels[step_index] == 1
    return Regeneration(step_index, list(edits), positions, continuation, relabelled, step_correct, relabelled.solved, new_step)


def intervene(model: PreTrainedModel, encoder: TraceEncoder, transcoders: TranscoderSet, record: Record,
              step_index: int, features: Sequence[tuple[int, int]], mode: str = "clamp", value: float = 0.0,
              positions: str | int = "step") -> Regeneration:
    """The single-case API: edit ``features`` ((layer, feature) pairs) with ``mode`` and regenerate from the step."""
    if mode not in MODES:
        raise ValueError(f"unknown intervention mode {mode!r}; choose from {', '.join(MODES)}")
    edits = [FeatureEdit(int(l), int(f), mode, value) for l, f in features]
    if not edits:
        raise ValueError("no features to edit (use regenerate() for the unedited control)")
    return regenerate(model, encoder, transcoders, record, step_index, edits, positions)
