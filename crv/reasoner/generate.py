"""Batched greedy CoT generation with the reasoner, labelled into records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from crv.lm.encode import TraceEncoder, encode_text
from crv.lm.load import stop_token_ids
from crv.tasks.cot import Problem
from crv.tasks.label import label_output
from crv.tasks.schema import Record


@dataclass(frozen=True)
class GenerationConfig:
    """How completions are decoded (greedy: errors are the model's own)."""

    batch_size: int = 64
    length_factor: float = 1.5  # max new tokens = factor * longest reference completion + slack
    slack: int = 24


@torch.no_grad()
def complete(
    model: PreTrainedModel,
    encoder: TraceEncoder,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    generator_seed: int | None = None,
) -> list[str]:
    """Completions of a batch of prompts (token ids, left-padded), decoded up to EOS / end of turn.

    Greedy by default; ``temperature > 0`` samples (plain softmax sampling, reproducible with ``generator_seed``).
    """
    tokenizer, encoded = encoder.tokenizer, list(prompts)
    stops = stop_token_ids(model, tokenizer)
    width = max(len(e) for e in encoded)
    limit = model.config.max_position_embeddings - width
    if limit <= 0:
        raise ValueError(f"prompt of {width} tokens does not fit the model's context of {model.config.max_position_embeddings}")
    pad = tokenizer.pad_token_id
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    if temperature > 0 and generator_seed is not None:
        torch.manual_seed(generator_seed)  # transformers samples from torch's global generator
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=min(max_new_tokens, limit),
        eos_token_id=sorted(stops),
        pad_token_id=pad,
        **sampling,
    )
    new = out[:, width:].cpu()
    texts = []
    for row in new.tolist():
        end = next((i for i, t in enumerate(row) if t in stops), len(row))
        row = row[:end]
        texts.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=True))
    return texts


def token_budget(encoder: TraceEncoder, problems: Sequence[Problem], config: GenerationConfig = GenerationConfig()) -> int:
    """Most new tokens a batch may write, counted in ``encoder``'s tokens:
    ``max(factor * |reference completion| + slack, (n + 1) * (|question| + slack))`` over the batch, enough for
    the reference solution or for n full rewrites of the question. Counting characters instead (the same on a
    character-level model) lets one looping row of a BPE model hold its whole batch for 3-5x as many steps."""
    def length(text: str) -> int:
        return len(encode_text(encoder.tokenizer, text, add_bos=False))

    return max(max(int(config.length_factor * length(p.completion)) + config.slack,
                   (p.n + 1) * (length(p.question) + config.slack)) for p in problems)


def generate_records(
    model: PreTrainedModel,
    encoder: TraceEncoder,
    problems: Sequence[Problem],
    config: GenerationConfig = GenerationConfig(),
    progress: bool = True,
) -> list[Record]:
    """Let the model solve each problem (prompted in ``encoder``'s format) and label its steps; input order kept."""
    order = sorted(range(len(problems)), key=lambda i: (problems[i].task, len(problems[i].prompt + problems[i].completion)))
    results: dict[int, Record] = {}
    bar = tqdm(total=len(problems), desc="generate", unit="trace", disable=not progress)
    for start in range(0, len(order), config.batch_size):
        idx = order[start : start + config.batch_size]
        batch = [problems[i] for i in idx]
        budget = token_budget(encoder, batch, config)
        for i, p, text in zip(idx, batch, complete(model, encoder, [encoder.prefix(p.task, p.question, []) for p in batch], budget)):
            results[i] = label_output(p, text)
        bar.update(len(idx))
    bar.close()
    return [results[i] for i in range(len(problems))]
