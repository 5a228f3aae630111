"""MLP inputs and outputs of a model, and a bounded-memory stream of them over CoT traces in its prompt format."""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import PreTrainedModel

from crv.lm.encode import TraceEncoder
from crv.lm.prompt import ANSWER_PREFIX
from crv.lm.sites import hook_sites
from crv.tasks.cot import TASKS, GeneratorConfig, make_problem


def mlp_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The MLP block of every decoder layer, in order."""
    sites = hook_sites(model)
    return [sites.mlp(i) for i in range(sites.n_layers)]


@contextmanager
def capture_mlp_io(model: PreTrainedModel) -> Iterator[tuple[list, list]]:
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
def mlp_io(model: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n_layers, batch, seq, d_model]`` MLP inputs and outputs for right-padded ids."""
    with capture_mlp_io(model) as (inputs, outputs):
        model(input_ids=ids)
    return torch.stack(inputs), torch.stack(outputs)


def cot_examples(encoder: TraceEncoder, rng: random.Random, count: int, n_max: int = 10,
                 config: GeneratorConfig = GeneratorConfig(), task: str | None = None) -> list[tuple[list[int], int]]:
    """Canonical CoT traces as ``(token ids, index of the first assistant token)``: prompt, steps and answer line,
    n uniform in 1..n_max, of ``task`` (default: each sequence's task drawn at random)."""
    out = []
    for i in range(count):
        task_i = task or rng.choice(TASKS)
        p = make_problem(task_i, rng.randint(1, n_max), rng, f"act-{i}", config)  # type: ignore[arg-type]
        out.append((encoder.prefix(p.task, p.question, [*p.steps, ANSWER_PREFIX + p.answer]),
                    len(encoder.prefix(p.task, p.question, []))))
    return out


def cot_sequences(encoder: TraceEncoder, rng: random.Random, count: int, n_max: int = 10,
                  config: GeneratorConfig = GeneratorConfig(), task: str | None = None) -> list[list[int]]:
    """Token ids of :func:`cot_examples`."""
    return [ids for ids, _ in cot_examples(encoder, rng, count, n_max, config, task)]


def shared_prefix(seqs: list[list[int]]) -> int:
    """Length of the token prefix every sequence starts with."""
    n = min(len(e) for e in seqs)
    for a in seqs[1:]:
        n = next((i for i, (x, y) in enumerate(zip(seqs[0][:n], a)) if x != y), n)
    return n


#: a prefix at least this long that every sequence of a batch shares (a chat template's system turn, worked
#: example and instruction) counts once; shorter ones (crv's plain ``<s>Q: ``) count in every sequence
MIN_SHARED_PREFIX = 8


def encode_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and a mask of the tokens that count: not position 0, and a long shared prefix
    (:data:`MIN_SHARED_PREFIX`) only once, in the first sequence."""
    width = max(len(e) for e in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    shared = shared_prefix(seqs)
    skip = shared if shared >= MIN_SHARED_PREFIX else 1
    for i, e in enumerate(seqs):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, 1 if i == 0 else skip : len(e)] = True
    return ids, mask


@torch.no_grad()
def counted_mlp_io(model: PreTrainedModel, seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n_layers, n_tokens, d_model]`` MLP inputs and outputs of the tokens that count (:func:`encode_batch`).

    A prefix every sequence shares (a chat template's system turn, worked example and instruction) is
    run once and its key/value cache reused by the whole batch, so its cost is paid once, not per sequence.
    """
    shared = min(shared_prefix(seqs), min(len(e) for e in seqs) - 1)
    if shared < MIN_SHARED_PREFIX or len(seqs) == 1:
        ids, mask = encode_batch(seqs, pad_id)
        x, y = mlp_io(model, ids)
        return x[:, mask], y[:, mask]
    device = next(model.parameters()).device
    with capture_mlp_io(model) as (inputs, outputs):
        cache = model(input_ids=torch.tensor([seqs[0][:shared]], device=device), use_cache=True).past_key_values
    x0, y0 = torch.stack(inputs)[:, 0, 1:], torch.stack(outputs)[:, 0, 1:]  # the shared prefix, once (not position 0)
    cache.batch_repeat_interleave(len(seqs))
    rest = [e[shared:] for e in seqs]
    width = max(len(e) for e in rest)
    ids = torch.full((len(rest), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rest), width), dtype=torch.bool)
    for i, e in enumerate(rest):  # right padding: a real token never attends to the padding after it
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = True
    attention = torch.cat([torch.ones(len(rest), shared, dtype=torch.long), mask.long()], 1)
    with capture_mlp_io(model) as (inputs, outputs):
        model(input_ids=ids.to(device), attention_mask=attention.to(device), past_key_values=cache, use_cache=True)
    x, y = torch.stack(inputs)[:, mask.to(device)], torch.stack(outputs)[:, mask.to(device)]
    return torch.cat([x0, x], 1), torch.cat([y0, y], 1)


