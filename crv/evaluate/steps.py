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

The step's tokens are its characters (the newline excluded); its graph is the one at its
last token (``target="last"``, the paper's setting), at its ``=`` (``"result"``) or where the
model was least sure of the step's next character (``"uncertain"``).
Pruned graph summaries are cached per trace under ``graph_dir`` and reused
when their model / transcoder checksums match.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from crv.attribution.attributor import Attributor, step_position, step_target, trace_text
from crv.fingerprint.features import fingerprint_summary
from crv.fingerprint.summary import GraphSummary, load_summaries, save_summaries, summarize
from crv.tasks.schema import Record

TEMPERATURES = (0.5, 0.75, 1.5, 2.0, 3.0, 5.0)
KEYS = ["problem_id", "task", "n", "step_index", "faulty"]


def _safe_name(problem_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in problem_id)


def _cached(path: Path, att: Attributor, n_steps: int) -> list[GraphSummary] | None:
    if not path.with_name(path.name + ".json").is_file():
        return None
    try:
        summaries = load_summaries(path)
    except Exception:  # a corrupt cache entry is rebuilt, never trusted
        return None
    ok = len(summaries) == n_steps and all(
        s.meta.get("model") == att.model_id and s.meta.get("transcoders") == att.transcoders.checksum()
        and s.meta.get("settings") == asdict(att.config) for s in summaries
    )
    return summaries if ok else None


def black_box(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Scores of one step from the distributions that predicted its tokens (``logits [k, V]``, ``targets [k]``)."""
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


def _step_summaries(att: Attributor, tr, record: Record, ends: list[int], graph_dir: Path | None, target: str) -> list[GraphSummary]:
    cache = graph_dir / target / record.task / _safe_name(record.problem_id) if graph_dir is not None else None
    summaries = _cached(cache, att, len(ends)) if cache is not None else None
    if summaries is None:
        summaries = [summarize(tr.graph(pos=step_target(record.steps[k], end, target, tr.cap.logits), step_index=k))
                     for k, end in enumerate(ends)]
        if cache is not None:
            save_summaries(summaries, cache)
    return summaries


def trace_rows(att: Attributor, record: Record, graph_dir: Path | None = None, target: str = "last",
               extra_targets: tuple[str, ...] = ()) -> list[dict]:
    """All step rows of one record (graphs from the cache when valid).

    The fingerprint of the graph at ``target`` is unprefixed; those at ``extra_targets``
    (computed from the same forward pass and row cache) are prefixed ``"<target>:"``.
    """
    text, ends = trace_text(record)
    tr = att.trace(text, {"problem_id": record.problem_id, "task": record.task})
    summaries = _step_summaries(att, tr, record, ends, graph_dir, target)
    extra = {t: _step_summaries(att, tr, record, ends, graph_dir, t) for t in extra_targets if t != target}
    ids, logits = tr.cap.ids, tr.cap.logits
    with torch.no_grad():
        hidden = att.model(input_ids=ids[None].to(att.model.device), output_hidden_states=True).hidden_states
    hidden = [h[0].float().cpu() for h in hidden]
    feats = tr.lin.features
    rows = []
    for k, end in enumerate(ends):
        start = end - len(record.steps[k])  # character offset of the step's first character
        lo, hi = start + 1, step_position(end)  # token positions of the step's characters
        row: dict = {"problem_id": record.problem_id, "task": record.task, "n": record.n, "step_index": k,
                     "faulty": int(record.labels[k] == 0)}
        row.update(fingerprint_summary(summaries[k]))
        for t, summ in extra.items():
            row.update({f"{t}:{name}": v for name, v in fingerprint_summary(summ[k]).items()})
        row.update(black_box(logits[lo - 1 : hi], ids[lo : hi + 1]))
        row.update(transcoder_stats(feats.layer, feats.pos, feats.feat, feats.act, lo, hi, tr.lin.n_layers))
        for l, h in enumerate(hidden):
            row.update({f"h{l}.{i}": v for i, v in enumerate(h[lo : hi + 1].mean(0).tolist())})
        rows.append(row)
    return rows


def time_crv(att: Attributor, records: Iterable[Record], target: str = "last") -> float:
    """Milliseconds per step to fingerprint ``records`` from scratch (forward pass, graphs, pruning, fingerprint)."""
    n, start = 0, time.perf_counter()
    for rec in records:
        text, ends = trace_text(rec)
        tr = att.trace(text)
        for k, end in enumerate(ends):
            fingerprint_summary(summarize(tr.graph(pos=step_target(rec.steps[k], end, target, tr.cap.logits), step_index=k)))
            n += 1
    if n == 0:
        raise ValueError("no steps to time")
    return 1000 * (time.perf_counter() - start) / n


def build_step_table(att: Attributor, records: Iterable[Record], graph_dir: str | Path | None = None,
                     progress: bool = True, target: str = "last", extra_targets: tuple[str, ...] = ()) -> pd.DataFrame:
    """The step table of a labelled dataset (see the module docstring for its columns)."""
    records = list(records)
    graph_dir = Path(graph_dir) if graph_dir is not None else None
    rows: list[dict] = []
    for rec in tqdm(records, desc="graphs", unit="trace", disable=not progress):
        if rec.steps:
            rows.extend(trace_rows(att, rec, graph_dir, target, extra_targets))
    if not rows:
        raise ValueError("no steps to evaluate")
    return pd.DataFrame(rows)


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
