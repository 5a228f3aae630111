"""``POST /v1/intervene``: the single-case intervention API behind the service."""

from __future__ import annotations

from crv.api.schemas import InterveneRequest, InterveneResponse
from crv.api.verifier import Verifier
from crv.interventions.regenerate import intervene
from crv.interventions.select import suggest
from crv.tasks.cot import Problem
from crv.tasks.expr import count_ops, evaluate, fmt_value, parse
from crv.tasks.label import label_output
from crv.tasks.schema import Record

DEFAULT_FACTOR = 3.0


def labelled_record(task: str, question: str, steps: list[str]) -> Record:
    """The trace as a labelled record (the question is solved to know the answer; strict truncation)."""
    try:
        tree = parse(question, task)  # type: ignore[arg-type]
        answer = fmt_value(evaluate(tree))
    except Exception as e:  # ParseError, RecursionError, ...: a question the task cannot read
        raise ValueError(f"not a valid {task} question: {e}") from e
    problem = Problem("request", task, count_ops(tree), question, answer)  # type: ignore[arg-type]
    return label_output(problem, "\n".join(steps), source="request")


def describe(verifier: Verifier, features: list[tuple[int, int]]) -> list[str | None]:
    """One-line descriptions of features (None each where the set has no description store, or out of its range)."""
    store = verifier.features
    out: list[str | None] = []
    for layer, index in features:
        try:
            out.append(store.description(layer, index) if store is not None else None)
        except IndexError:
            out.append(None)
    return out


def run_intervention(verifier: Verifier, req: InterveneRequest) -> InterveneResponse:
    """Edit the requested (or suggested) features at the step and regenerate the rest of the trace."""
    record = labelled_record(req.task, req.question, list(req.steps))
    if req.step_index >= len(record.steps):
        first_bad = len(record.steps) - 1
        raise ValueError(f"step {req.step_index} comes after the trace's first faulty step ({first_bad}): "
                         f"intervene there" if first_bad < len(req.steps) - 1 else
                         f"step index {req.step_index} out of range 0..{len(req.steps) - 1}")
    value = req.value
    if req.features == "auto":
        sug = suggest(verifier.att, record, req.step_index, req.k)
        chosen = sug.amplify if req.mode == "scale" else sug.suppress
        if req.mode == "scale" and value == 0.0:
            value = DEFAULT_FACTOR
        features = [(c.layer, c.feature) for c in chosen]
        if not features:
            raise ValueError("no feature at the step's suspect position to edit")
        where: int | str = sug.position
    else:
        features, where = [(int(l), int(f)) for l, f in req.features], "step"
    out = intervene(verifier.att.model, verifier.att.encoder, verifier.att.transcoders, record, req.step_index,
                    features, req.mode, value, where)
    return InterveneResponse(
        step_index=req.step_index, features=[list(f) for f in features], descriptions=describe(verifier, features), mode=req.mode, value=value, position=where,
        before=record.steps[req.step_index], after=out.new_step, continuation=out.continuation,
        steps=out.record.steps, labels=out.record.labels, step_correct=out.step_correct, solved=out.solved,
        final_answer=out.record.final_answer,
    )
