"""Training examples for ``crv finetune``: a problem's canonical chain of thought in the model's chat format.

An example is the rendered prompt (:class:`crv.lm.prompt.ChatFormat` with the short options of
:data:`crv.lm.prompt.SHORT_CHAT`: the same text ``crv generate`` and the graphs read) followed by the
assistant turn: the steps, one per line, ``A: <answer>``, and the token that ends the turn. The loss
mask covers the assistant turn only, end-of-turn token included (so the model learns to stop):

    ids    = tok(prompt) ++ tok(steps + "A: " + answer) ++ [end_of_turn]
    labels = [-100] * len(tok(prompt)) ++ (the rest)

The prompt and the completion are tokenized separately, which is how generation sees them (the model
continues from the prompt's ids). Batches are a pure function of ``(seed, step)``: resuming at step s
reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crv.lm.encode import TraceEncoder, encode_text
from crv.tasks.cot import ANSWER_PREFIX, Problem, make_problem

IGNORE = -100  # the label that takes a position out of the loss (transformers' convention)


@dataclass(frozen=True)
class Example:
    """One training sequence: token ids and labels (``IGNORE`` outside the assistant turn)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]


def assistant_text(problem: Problem) -> str:
    """The assistant turn of a canonical solution: steps one per line, then ``A: <answer>``."""
    return "".join(s + "\n" for s in problem.steps) + f"{ANSWER_PREFIX}{problem.answer}"


def make_example(encoder: TraceEncoder, problem: Problem, end_id: int) -> Example:
    """A problem rendered as prompt + assistant turn + ``end_id``; loss on the assistant turn only."""
    prompt = encode_text(encoder.tokenizer, encoder.format.prompt(problem.task, problem.question),
                         add_bos=encoder.format.add_bos)
    answer = encode_text(encoder.tokenizer, assistant_text(problem), add_bos=False) + [end_id]
    return Example(tuple(prompt + answer), tuple([IGNORE] * len(prompt) + answer))


@dataclass(frozen=True)
class Curriculum:
    """Which problems a run trains on: tasks and operator counts, drawn uniformly."""

    tasks: tuple[str, ...] = ("arith", "bool")
    ns: tuple[int, ...] = (1, 2, 3, 4, 5, 6)

    def problems(self, seed: int, step: int, count: int) -> list[Problem]:
        """The ``count`` problems of training step ``step`` (a pure function of ``seed`` and ``step``)."""
        rng = random.Random(f"finetune:{seed}:{step}")
        out = []
        for i in range(count):
            task, n = rng.choice(self.tasks), rng.choice(self.ns)
            out.append(make_problem(task, n, rng, f"ft-{seed}-{step}-{i}"))  # type: ignore[arg-type]
        return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ([B, T] long)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
