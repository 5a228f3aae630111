"""Text to tokens: a trace's token ids and each step's token span, through the tokenizer's offsets.

The rest of crv sees :class:`EncodedTrace` only: ids, and per step a ``[start, end)`` token span.
A token belongs to a step when its characters overlap the step's text, so a step's span is
right for any fast tokenizer (character-level, SentencePiece, byte-level BPE), including
tokens that straddle a step boundary (such a token is the step's, and the next step's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from crv.lm.load import model_notes
from crv.lm.prompt import PromptFormat, RenderedTrace, default_format_name, make_format, render


class UnknownCharacterError(ValueError):
    """Text holds characters the tokenizer can only encode as its unknown token."""

    def __init__(self, chars: list[str]):
        self.chars = chars
        shown = ", ".join(repr(c) for c in chars)
        super().__init__(f"unknown character(s) for the model's vocabulary: {shown}")


@dataclass(frozen=True)
class EncodedTrace:
    """Token ids of a trace, per-token character offsets, and each step's token span."""

    ids: torch.Tensor  # [T] long
    spans: tuple[tuple[int, int], ...]  # per step: token indices [start, end)
    offsets: tuple[tuple[int, int], ...]  # per token: characters [start, end) of ``text`` ((0, 0) for BOS)
    text: str
    step_chars: tuple[tuple[int, int], ...]
    add_bos: bool = True  # the tokenizer's BOS was put first (the text holds no specials of its own)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.shape[0])

    def last(self, k: int) -> int:
        """Token index of step ``k``'s last token (the paper's "after" position)."""
        return self.spans[k][1] - 1

    def token_at(self, char: int) -> int:
        """Index of the token holding character ``char`` of the text."""
        for i, (s, e) in enumerate(self.offsets):
            if s <= char < e:
                return i
        raise IndexError(f"no token holds character {char}")


def tokenize(tokenizer: PreTrainedTokenizerFast, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``; raises :class:`UnknownCharacterError` where the
    tokenizer can only write its unknown token (e.g. a character-level vocabulary)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids and tokenizer.unk_token not in text:
        raise UnknownCharacterError(sorted({text[s:e] for i, (s, e) in zip(ids, offsets) if i == unk}))
    if add_bos and tokenizer.bos_token_id is not None:
        ids, offsets = [tokenizer.bos_token_id] + ids, [(0, 0)] + offsets
    return ids, offsets  # type: ignore[return-value]


def lead_token(tokenizer: PreTrainedTokenizerFast) -> int | None:
    """The special token put before a sequence that does not start with one, as circuit-tracer 0.5.0's
    ``ensure_tokenized`` picks it: the first of BOS, PAD, EOS, then every special id, that is not None
    (nor 0: it filters with ``filter(None, ...)``)."""
    candidates = [tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, *tokenizer.all_special_ids]
    return next(filter(None, candidates), None)


def with_lead(tokenizer: PreTrainedTokenizerFast, ids: list[int], offsets: list[tuple[int, int]]
              ) -> tuple[list[int], list[tuple[int, int]]]:
    """``ids`` as attribution reads them: position 0 is a special token whose features and error are left out
    (circuit-tracer's convention), so a sequence starting with ordinary text gets :func:`lead_token` first,
    exactly as circuit-tracer prepends it (a BOS-less Qwen in the plain format, a chat template starting with text)."""
    if ids and ids[0] in tokenizer.all_special_ids:
        return ids, offsets
    lead = lead_token(tokenizer)
    if lead is None:
        raise ValueError("the tokenizer has no special token to put before the text (circuit-tracer would leave "
                         "the first token out); give it a BOS, PAD or EOS token")
    return [lead] + ids, [(0, 0)] + offsets


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str, add_bos: bool = True) -> list[int]:
    """Token ids of ``text`` (the tokenizer's BOS first if ``add_bos``); see :func:`tokenize`."""
    return tokenize(tokenizer, text, add_bos)[0]


