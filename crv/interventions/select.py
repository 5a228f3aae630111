"""Which features to edit: those of the step's attribution graph that drive its suspect prediction.

The *suspect position* of a step is where the prediction went wrong: by default the position
where the model was least sure of the step's next character (``locate="uncertain"``, needs no
labels, so it is what a deployed verifier can do); ``locate="oracle"`` uses the labeller's
first wrong character of a miscomputed result (an upper bound). The graph at that position is
read for the signed total effect of every feature node (sum over all paths of the products of
edge weights) on the emitted token's margin over the runner-up token: the features that make
the model write its (suspect) choice rather than its second choice. Features are aggregated per
(layer, feature) over the positions an intervention can edit (the step's own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crv.attribution.attributor import Attributor, step_position
from crv.lm.encode import EncodedTrace
from crv.attribution.engine import TraceAttribution
from crv.attribution.graph import Graph
from crv.tasks.schema import Record
from crv.tasks.expr import ParseError, evaluate, fmt_value, parse
from crv.tasks.cot import STATE_SEP

LOCATE = ("uncertain", "oracle")


@dataclass(frozen=True)
class Candidate:
    """A (layer, feature) and its signed total effect on the suspect logit, summed over the step's positions."""

    layer: int
    feature: int
    effect: float


def wrong_result_offset(step: str, dialect: str) -> int | None:
    """Character offset in ``step`` of the first wrong character of its result (None if the result is right or unparsable)."""
    op_text = step.split(STATE_SEP, 1)[0]
    if "=" not in op_text:
        return None
    lhs, rhs = op_text.split("=", 1)  # an operation has no "=": the result is all that follows the first one
    try:
        correct = fmt_value(evaluate(parse(lhs, dialect)))  # type: ignore[arg-type]
    except (ParseError, RecursionError, ZeroDivisionError):
        return None
    if rhs == correct:
        return None
    i = next((j for j, (a, b) in enumerate(zip(rhs, correct)) if a != b), min(len(rhs), len(correct)))
    return len(lhs) + 1 + i


def suspect_position(trace: EncodedTrace, k: int, logits: torch.Tensor, dialect: str, locate: str = "uncertain") -> int:
    """Token index whose next-token prediction is suspect in step ``k`` of ``trace``."""
    if locate not in LOCATE:
        raise ValueError(f"unknown locate rule {locate!r}; choose from {', '.join(LOCATE)}")
    if locate == "oracle":
        a, b = trace.step_chars[k]
        off = wrong_result_offset(trace.text[a:b], dialect)
        if off is not None:
            return trace.token_at(a + off) - 1  # the position predicting the token with the wrong character
    return step_position(trace, k, "uncertain", logits)


def logit_effects(graph: Graph, logit: int = 0, max_depth: int = 64) -> torch.Tensor:
    """Signed total effect of every node on logit node ``logit`` (paths summed; the graph is acyclic)."""
    A = graph.adjacency.double()
    r = torch.zeros(graph.n_nodes, dtype=torch.float64)
    r[graph.n_nodes - graph.n_logits + logit] = 1.0
    total = torch.zeros_like(r)
    for _ in range(max_depth):
        r = r @ A
        if not bool(r.abs().max() > 0):
            break
        total += r
    return total


def candidates(graph: Graph, first_position: int, token: int | None = None, contrast: bool = True) -> list[Candidate]:
    """Every (layer, feature) of the graph active at positions >= ``first_position``, by effect on the prediction.

    The prediction is ``token``'s logit (default: the graph's top logit, the emitted token under
    greedy decoding); with ``contrast`` its margin over the runner-up logit (what decides which of
    the two is written). Sorted from the most positive effect (drives the prediction) to the most negative.
    """
    logit = 0
    if token is not None:
        hits = (graph.logit_tokens == token).nonzero()
        if len(hits) == 0:
            raise ValueError(f"token {token} is not among the graph's logit nodes")
        logit = int(hits[0])
    effects = logit_effects(graph, logit)
    if contrast and graph.n_logits > 1:
        runner_up = 1 if logit == 0 else 0
        effects = effects - logit_effects(graph, runner_up)
    effects = effects[: graph.n_features]
    sel = graph.active_features[graph.selected_features]
    agg: dict[tuple[int, int], float] = {}
    for (layer, pos, feat), e in zip(sel.tolist(), effects.tolist()):
        if pos >= first_position:
            agg[(layer, feat)] = agg.get((layer, feat), 0.0) + e
    return [Candidate(l, f, e) for (l, f), e in sorted(agg.items(), key=lambda kv: -kv[1])]


@dataclass
class Suggestion:
    """The features an intervention on a step would edit, at the step's suspect position."""

    position: int  # token index whose prediction is suspect (edits apply there)
    suppress: list[Candidate]  # largest positive effect on the suspect prediction first
    amplify: list[Candidate]  # most negative effect first
    active: list[tuple[int, int]]  # every (layer, feature) active at that position (for random controls)


def suggest(att: Attributor, record: Record, step_index: int, k: int = 3, locate: str = "uncertain",
            trace: tuple[TraceAttribution, EncodedTrace] | None = None) -> Suggestion:
    """The top-``k`` features to suppress and to amplify at the suspect position of step ``step_index``."""
    if not 0 <= step_index < len(record.steps):
        raise ValueError(f"step index {step_index} out of range 0..{len(record.steps) - 1}")
    tr, enc = trace if trace is not None else att.trace_record(record)
    pos = suspect_position(enc, step_index, tr.logits, record.task, locate)
    cands = candidates(tr.graph(pos=pos, step_index=step_index), pos)
    feats = tr.active_features
    at = feats.pos == pos
    return Suggestion(pos, [c for c in cands if c.effect > 0][:k], [c for c in reversed(cands) if c.effect < 0][:k],
                      list(zip(feats.layer[at].tolist(), feats.feat[at].tolist())))
