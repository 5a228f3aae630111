"""The model's own confidence on its steps, without graphs or transcoders: are its errors unsure or confident?

For every step of every record, the black-box scores of :func:`crv.extract.steps.black_box` (the
distributions that predicted the step's tokens, from one forward pass per trace), and per score the
AUROC of faulty (positive) vs correct steps. The scores are unsupervised, so no folds are needed:
``maxprob`` = 1 - mean max probability, ``ppl``, ``entropy``, ``energy`` = mean ``-logsumexp``, each
oriented so that higher means "more likely faulty", as the evaluation's baselines are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from crv.extract.steps import black_box
from crv.lm.encode import TraceEncoder
from crv.tasks.schema import Record

#: score name -> (bb column, sign): the score is sign * column, higher = more likely faulty
CONFIDENCE_SCORES = {"maxprob": ("bb.maxprob", -1.0), "ppl": ("bb.ppl", 1.0), "entropy": ("bb.entropy", 1.0),
                     "energy": ("bb.energy", 1.0)}


@torch.no_grad()
def step_confidence(model: PreTrainedModel, encoder: TraceEncoder, records: Sequence[Record], progress: bool = True
                    ) -> list[dict]:
    """One row per step: ``faulty`` (1 = faulty) and the ``bb.*`` scores of its tokens."""
    rows = []
    device = next(model.parameters()).device
    for rec in tqdm(records, desc="confidence", unit="trace", disable=not progress):
        if not rec.steps:
            continue
        enc = encoder.encode_record(rec)
        logits = model(input_ids=enc.ids[None].to(device)).logits[0].float().cpu()
        for k in range(len(rec.steps)):
            lo, hi = enc.spans[k][0], enc.last(k)
            rows.append({"task": rec.task, "n": rec.n, "faulty": int(rec.labels[k] == 0),
                         **black_box(logits[max(lo - 1, 0) : hi], enc.ids[max(lo, 1) : hi + 1])})
    return rows


def confidence_aurocs(rows: Sequence[dict]) -> dict[str, float | None]:
    """AUROC (percent) of each confidence score for faulty vs correct steps (None without both classes)."""
    y = np.array([r["faulty"] for r in rows])
    if len(set(y.tolist())) < 2:
        return {name: None for name in CONFIDENCE_SCORES}
    return {name: round(100 * float(roc_auc_score(y, sign * np.array([r[col] for r in rows]))), 2)
            for name, (col, sign) in CONFIDENCE_SCORES.items()}
