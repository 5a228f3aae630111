"""Which features an intervention edits at a step's suspect position: three selection rules.

- ``logit``: the features with the largest positive total effect (all paths of the step's graph at the
  suspect position) on the emitted token's margin over the runner-up (:func:`crv.interventions.select.candidates`):
  what makes the model write its suspect choice;
- ``fingerprint``: the features the verifier's fingerprint rests on: the most influential feature nodes at the
  suspect position in the pruned graph (influence on the logits, the graph the fingerprint is computed from);
- ``anomalous``: the paper's rule, features unusually active for a correct step: the largest
  ``(a - mean) / std`` against each feature's activation over every position of correct traces (zeros
  included; ``std`` floored), so a feature that fires where it rarely does ranks first.

Each returns up to ``k`` :class:`~crv.interventions.controls.ActiveFeature` of the suspect position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from crv.attribution.attributor import Attributor
from crv.attribution.graph import Graph
from crv.attribution.prune import prune
from crv.interventions.controls import ActiveFeature
from crv.interventions.select import candidates
from crv.tasks.schema import Record

RULES = ("logit", "fingerprint", "anomalous")


@dataclass(frozen=True)
class FeatureReference:
    """Per-feature activation mean and std (``[L, F]``) over every position of correct traces."""

    mean: torch.Tensor
    std: torch.Tensor
    positions: int

    def z(self, f: ActiveFeature, floor: float = 0.05) -> float:
        return (f.activation - float(self.mean[f.layer, f.feature])) / max(float(self.std[f.layer, f.feature]), floor)


@torch.no_grad()
def feature_reference(att: Attributor, records: Sequence[Record]) -> FeatureReference:
    """:class:`FeatureReference` from the forward passes of ``records`` (use correct ones), position 0 left out."""
    L, F = att.transcoders.shape.n_layers, att.transcoders.shape.d_transcoder
    s1 = torch.zeros(L * F, dtype=torch.float64)
    s2 = torch.zeros(L * F, dtype=torch.float64)
    n = 0
    for r in records:
        tr, enc = att.trace_record(r)
        fe = tr.active_features
        keep = fe.pos.cpu() >= 1
        gid = (fe.layer.cpu() * F + fe.feat.cpu())[keep]
        a = fe.act.cpu().double()[keep]
        s1.index_add_(0, gid, a)
        s2.index_add_(0, gid, a * a)
        n += len(enc.ids) - 1
    mean = s1 / max(n, 1)
    std = (s2 / max(n, 1) - mean**2).clamp(min=0).sqrt()
    return FeatureReference(mean.view(L, F).float(), std.view(L, F).float(), n)


def active_at(att: Attributor, tr, pos: int) -> list[ActiveFeature]:  # type: ignore[no-untyped-def]
    """Every feature active at token position ``pos`` of a traced sequence, with its decoder row's norm."""
    fe = tr.active_features
    at = (fe.pos == pos).nonzero(as_tuple=True)[0]
    out = []
    for l in fe.layer[at].unique().tolist():
        m = at[fe.layer[at] == l]
        norms = att.transcoders[l].decoder_rows(fe.feat[m]).float().norm(dim=-1).cpu()
        out += [ActiveFeature(int(l), int(f), float(a), float(nrm))
                for f, a, nrm in zip(fe.feat[m].tolist(), fe.act[m].float().tolist(), norms.tolist())]
    return out


def select(rule: str, graph: Graph, pos: int, active: list[ActiveFeature], k: int,
           reference: FeatureReference | None = None) -> list[ActiveFeature]:
    """Up to ``k`` features of ``active`` (those at the suspect position ``pos``) chosen by ``rule``."""
    by_id = {(a.layer, a.feature): a for a in active}
    if rule == "logit":
        picks = [(c.layer, c.feature) for c in candidates(graph, pos) if c.effect > 0]
    elif rule == "fingerprint":
        infl = prune(graph).node_influence[: graph.n_features]
        sel = graph.active_features[graph.selected_features]
        order = torch.argsort(infl, descending=True).tolist()
        picks = [(int(sel[i, 0]), int(sel[i, 2])) for i in order if int(sel[i, 1]) == pos and float(infl[i]) > 0]
    elif rule == "anomalous":
        if reference is None:
            raise ValueError("the anomalous rule needs a FeatureReference (feature_reference on correct traces)")
        picks = [(a.layer, a.feature) for a in sorted(active, key=lambda a: -reference.z(a))]
    else:
        raise ValueError(f"unknown selection rule {rule!r}; choose from {', '.join(RULES)}")
    out, seen = [], set()
    for p in picks:
        if p in by_id and p not in seen:
            seen.add(p)
            out.append(by_id[p])
        if len(out) == k:
            break
    return out