def spans_of(offsets: Sequence[tuple[int, int]], step_chars: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Token span of each character span: the tokens whose characters overlap it."""
    starts = torch.tensor([s for s, _ in offsets])
    ends = torch.tensor([e for _, e in offsets])
    spans = []
    for a, b in step_chars:
        hit = ((starts < b) & (ends > a) & (ends > starts)).nonzero(as_tuple=True)[0]
        if len(hit) == 0:
            raise ValueError(f"no token covers characters {a}..{b} (an empty step?)")
        spans.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(spans)


@dataclass(frozen=True)
class TraceEncoder:
    """A tokenizer and a prompt format: questions and steps in, :class:`EncodedTrace` out."""

    tokenizer: PreTrainedTokenizerFast
    format: PromptFormat

    def render(self, task: str, question: str, steps: Sequence[str]) -> RenderedTrace:
        return render(self.format, task, question, steps)

    def encode_rendered(self, r: RenderedTrace) -> EncodedTrace:
        """A rendered trace as attribution reads it (:func:`with_lead`: a special token at position 0)."""
        ids, offsets = with_lead(self.tokenizer, *tokenize(self.tokenizer, r.text, add_bos=r.add_bos))
        return EncodedTrace(torch.tensor(ids, dtype=torch.long), spans_of(offsets, r.step_chars), tuple(offsets),
                            r.text, r.step_chars, r.add_bos)

    def encode_prefix(self, trace: EncodedTrace, k: int) -> EncodedTrace:
        """Step ``k``'s prefix as the paper tokenizes it: ``tok(text[:end_k])`` on its own (the text up to the
        end of step ``k``, its newline excluded), with the spans of steps ``0..k``.

        On tokenizers whose pre-tokenizer joins punctuation with the following newline (Llama-3, Qwen2:
        ``?[^\\s\\p{L}\\p{N}]+[\\r\\n]*``) the whole trace's ids end step ``k`` with e.g. ``").\\n"`` where the
        prefix ends with ``")."``: the graph must be computed on the prefix's own ids.
        """
        end = trace.step_chars[k][1]
        return self.encode_rendered(RenderedTrace(trace.text[:end], trace.step_chars[: k + 1], trace.add_bos))

    def encode(self, task: str, question: str, steps: Sequence[str]) -> EncodedTrace:
        """The trace as the model reads it, with every step's token span (a step may span several lines)."""
        for i, s in enumerate(steps):
            if not s.strip():
                raise ValueError(f"step {i} is empty")
        return self.encode_rendered(self.render(task, question, steps))

    def encode_record(self, record) -> EncodedTrace:  # type: ignore[no-untyped-def]
        """:meth:`encode` of a :class:`crv.tasks.schema.Record`; a record that carries its own ``text`` (e.g. the CRV
        release's chat-formatted texts) is read exactly as given, special tokens written as text included."""
        if record.text is not None:
            chars = tuple((a, b) for a, b in record.step_chars)
            return self.encode_rendered(RenderedTrace(record.text, chars, add_bos=False))
        return self.encode(record.task, record.question, record.steps)

    def prefix(self, task: str, question: str, steps: Sequence[str]) -> list[int]:
        """Ids the model continues from to write the step after ``steps`` (prompt + steps, each + newline)."""
        r = self.render(task, question, steps)
        return encode_text(self.tokenizer, r.text, add_bos=r.add_bos)


def trace_encoder(tokenizer: PreTrainedTokenizerFast, model_dir=None, prompt_format: str | None = None) -> TraceEncoder:  # type: ignore[no-untyped-def]
    """A model's encoder: its tokenizer and ``prompt_format`` (default: the model's own, see :mod:`crv.lm.prompt`)."""
    notes = model_notes(model_dir) if model_dir is not None else {}
    name = prompt_format or default_format_name(tokenizer, notes)
    return TraceEncoder(tokenizer, make_format(name, tokenizer, notes.get("chat") if name == "chat" else None))
