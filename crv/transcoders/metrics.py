"""How well a transcoder set stands in for the MLPs: per-layer FVU / L0 / dead features,
and the whole replacement model's next-token agreement and KL with the original."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from crv.transcoders.activations import encode_batch, mlp_io, mlp_modules
from crv.transcoders.io import TranscoderSet


@dataclass(frozen=True)
class LayerQuality:
    layer: int
    fvu: float  # fraction of the MLP output's variance the transcoder leaves unexplained
    l0: float  # mean number of active features per token
    dead_fraction: float  # features that never fired on the evaluation tokens


@dataclass(frozen=True)
class ReplacementQuality:
    argmax_agreement: float  # share of tokens where both models predict the same next token
    mean_kl: float  # mean KL(original || replacement) of the next-token distributions, in nats


@contextmanager
def replaced_mlps(model: PreTrainedModel, transcoders: TranscoderSet) -> Iterator[None]:
    """Temporarily replace every MLP's output with its transcoder's reconstruction, except at position 0.

    Position 0 is the lead token (BOS or a chat template's first special token): circuit-tracer gives it no
    features, so in the graphs its MLP outputs are error nodes whole, and transcoders are trained without it.
    On real models it is the attention sink, with MLP outputs 10-30x the others' (SmolLM2: norm ~1,000 at
    layer 27): reconstructed there, every later position reads a broken sink (next-token agreement 0.01)."""

    def hook(module, args, out, tc):  # type: ignore[no-untyped-def]
        new = tc(args[0]).to(out.dtype)
        new[:, :1] = out[:, :1]
        return new

    handles = [mlp.register_forward_hook(lambda m, a, o, tc=transcoders[i]: hook(m, a, o, tc))
               for i, mlp in enumerate(mlp_modules(model))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer_quality(
    model: PreTrainedModel, transcoders: TranscoderSet, seqs: Sequence[list[int]], pad_id: int, batch: int = 32
) -> list[LayerQuality]:
    """FVU, L0 and dead fraction per layer over the tokens of ``seqs`` that count (:func:`encode_batch`)."""
    n_layers = len(transcoders)
    err = torch.zeros(n_layers, dtype=torch.float64)
    sq = torch.zeros(n_layers, dtype=torch.float64)
    total = torch.zeros(n_layers, transcoders.shape.d_model, dtype=torch.float64)
    l0 = torch.zeros(n_layers, dtype=torch.float64)
    fired = torch.zeros(n_layers, transcoders.shape.d_transcoder, dtype=torch.bool)
    count = 0
    for start in range(0, len(seqs), batch):
        ids, mask = encode_batch(list(seqs[start : start + batch]), pad_id)
        x, y = mlp_io(model, ids)
        x, y = x[:, mask], y[:, mask]
        count += x.shape[1]
        for i in range(n_layers):
            feats = transcoders[i].encode(x[i])
            recon = transcoders[i].decode(feats, x[i])
            err[i] += (recon - y[i]).double().pow(2).sum()
            sq[i] += y[i].double().pow(2).sum()
            total[i] += y[i].double().sum(0)
            active = feats != 0  # TopK without ReLU keeps negative activations too
            l0[i] += active.sum()
            fired[i] |= active.any(0)
    mean_sq = total.pow(2).sum(-1) / count  # = count * |mean|^2
    var = sq - mean_sq
    return [
        LayerQuality(i, float(err[i] / var[i]), float(l0[i] / count), float(1 - fired[i].float().mean()))
        for i in range(n_layers)
    ]


@torch.no_grad()
def replacement_quality(
    model: PreTrainedModel, transcoders: TranscoderSet, seqs: Sequence[list[int]], pad_id: int, batch: int = 32,
    starts: Sequence[int] | None = None,
) -> ReplacementQuality:
    """Next-token argmax agreement and mean KL(model || replacement) between the model and its replacement (all
    MLPs at once), over the tokens :func:`encode_batch` counts; with ``starts`` (each sequence's first assistant
    token), over the predictions of the assistant tokens only (the logits at positions ``start - 1 .. len - 2``)."""
    agree, kl, count = 0.0, 0.0, 0
    for start in range(0, len(seqs), batch):
        chunk = list(seqs[start : start + batch])
        ids, mask = encode_batch(chunk, pad_id)
        if starts is not None:
            mask = torch.zeros_like(mask)
            for row, (seq, first) in enumerate(zip(chunk, starts[start : start + batch])):
                mask[row, max(first - 1, 0) : len(seq) - 1] = True
        logp = F.log_softmax(model(input_ids=ids).logits[mask].float(), -1)
        with replaced_mlps(model, transcoders):
            logq = F.log_softmax(model(input_ids=ids).logits[mask].float(), -1)
        agree += float((logp.argmax(-1) == logq.argmax(-1)).sum())
        kl += float((logp.exp() * (logp - logq)).sum())
        count += logp.shape[0]
    return ReplacementQuality(agree / count, kl / count)


def as_dict(items: Sequence[LayerQuality]) -> list[dict]:
    return [asdict(q) for q in items]
