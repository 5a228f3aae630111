"""MLP inputs and outputs of a Llama, and a bounded-memory stream of them over CoT text."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from crv.reasoner.tokenizer import encode_text
from crv.tasks.cot import TASKS, GeneratorConfig, make_problem


def mlp_modules(model: LlamaForCausalLM) -> list[torch.nn.Module]:
    """The MLP block of every decoder layer, in order."""
    return [layer.mlp for layer in model.model.layers]


@contextmanager
def capture_mlp_io(model: LlamaForCausalLM) -> Iterator[tuple[list, list]]:
    """Record each layer's MLP input (post-attention RMSNorm output) and MLP output."""
    inputs: list = [None] * model.config.num_hidden_layers
    outputs: list = [None] * model.config.num_hidden_layers
    handles = []
    for i, mlp in enumerate(mlp_modules(model)):
        def hook(module, args, out, i=i):  # type: ignore[no-untyped-def]
            inputs[i] = args[0].detach()
            outputs[i] = out.detach()
        handles.append(mlp.register_forward_hook(hook))
    try:
        yield inputs, outputs
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def mlp_io(model: LlamaForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n_layers, batch, seq, d_model]`` MLP inputs and outputs for right-padded ids."""
    with capture_mlp_io(model) as (inputs, outputs):
        model(input_ids=ids)
    return torch.stack(inputs), torch.stack(outputs)


def cot_texts(rng: random.Random, count: int, n_max: int = 10, config: GeneratorConfig = GeneratorConfig()) -> list[str]:
    """Canonical CoT texts (prompt + solution) of all tasks, n uniform in 1..n_max."""
    texts = []
    for i in range(count):
        task = rng.choice(TASKS)
        p = make_problem(task, rng.randint(1, n_max), rng, f"act-{i}", config)
        texts.append(p.prompt + p.completion)
    return texts


def encode_batch(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (BOS first) and a mask of real, non-BOS tokens."""
    encoded = [encode_text(tokenizer, t) for t in texts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, 1 : len(e)] = True
    return ids, mask


class ActivationStream:
    """Endless shuffled minibatches of (MLP input, MLP output) token activations.

    Sequences are generated and run through the model a buffer at a time, so
    memory stays bounded by ``buffer_tokens`` whatever the training length.
    Yields ``x, y`` of shape ``[n_layers, batch_tokens, d_model]``.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: PreTrainedTokenizerFast,
        batch_tokens: int = 4096,
        buffer_tokens: int = 65_536,
        seqs_per_forward: int = 32,
        seed: int = 0,
    ):
        self.model, self.tok = model, tokenizer
        self.batch_tokens, self.buffer_tokens, self.seqs = batch_tokens, buffer_tokens, seqs_per_forward
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._pos = 0

    def _refill(self) -> None:
        xs, ys, total = [], [], 0
        while total < self.buffer_tokens:
            ids, mask = encode_batch(self.tok, cot_texts(self.rng, self.seqs))
            x, y = mlp_io(self.model, ids)
            xs.append(x[:, mask])
            ys.append(y[:, mask])
            total += int(mask.sum())
        x, y = torch.cat(xs, 1), torch.cat(ys, 1)
        perm = torch.randperm(x.shape[1], generator=self.gen)
        self._x, self._y, self._pos = x[:, perm], y[:, perm], 0

    def __iter__(self) -> "ActivationStream":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._x is None or self._pos + self.batch_tokens > self._x.shape[1]:
            self._refill()
        assert self._x is not None and self._y is not None
        sl = slice(self._pos, self._pos + self.batch_tokens)
        self._pos += self.batch_tokens
        return self._x[:, sl], self._y[:, sl]
