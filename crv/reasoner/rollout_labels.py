"""Step labels without a checker, after Math-Shepherd: let the model finish the trace from each step.

For step k of a trace, N continuations are sampled from the text through step k (the model under
test, the record's prompt format) and their final answers (the ``A:`` line) compared with the
reference answer. The *soft* estimate of step k is the fraction that reach it; the *hard* label is
1 (correct) if any does. A trace's rollout labels are the hard labels, truncated after the first 0
(strict truncation, as everywhere in crv).

This labels what the model can still recover from, not what a checker would call an error: a wrong
step the model silently repairs later counts as correct, and a right step after which the model
cannot finish counts as faulty. ``benchmarks/labels.py`` measures the agreement with the exact
labels of crv's arithmetic and boolean tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tqdm.auto import tqdm
from transformers import PreTrainedModel

from crv.lm.encode import TraceEncoder, encode_text
from crv.reasoner.generate import complete
from crv.tasks.label import split_output
from crv.tasks.schema import Record, truncate


@dataclass(frozen=True)
class RolloutConfig:
    """How step labels are estimated."""

    rollouts: int = 8  # continuations per step
    temperature: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class RolloutLabels:
    """A record relabelled by rollouts, with the per-step estimates behind it."""

    record: Record  # labels = hard estimates, truncated after the first faulty step
    soft: tuple[float, ...]  # per step of the input record: share of continuations that reached the answer
    hard: tuple[int, ...]


def answers_match(answer: str | None, reference: str) -> bool:
    """Same final answer: equal as numbers when both are numbers, else equal as stripped, case-folded text."""
    if answer is None:
        return False
    a, b = answer.strip().rstrip("."), reference.strip().rstrip(".")
    try:
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return a.casefold() == b.casefold()


def _prefix(encoder: TraceEncoder, record: Record, k: int) -> list[int]:
    """Token ids through step k and its newline: where a continuation starts."""
    if record.text is not None:
        return encode_text(encoder.tokenizer, record.text[: record.step_chars[k][1]] + "\n", add_bos=False)  # type: ignore[index]
    return encoder.prefix(record.task, record.question, record.steps[: k + 1])


def label_with_rollouts(
    model: PreTrainedModel,
    encoder: TraceEncoder,
    records: Sequence[Record],
    config: RolloutConfig = RolloutConfig(),
    progress: bool = True,
) -> list[RolloutLabels]:
    """Rollout labels of every step of every record (see the module docstring)."""
    if config.rollouts < 1:
        raise ValueError("rollouts must be at least 1")
    jobs = [(i, k) for i, r in enumerate(records) for k in range(len(r.steps))]
    prompts = [(i, k, _prefix(encoder, records[i], k)) for i, k in jobs]
    prompts.sort(key=lambda x: len(x[2]))  # similar lengths per batch: less padding
    hits: dict[tuple[int, int], int] = {}
    per_batch = max(1, config.batch_size // config.rollouts)
    bar = tqdm(total=len(prompts), desc="rollouts", unit="step", disable=not progress)
    for b, start in enumerate(range(0, len(prompts), per_batch)):
        chunk = prompts[start : start + per_batch]
        batch = [p for _, _, p in chunk for _ in range(config.rollouts)]
        texts = complete(model, encoder, batch, config.max_new_tokens, config.temperature, config.seed + b)
        for j, (i, k, _) in enumerate(chunk):
            outs = texts[j * config.rollouts : (j + 1) * config.rollouts]
            hits[(i, k)] = sum(answers_match(split_output(t)[1], records[i].answer) for t in outs)
        bar.update(len(chunk))
    bar.close()
    out = []
    for i, r in enumerate(records):
        soft = tuple(hits[(i, k)] / config.rollouts for k in range(len(r.steps)))
        hard = tuple(int(s > 0) for s in soft)
        steps, labels = truncate(list(r.steps), list(hard))
        spans = None if r.step_chars is None else r.step_chars[: len(steps)]
        text = None if r.text is None else r.text[: spans[-1][1]]  # type: ignore[index]
        out.append(RolloutLabels(replace(r, steps=steps, labels=labels, text=text, step_chars=spans), soft, hard))
    return out
