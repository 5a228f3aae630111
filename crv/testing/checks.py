"""Self-checks of an attribution setup: are the edge rows complete?

Completeness: a feature's incoming edges plus the parts that have no node
(earlier layers' ``b_dec``, attention biases, BOS's constant MLP output) sum to
its pre-activation minus ``b_enc``; a logit row sums to the centred logit. Run
:func:`completeness` after pointing crv at a new model/transcoder pair: a large
error means the model is not the Llama the engine assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crv.attribution.engine import TraceAttribution, salient_logits


@dataclass(frozen=True)
class Completeness:
    """Worst relative residuals (|sum of row + bias - value| / max |value|)."""

    feature_rel_error: float
    logit_rel_error: float
    n_features: int
    n_logits: int


def completeness(trace: TraceAttribution, pos: int | None = None, batch_size: int = 256) -> Completeness:
    """Check every active feature's row and the salient logit rows at ``pos`` (default: last)."""
    lin = trace.lin
    pos = lin.n_pos - 1 if pos is None else pos
    worst, scale = 0.0, float(lin.features.pre.abs().max()) if lin.n_features else 1.0
    for layer in range(lin.n_layers):
        sel = (lin.features.layer == layer).nonzero(as_tuple=True)[0]
        for start in range(0, len(sel), batch_size):
            chunk = sel[start : start + batch_size]
            rows, bias = lin.rows(layer, lin.features.pos[chunk], lin.feature_reading_vectors(chunk))
            err = (rows.sum(1) + bias + lin.b_enc[chunk] - lin.features.pre[chunk]).abs().max()
            worst = max(worst, float(err) / scale)
    cfg = trace.config
    tokens, _ = salient_logits(trace.cap.logits[pos], cfg.max_n_logits, cfg.desired_logit_prob)
    rows, bias = lin.rows(lin.n_layers, torch.full((len(tokens),), pos, device=lin.device), lin.logit_reading_vectors(pos, tokens))
    centred = trace.cap.logits[pos, tokens] - trace.cap.logits[pos].mean()
    logit_err = float((rows.sum(1) + bias - centred).abs().max() / centred.abs().max().clamp_min(1e-12))
    return Completeness(worst, logit_err, lin.n_features, len(tokens))