class ActivationStream:
    """Endless shuffled minibatches of (MLP input, MLP output) token activations.

    Sequences are generated and run through the model a buffer at a time, so
    memory stays bounded by ``buffer_tokens`` whatever the training length.
    Yields ``x, y`` of shape ``[n_layers, batch_tokens, d_model]``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        encoder: TraceEncoder,
        batch_tokens: int = 4096,
        buffer_tokens: int = 65_536,
        seqs_per_forward: int = 32,
        seed: int = 0,
    ):
        self.model, self.encoder = model, encoder
        self.batch_tokens, self.buffer_tokens, self.seqs = batch_tokens, buffer_tokens, seqs_per_forward
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._pos = 0

    def _refill(self) -> None:
        xs, ys, total = [], [], 0
        while total < self.buffer_tokens:
            task = self.rng.choice(TASKS)  # one task per forward batch: its prompt is shared and run once
            seqs = cot_sequences(self.encoder, self.rng, self.seqs, task=task)
            x, y = counted_mlp_io(self.model, seqs, self.encoder.tokenizer.pad_token_id)
            xs.append(x)
            ys.append(y)
            total += x.shape[1]
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


class ActivationPool:
    """A fixed pool of ``pool_tokens`` token activations, harvested once, drawn from in shuffled epochs.

    Running a real model is the cost of transcoder training on a CPU (SmolLM2-135M: ~240 tokens/s on 2 cores,
    against ~1.7 s for a 2,048-token training step of all 30 layers), so a pool reused over epochs trains
    for many more steps per hour than a stream of fresh traces. The pool is a pure function of ``seed``
    (traces drawn as :class:`ActivationStream` draws them) and the batch of step ``s`` a pure function of
    ``(seed, s)``, so a resumed run rebuilds the pool and continues with exactly the batches it would have
    seen. Stored in bfloat16 (``[n_layers, pool_tokens, d_model]`` twice: 6.6 GB for SmolLM2 at 100k tokens);
    batches come back in float32.
    """

    def __init__(self, model: PreTrainedModel, encoder: TraceEncoder, batch_tokens: int, pool_tokens: int,
                 seed: int = 0, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        if pool_tokens < batch_tokens:
            raise ValueError(f"pool_tokens ({pool_tokens}) must hold at least one batch ({batch_tokens})")
        rng, per_forward = random.Random(seed), 32
        n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
        self.x = torch.empty(n_layers, pool_tokens, d, dtype=torch.bfloat16)
        self.y = torch.empty_like(self.x)
        filled = 0
        bar = tqdm(total=pool_tokens, desc="activation pool", unit="tok", disable=not progress)
        while filled < pool_tokens:
            task = rng.choice(TASKS)  # one task per forward batch: its prompt is shared and run once
            x, y = counted_mlp_io(model, cot_sequences(encoder, rng, per_forward, task=task), encoder.tokenizer.pad_token_id)
            take = min(x.shape[1], pool_tokens - filled)
            self.x[:, filled : filled + take] = x[:, :take].to(torch.bfloat16)
            self.y[:, filled : filled + take] = y[:, :take].to(torch.bfloat16)
            filled += take
            bar.update(take)
        bar.close()
        self.batch_tokens, self.seed = batch_tokens, seed
        self.per_epoch = pool_tokens // batch_tokens
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x, y`` of shape ``[n_layers, batch_tokens, d_model]`` (float32) for training step ``step``."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.x.shape[1], generator=gen)
        sel = self._perm[i * self.batch_tokens : (i + 1) * self.batch_tokens]
        return self.x[:, sel].float(), self.y[:, sel].float()
