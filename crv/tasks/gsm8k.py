"""Import GSM8K (MIT) model solutions as labelled step records.

Reads ``test.jsonl`` and ``example_model_solutions.jsonl`` from a GSM8K directory
(default ``../shared/data/gsm8k``). Each model solution is split into steps, one
per line; the ``A: ...`` (or ``#### ...``) line is the final answer, not a step.
A step is faulty when one of its calculator annotations ``<<expr=value>>`` is
wrong, or, for the last step, when the final answer is wrong. Traces are
truncated after the first faulty step, as for the synthetic tasks.

Calculator expressions are checked with a whitelist walk of Python's ``ast``
(numbers, ``+ - * /``, parentheses): nothing is executed.
"""

from __future__ import annotations

import ast
import json
import re
from fractions import Fraction
from pathlib import Path

from crv.tasks.schema import Record, RecordError, truncate

DEFAULT_GSM8K_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k"
SOLUTION_KEYS = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
_CALC = re.compile(r"<<([^<>]*?)=([^<>]*?)>>")
_MAX_CALC_CHARS = 200


def _num(text: str) -> Fraction | None:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def safe_calc(expr: str) -> Fraction | None:
    """Value of a calculator expression, or None if it is not plain arithmetic."""
    if len(expr) > _MAX_CALC_CHARS:
        return None
    try:
        tree = ast.parse(expr.replace(",", "").strip(), mode="eval")
    except SyntaxError:
        return None

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            return a / b
        raise ValueError("not plain arithmetic")

    try:
        return walk(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def _close(a: Fraction, b: Fraction) -> bool:
    return abs(a - b) <= Fraction(1, 100) * max(Fraction(1), abs(b)) * Fraction(1, 100)


def step_calculations_ok(step: str) -> bool:
    """True if every ``<<expr=value>>`` annotation of a step is right (or it has none)."""
    for expr, claimed in _CALC.findall(step):
        value, stated = safe_calc(expr), _num(claimed)
        if value is None or stated is None or not _close(value, stated):
            return False
    return True


def split_solution(text: str) -> tuple[list[str], str | None]:
    """Steps (non-empty lines) and the final answer of a GSM8K-style solution."""
    steps, final = [], None
    for line in text.strip().split("\n"):
        s = line.strip()
        if s.startswith("A:") or s.startswith("####"):
            final = s.split(":", 1)[1].strip() if s.startswith("A:") else s[4:].strip()
            break
        if s:
            steps.append(s)
    return steps, final


def label_solution(problem_id: str, question: str, answer: str, solution: str, source: str) -> Record:
    """Label one solution's steps (calculator checks; final answer on the last step)."""
    steps, final = split_solution(solution)
    labels = [int(step_calculations_ok(s)) for s in steps]
    truth, got = _num(answer), (_num(final) if final is not None else None)
    solved = truth is not None and got is not None and got == truth
    if steps and not solved:
        labels[-1] = 0
    kept, kept_labels = truncate(steps, labels)
    return Record(problem_id, "gsm8k", None, question, answer, kept, kept_labels, final, solved, source, solution)


def load_gsm8k(directory: str | Path | None = None, include_reference: bool = False) -> list[Record]:
    """Labelled records from GSM8K's example model solutions (and, optionally, the reference solutions)."""
    directory = Path(directory) if directory is not None else DEFAULT_GSM8K_DIR
    solutions = directory / "example_model_solutions.jsonl"
    test = directory / "test.jsonl"
    for f in (solutions, test):
        if not f.is_file():
            raise FileNotFoundError(f"GSM8K file missing: {f}")
    answers = []
    for lineno, row in _jsonl(test):
        if "answer" not in row or "####" not in row["answer"]:
            raise RecordError(f"{test}:{lineno}: no '#### answer' in the reference solution")
        answers.append((row["question"], row["answer"]))
    records: list[Record] = []
    for lineno, row in _jsonl(solutions):
        i = lineno - 1
        if i >= len(answers) or row.get("question") != answers[i][0]:
            raise RecordError(f"{solutions}:{lineno}: question does not match line {lineno} of test.jsonl")
        question, reference = answers[i]
        answer = reference.rsplit("####", 1)[1].strip()
        if include_reference:
            records.append(label_solution(f"gsm8k-{i}-reference", question, answer, reference, "gsm8k:reference"))
        for key in SOLUTION_KEYS:
            if key in row:
                sol = row[key]
                if not isinstance(sol, dict) or not isinstance(sol.get("solution"), str):
                    raise RecordError(f"{solutions}:{lineno}: {key} has no solution text")
                records.append(label_solution(f"gsm8k-{i}-{key}", question, answer, sol["solution"], f"gsm8k:{key}"))
    return records


def _jsonl(path: Path):  # type: ignore[no-untyped-def]
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
