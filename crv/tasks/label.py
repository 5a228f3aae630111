"""Labelling model-written chains of thought for the synthetic tasks.

A step is correct only if

1. it has the form ``<operation>=<result> => <state>``,
2. ``<operation>`` is one operation on literal operands and ``<result>`` is its value, and
3. ``<state>`` parses and evaluates to the ground-truth value of the question.

Anything else (malformed text, a wrong result, a state that drifted) is faulty.
Parsing uses :mod:`crv.tasks.expr`'s grammar: model text is never evaluated as code.
"""

from __future__ import annotations

from dataclasses import dataclass

from crv.tasks.cot import ANSWER_PREFIX, STATE_SEP, Problem
from crv.tasks.expr import Dialect, ParseError, Value, evaluate, fmt_value, is_redex, parse, parse_value
from crv.tasks.schema import Record, truncate


@dataclass(frozen=True)
class StepCheck:
    """Verdict on one step: ``reason`` is ok, malformed, wrong_operation or wrong_state."""

    text: str
    correct: bool
    reason: str
    detail: str = ""


def split_output(text: str) -> tuple[list[str], str | None]:
    """Split model output into step lines and the final answer (None if no ``A:`` line). Blank lines are not
    steps: they carry no reasoning and no token a graph could be computed at (a record's steps are never blank)."""
    steps: list[str] = []
    for line in text.split("\n"):
        if line.startswith(ANSWER_PREFIX.strip()):
            return steps, line[len(ANSWER_PREFIX.strip()):].strip()
        if line.strip():
            steps.append(line)
    return steps, None


def check_step(step: str, truth: Value, dialect: Dialect) -> StepCheck:
    """Label one step against the ground-truth value of the question."""
    if STATE_SEP not in step:
        return StepCheck(step, False, "malformed", f"no {STATE_SEP.strip()!r} separator")
    op_text, state = step.split(STATE_SEP, 1)
    if "=" not in op_text:
        return StepCheck(step, False, "malformed", "no '=' in the operation")
    lhs, rhs = op_text.rsplit("=", 1)
    try:
        op = parse(lhs, dialect)
        if not is_redex(op):
            return StepCheck(step, False, "malformed", "not a single operation on literals")
        result = parse_value(rhs, dialect)
        state_value = evaluate(parse(state, dialect))
    except (ParseError, RecursionError) as e:
        return StepCheck(step, False, "malformed", str(e))
    computed = evaluate(op)
    if type(result) is not type(computed) or result != computed:
        return StepCheck(step, False, "wrong_operation", f"{lhs.strip()} is {fmt_value(computed)}, not {rhs.strip()}")
    if type(state_value) is not type(truth) or state_value != truth:
        return StepCheck(step, False, "wrong_state", f"state evaluates to {fmt_value(state_value)}, expected {fmt_value(truth)}")
    return StepCheck(step, True, "ok")


def label_steps(question: str, steps: list[str], dialect: Dialect) -> list[StepCheck]:
    """Check every step of a trace (no truncation)."""
    truth = evaluate(parse(question, dialect))
    return [check_step(s, truth, dialect) for s in steps]


def label_output(problem: Problem, output: str, source: str = "reasoner") -> Record:
    """Turn a model's completion for a problem into a truncated, labelled record."""
    steps, final = split_output(output)
    checks = label_steps(problem.question, steps, problem.task)
    kept, labels = truncate(steps, [int(c.correct) for c in checks])
    solved = False
    if final is not None:
        try:
            solved = fmt_value(parse_value(final, problem.task)) == problem.answer
        except ParseError:
            solved = False
    return Record(
        problem_id=problem.problem_id,
        task=problem.task,
        n=problem.n,
        question=problem.question,
        answer=problem.answer,
        steps=kept,
        labels=labels,
        final_answer=final,
        solved=solved,
        source=source,
        raw_output=output,
    )
