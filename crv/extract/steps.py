"""One row per CoT step: its fingerprint and every baseline's inputs, from one forward pass per trace.

Column groups of the step table (a pandas DataFrame):

- keys: ``problem_id, task, n, step_index, faulty`` (1 = faulty, the positive class);
- the fingerprint (:func:`crv.fingerprint.features.feature_names`), unprefixed;
- ``bb.*``: black-box scores from the reasoner's own next-token distributions over the
  step's tokens: ``bb.maxprob`` (mean max probability), ``bb.ppl`` (perplexity of the
  step's tokens), ``bb.entropy`` (mean entropy), ``bb.energy`` (mean ``-logsumexp`` of the
  logits) and ``bb.maxprob_t{T}`` (mean max probability at temperature T, for temperature scaling);
- ``tc.*``: transcoder activations over the step's tokens, no graph: per layer the count,
  number of distinct features, mean / max / std activation;
- ``h{l}.{i}``: hidden state ``l`` (0 = embeddings) mean-pooled over the step's tokens.

- ``<target>:<name>``: the fingerprint of the graph at another step target (``extra_targets``).

The step's tokens are its token span (:mod:`crv.lm.encode`: the tokens overlapping the step's
text, its newline excluded); its graph is the one at its last token (``target="last"``, the
paper's setting), at the token holding its ``=`` (``"result"``) or where the model was least
sure of one of the step's tokens (``"uncertain"``).
:func:`crv.extract.build_step_table` builds the table of a dataset (resumably, locally or on Ray).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import pandas as pd
import torch

from crv.attribution.attributor import Attributor
from crv.fingerprint.features import fingerprint_summary, step_fingerprint
from crv.fingerprint.summary import GraphSummary, summarize
from crv.tasks.schema import Record

TEMPERATURES = (0.5, 0.75, 1.5, 2.0, 3.0, 5.0)
KEYS = ["problem_id", "task", "n", "step_index", "faulty"]


def black_box(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Scores of one step from the distributions that predicted its tokens (``logits [k, V]``, ``targets [k]``)."""
    targets = targets.to(logits.device)
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    out = {
        "bb.maxprob": float(p.max(-1).values.mean()),
        "bb.ppl": float(torch.exp(-logp.gather(1, targets[:, None]).mean())),
        "bb.entropy": float(-(p * logp).sum(-1).mean()),
        "bb.energy": float(-torch.logsumexp(logits.double(), -1).mean()),
    }
    for t in TEMPERATURES:
        out[f"bb.maxprob_t{t}"] = float(torch.softmax(logits.double() / t, -1).max(-1).values.mean())
    return out


def transcoder_stats(layer: torch.Tensor, pos: torch.Tensor, feat: torch.Tensor, act: torch.Tensor,
                     lo: int, hi: int, n_layers: int) -> dict[str, float]:
    """Per-layer statistics of the active features at positions ``lo..hi`` (no graph)."""
    out: dict[str, float] = {}
    inside = (pos >= lo) & (pos <= hi)
    for l in range(n_layers):
        m = inside & (layer == l)
        a = act[m].double()
        out[f"tc.l{l}.count"] = float(m.sum())
        out[f"tc.l{l}.distinct"] = float(feat[m].unique().numel())
        out[f"tc.l{l}.mean"] = float(a.mean()) if a.numel() else 0.0
        out[f"tc.l{l}.max"] = float(a.max()) if a.numel() else 0.0
        out[f"tc.l{l}.std"] = float(a.std(unbiased=False)) if a.numel() else 0.0
    return out


def trace_entry(att: Attributor, record: Record, target: str = "last", extra_targets: tuple[str, ...] = (),
                fingerprints: list[dict] | None = None) -> tuple[list[dict], dict[str, list[GraphSummary]]]:
    """All step rows of one record, and its steps' pruned graphs per step target (one forward pass).

    The fingerprint of the graph at ``target`` is unprefixed; those at ``extra_targets``
    (from the same forward pass and row cache) are prefixed ``"<target>:"``. With ``fingerprints``
    (each step's fingerprint columns, as a :class:`~crv.extract.archive.FingerprintArchive` holds them)
    no graph is computed: the rows take those values and no graphs are returned. Graphs are read from
    :meth:`Attributor.record_steps` (each step on its own prefix's tokens); the black-box, transcoder and
    hidden-state columns from the whole trace's forward pass, over the step's tokens.
    """
    steps = att.record_steps(record)
    enc, tr = steps.encoding, steps.shared
    targets = [target] + [t for t in dict.fromkeys(extra_targets) if t != target]
    if fingerprints is not None and len(fingerprints) != len(record.steps):
        raise ValueError(f"{len(fingerprints)} fingerprints for the {len(record.steps)} steps of {record.problem_id}")
    summaries = {} if fingerprints is not None else {
        t: [summarize(v.graph, v.pruned) for v in (steps.step(k, t) for k in range(len(record.steps)))] for t in targets}
    ids, logits, feats = tr.ids, tr.logits, tr.active_features
    hidden = tr.hidden_states.cpu()
    rows = []
    for k in range(len(record.steps)):
        lo, hi = enc.spans[k][0], enc.last(k)  # token positions of the step (first and last)
        row: dict = {"problem_id": record.problem_id, "task": record.task, "n": record.n, "step_index": k,
                     "faulty": int(record.labels[k] == 0)}
        if fingerprints is not None:
            row.update(fingerprints[k])
        else:
            row.update(fingerprint_summary(summaries[target][k]))
            for t in targets[1:]:
                row.update({f"{t}:{name}": v for name, v in fingerprint_summary(summaries[t][k]).items()})
        row.update(black_box(logits[max(lo - 1, 0) : hi], ids[max(lo, 1) : hi + 1]))
        row.update(transcoder_stats(feats.layer, feats.pos, feats.feat, feats.act, lo, hi, tr.n_layers))
        for l, h in enumerate(hidden):
            row.update({f"h{l}.{i}": v for i, v in enumerate(h[lo : hi + 1].mean(0).tolist())})
        rows.append(row)
    return rows, summaries


def time_crv(att: Attributor, records: Iterable[Record], target: str = "last") -> float:
    """Milliseconds per step to fingerprint ``records`` from scratch (forward pass, graphs, pruning, fingerprint)."""
    n, start = 0, time.perf_counter()
    for rec in records:
        steps = att.record_steps(rec)
        for k in range(len(steps)):
            step_fingerprint(steps.step(k, target))
            n += 1
    if n == 0:
        raise ValueError("no steps to time")
    return 1000 * (time.perf_counter() - start) / n


def column_groups(table: pd.DataFrame) -> dict[str, list[str]]:
    """Column names by group: ``fingerprint``, ``bb``, ``tc``, ``h{l}`` per hidden layer, ``fingerprint:{target}``."""
    groups: dict[str, list[str]] = {"fingerprint": [], "bb": [], "tc": []}
    for c in table.columns:
        if c in KEYS:
            continue
        if ":" in c:
            groups.setdefault("fingerprint:" + c.split(":")[0], []).append(c)
        elif c.startswith("bb."):
            groups["bb"].append(c)
        elif c.startswith("tc."):
            groups["tc"].append(c)
        elif c.startswith("h") and "." in c and c.split(".")[0][1:].isdigit():
            groups.setdefault(c.split(".")[0], []).append(c)
        else:
            groups["fingerprint"].append(c)
    return groups


def hidden_layers(table: pd.DataFrame) -> list[str]:
    return sorted((g for g in column_groups(table) if g.startswith("h")), key=lambda g: int(g[1:]))
