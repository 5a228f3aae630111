"""Synthetic problems, their canonical chain of thought, and the CoT text format.

The text format (one place, used by training, generation and labelling)::

    Q: (3+4)*(2-(5*7))          <- prompt, ends with a newline
    3+4=7 => 7*(2-(5*7))        <- one reduction per step, then the state
    5*7=35 => 7*(2-35)
    2-35=-33 => 7*(-33)
    7*(-33)=-231 => -231
    A: -231                     <- final answer

The canonical solver reduces the leftmost innermost operation whose operands
are literals, one per step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from crv.tasks.expr import Bin, Dialect, Node, Un, Val, evaluate, fmt, fmt_value

TASKS: tuple[Dialect, ...] = ("arith", "bool")
QUESTION_PREFIX = "Q: "
ANSWER_PREFIX = "A: "
STATE_SEP = " => "


@dataclass(frozen=True)
class GeneratorConfig:
    """How random problems are drawn."""

    p_unary: float = 0.2  # chance that an operator is unary (minus / not)
    max_abs: int = 999  # arith: reject problems with any intermediate |value| above this
    max_tries: int = 10_000


@dataclass(frozen=True)
class Problem:
    """One synthetic problem with its canonical solution."""

    problem_id: str
    task: Dialect
    n: int
    question: str
    answer: str
    steps: tuple[str, ...] = field(default_factory=tuple)  # "op=result => state" lines

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)

    @property
    def completion(self) -> str:
        return "".join(s + "\n" for s in self.steps) + f"{ANSWER_PREFIX}{self.answer}\n"


def format_prompt(question: str) -> str:
    """The text the reasoner is conditioned on for a question."""
    return f"{QUESTION_PREFIX}{question}\n"


def format_step(op_text: str, result: str, state: str) -> str:
    """One CoT line: the reduction and the rewritten expression."""
    return f"{op_text}={result}{STATE_SEP}{state}"


def detect_task(question: str) -> Dialect:
    """Tell the task from the question's form (boolean words vs digits)."""
    return "bool" if ("True" in question or "False" in question) else "arith"


# ----------------------------------------------------------------------------- generation


def random_tree(task: Dialect, n_ops: int, rng: random.Random, p_unary: float) -> Node:
    """A random tree with exactly ``n_ops`` operators (no unary directly under unary)."""

    def leaf() -> Node:
        return Val(rng.randint(0, 9)) if task == "arith" else Val(rng.random() < 0.5)

    def build(k: int, under_unary: bool) -> Node:
        if k == 0:
            return leaf()
        if not under_unary and rng.random() < p_unary:
            return Un("-" if task == "arith" else "not", build(k - 1, True))
        k_left = rng.randint(0, k - 1)
        ops = ("+", "-", "*") if task == "arith" else ("and", "or")
        return Bin(rng.choice(ops), build(k_left, False), build(k - 1 - k_left, False))

    return build(n_ops, False)


def reduce_once(node: Node) -> tuple[Node, Node] | None:
    """Reduce the leftmost innermost ready operation; return (new tree, redex)."""
    if isinstance(node, Val):
        return None
    if isinstance(node, Un):
        if isinstance(node.child, Val):
            return Val(evaluate(node)), node
        inner = reduce_once(node.child)
        return None if inner is None else (Un(node.op, inner[0]), inner[1])
    if isinstance(node.left, Val) and isinstance(node.right, Val):
        return Val(evaluate(node)), node
    left = reduce_once(node.left)
    if left is not None:
        return Bin(node.op, left[0], node.right), left[1]
    right = reduce_once(node.right)
    return None if right is None else (Bin(node.op, node.left, right[0]), right[1])


def solve(tree: Node) -> tuple[list[str], str]:
    """Canonical CoT of a tree: the step lines and the final answer text."""
    steps: list[str] = []
    while not isinstance(tree, Val):
        reduced = reduce_once(tree)
        assert reduced is not None
        tree, redex = reduced
        steps.append(format_step(fmt(redex), fmt_value(evaluate(redex)), fmt(tree)))
    return steps, fmt_value(tree.value)


def _max_abs_intermediate(tree: Node) -> int:
    biggest = 0
    while not isinstance(tree, Val):
        reduced = reduce_once(tree)
        assert reduced is not None
        tree, redex = reduced
        biggest = max(biggest, abs(int(evaluate(redex))))
    return biggest


def make_problem(
    task: Dialect, n: int, rng: random.Random, problem_id: str, config: GeneratorConfig = GeneratorConfig()
) -> Problem:
    """Draw one problem with ``n`` operators (rejection-sampled within ``max_abs``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if n < 1:
        raise ValueError(f"n must be >= 1 operators, got {n}")
    for _ in range(config.max_tries):
        tree = random_tree(task, n, rng, config.p_unary)
        if task == "arith" and _max_abs_intermediate(tree) > config.max_abs:
            continue
        steps, answer = solve(tree)
        return Problem(problem_id, task, n, fmt(tree), answer, tuple(steps))
    raise RuntimeError(f"no {task} problem with n={n} within max_abs={config.max_abs}")


def generate_problems(
    task: Dialect, n: int, count: int, seed: int = 0, config: GeneratorConfig = GeneratorConfig()
) -> list[Problem]:
    """``count`` problems of difficulty ``n``; the same seed always gives the same list."""
    rng = random.Random(f"{task}:{n}:{seed}")
    return [make_problem(task, n, rng, f"{task}-n{n}-s{seed}-{i}", config) for i in range(count)]
