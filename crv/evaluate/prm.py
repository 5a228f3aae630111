"""Process reward model (PRM) baselines: the reasoner itself trained to score each step's text.

Two variants, both reading the step at its last token (the position CRV's graph is taken at):

- :class:`ProcessRewardModel` (``prm_finetuned``): the reasoner's transformer, initialised from
  its weights, with a scalar head on the final hidden state; all of it fine-tuned with a
  class-balanced binary cross-entropy on the labelled steps (PRM800K / Math-Shepherd style).
- :func:`last_token_states` (``prm_frozen``): the reasoner frozen; its hidden state at each
  layer at the step's last token, for a linear head per layer (the layer is chosen on the
  training split by :mod:`crv.evaluate.methods`).

One forward pass per trace scores all of its steps (the model is causal, so a step's score
sees only the question and the steps up to it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from crv.lm.encode import TraceEncoder
from crv.tasks.schema import Record


@dataclass(frozen=True)
class PRMConfig:
    """Fine-tuning settings of :class:`ProcessRewardModel`."""

    epochs: int = 8
    batch_traces: int = 8
    lr: float = 1e-4  # transformer
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    crossfit_folds: int = 3  # out-of-fold PRM scores for the "CRV + PRM" classifier's training split


@dataclass
class EncodedTrace:
    """A trace's token ids and, per step, the token index of its last token and its label."""

    problem_id: str
    ids: list[int]
    positions: list[int]
    faulty: list[int]


def encode_traces(encoder: TraceEncoder, records: Sequence[Record]) -> list[EncodedTrace]:
    """The traces as the model reads them, in its prompt format (records without steps are left out)."""
    out = []
    for r in records:
        if not r.steps:
            continue
        enc = encoder.encode_record(r)
        out.append(EncodedTrace(r.problem_id, enc.ids.tolist(), [enc.last(k) for k in range(len(r.steps))],
                                [int(lab == 0) for lab in r.labels]))
    return out


def step_index(traces: Sequence[EncodedTrace]) -> pd.MultiIndex:
    """(problem_id, step_index) of every step, in trace order."""
    return pd.MultiIndex.from_tuples([(t.problem_id, k) for t in traces for k in range(len(t.positions))],
                                     names=["problem_id", "step_index"])


def _batches(traces: Sequence[EncodedTrace], size: int, pad_id: int):  # type: ignore[no-untyped-def]
    for i in range(0, len(traces), size):
        chunk = traces[i : i + size]
        width = max(len(t.ids) for t in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        rows, cols, y = [], [], []
        for b, t in enumerate(chunk):  # right padding: a causal model's real tokens never see it
            ids[b, : len(t.ids)] = torch.tensor(t.ids)
            mask[b, : len(t.ids)] = 1
            rows += [b] * len(t.positions)
            cols += t.positions
            y += t.faulty
        yield ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(y, dtype=torch.float32)


def _epoch_order(lengths: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
    """A shuffled order in which runs of ``batch`` traces have similar lengths (less padding)."""
    perm = rng.permutation(len(lengths))
    chunks = np.array_split(perm, max(1, len(perm) // (batch * 8)))
    return np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks])


class _StepScorer(nn.Module):
    """A Llama's transformer (final norm included) with a scalar head."""

    def __init__(self, reasoner: PreTrainedModel) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(reasoner.model).float()
        self.head = nn.Linear(reasoner.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        h = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.head(h[rows, cols]).squeeze(-1)


class ProcessRewardModel:
    """``prm_finetuned``: the reasoner fine-tuned with a scalar head to flag faulty steps.

    An estimator: ``fit(records)`` then ``score(records)`` (higher = more likely faulty).
    The reasoner passed in is copied, never modified.
    """

    def __init__(self, reasoner: PreTrainedModel, encoder: TraceEncoder,
                 config: PRMConfig = PRMConfig()) -> None:
        self.reasoner, self.encoder, self.config = reasoner, encoder, config
        self.scorer_: _StepScorer | None = None
        self.losses_: list[float] = []

    def fit(self, records: Sequence[Record], progress: bool = False) -> "ProcessRewardModel":
        """Fine-tune on the labelled steps of ``records`` (both classes must be present)."""
        cfg = self.config
        traces = encode_traces(self.encoder, records)
        y = np.array([f for t in traces for f in t.faulty])
        if y.size == 0 or y.min() == y.max():
            raise ValueError("the PRM needs both faulty and correct steps to train on")
        torch.manual_seed(cfg.seed)
        scorer = _StepScorer(self.reasoner).train()
        opt = torch.optim.AdamW([
            {"params": scorer.backbone.parameters(), "lr": cfg.lr},
            {"params": scorer.head.parameters(), "lr": cfg.head_lr},
        ], weight_decay=cfg.weight_decay)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((y == 0).sum() / (y == 1).sum()))
        rng = np.random.default_rng(cfg.seed)
        lengths = np.array([len(t.ids) for t in traces])
        self.losses_ = []
        bar = tqdm(range(cfg.epochs), desc="prm", unit="epoch", disable=not progress)
        for _ in bar:
            order = _epoch_order(lengths, cfg.batch_traces, rng)
            batches = list(_batches([traces[i] for i in order], cfg.batch_traces, self.encoder.tokenizer.pad_token_id))
            rng.shuffle(batches)  # type: ignore[arg-type]
            total = 0.0
            for ids, mask, rows, cols, target in batches:
                loss = loss_fn(scorer(ids, mask, rows, cols), target)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
                opt.step()
                total += loss.item() * len(target)
            self.losses_.append(total / len(y))
            bar.set_postfix(loss=f"{self.losses_[-1]:.4f}")
        self.scorer_ = scorer.eval()
        return self

    @torch.no_grad()
    def score(self, records: Sequence[Record]) -> pd.Series:
        """Faulty-step scores (logits), indexed by (problem_id, step_index); one forward pass per trace."""
        if self.scorer_ is None:
            raise RuntimeError("fit the PRM before scoring")
        traces = encode_traces(self.encoder, records)
        out = []
        for ids, mask, rows, cols, _ in _batches(traces, 1, self.encoder.tokenizer.pad_token_id):
            out.append(self.scorer_(ids, mask, rows, cols))
        values = torch.cat(out).numpy() if out else np.zeros(0)
        return pd.Series(values, index=step_index(traces), name="prm_finetuned")


@torch.no_grad()
def last_token_states(reasoner: PreTrainedModel, encoder: TraceEncoder,
                      records: Sequence[Record]) -> pd.DataFrame:
    """The reasoner's hidden states at each step's last token: columns ``last{l}.{i}`` (0 = embeddings).

    Indexed by (problem_id, step_index); one forward pass per trace.
    """
    traces = encode_traces(encoder, records)
    blocks = []
    for t in traces:
        hs = reasoner(input_ids=torch.tensor([t.ids], device=reasoner.device), output_hidden_states=True).hidden_states
        blocks.append(torch.cat([h[0, t.positions].float().cpu() for h in hs], dim=-1))
    n_states, d = reasoner.config.num_hidden_layers + 1, reasoner.config.hidden_size
    cols = [f"last{l}.{i}" for l in range(n_states) for i in range(d)]
    data = torch.cat(blocks).numpy() if blocks else np.zeros((0, len(cols)))
    return pd.DataFrame(data, index=step_index(traces), columns=cols)


def state_layers(states: pd.DataFrame) -> dict[str, list[str]]:
    """Columns of :func:`last_token_states` by layer (``last0``, ``last1``, ...)."""
    groups: dict[str, list[str]] = {}
    for c in states.columns:
        groups.setdefault(c.split(".")[0], []).append(c)
    return groups
