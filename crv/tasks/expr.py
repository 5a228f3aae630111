"""Expression trees for the synthetic tasks: printing, parsing and evaluation.

Two dialects share one tree type:

* ``arith``: integer leaves 0-9, binary ``+ - *``, unary minus.
* ``bool``: leaves ``True``/``False``, binary ``and``/``or``, unary ``not``.

Printing (the canonical text the reasoner reads and writes):

* a binary node is parenthesised unless it is the top of the printed expression:
  ``(3+4)*(2-(5*7))``, ``(True and False) or not (False or True)``;
* unary minus always wraps its operand: ``-(3)``, ``-(3+4)``; ``not`` writes
  ``not True`` or ``not (True or False)``;
* a negative arithmetic value is written ``-5`` at the top and ``(-5)`` inside.

Parsing is a small recursive-descent grammar with the usual precedence
(``*`` over ``+ -``; ``not`` over ``and`` over ``or``). It never calls ``eval``
and rejects anything outside the grammar with :class:`ParseError`, so model
text of any shape can be fed to it safely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Union

Dialect = Literal["arith", "bool"]
Value = Union[int, bool]

MAX_EXPR_CHARS = 4096
MAX_NUMBER_DIGITS = 12
MAX_DEPTH = 100  # nesting levels; each costs ~7 Python frames


class ParseError(ValueError):
    """Raised when text is not a well-formed expression of the dialect."""


@dataclass(frozen=True)
class Val:
    value: Value


@dataclass(frozen=True)
class Un:
    op: str  # "-" or "not"
    child: "Node"


@dataclass(frozen=True)
class Bin:
    op: str  # "+", "-", "*", "and", "or"
    left: "Node"
    right: "Node"


Node = Union[Val, Un, Bin]

_BIN_TEXT = {"+": "+", "-": "-", "*": "*", "and": " and ", "or": " or "}


def count_ops(node: Node) -> int:
    """Number of operators (unary and binary) in the tree."""
    if isinstance(node, Val):
        return 0
    if isinstance(node, Un):
        return 1 + count_ops(node.child)
    return 1 + count_ops(node.left) + count_ops(node.right)


def fmt_value(value: Value, top: bool = True) -> str:
    """Canonical text of a value."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if value < 0:
        return f"-{-value}" if top else f"(-{-value})"
    return str(value)


def fmt(node: Node, top: bool = True) -> str:
    """Canonical text of a tree (see module docstring)."""
    if isinstance(node, Val):
        return fmt_value(node.value, top)
    if isinstance(node, Un):
        if node.op == "-":
            return f"-({fmt(node.child, top=True)})"
        child = node.child
        inner = fmt(child, top=False) if isinstance(child, Bin) else fmt(child, top=True)
        return f"not {inner}"
    text = f"{fmt(node.left, False)}{_BIN_TEXT[node.op]}{fmt(node.right, False)}"
    return text if top else f"({text})"


def evaluate(node: Node) -> Value:
    """Value of a tree."""
    if isinstance(node, Val):
        return node.value
    if isinstance(node, Un):
        v = evaluate(node.child)
        return (not v) if node.op == "not" else -v
    a, b = evaluate(node.left), evaluate(node.right)
    if node.op == "+":
        return a + b
    if node.op == "-":
        return a - b
    if node.op == "*":
        return a * b
    if node.op == "and":
        return bool(a) and bool(b)
    if node.op == "or":
        return bool(a) or bool(b)
    raise ValueError(f"unknown operator {node.op!r}")


def as_value(node: Node) -> Value | None:
    """The value a node denotes if it is a literal (``5``, ``-5``, ``True``), else None."""
    if isinstance(node, Val):
        return node.value
    if isinstance(node, Un) and node.op == "-" and isinstance(node.child, Val):
        return -node.child.value  # type: ignore[operator]
    return None


def is_redex(node: Node) -> bool:
    """True if the node is one operation whose operands are all literals."""
    if isinstance(node, Un):
        return as_value(node.child) is not None
    if isinstance(node, Bin):
        return as_value(node.left) is not None and as_value(node.right) is not None
    return False


# ----------------------------------------------------------------------------- parsing

_TOKEN_RE = {
    "arith": re.compile(r"\s*(\d+|[()+\-*])"),
    "bool": re.compile(r"\s*(True|False|and|or|not|[()])"),
}


def tokenize(text: str, dialect: Dialect) -> list[str]:
    """Split expression text into tokens; raise ParseError on anything else."""
    if len(text) > MAX_EXPR_CHARS:
        raise ParseError(f"expression longer than {MAX_EXPR_CHARS} characters")
    pattern = _TOKEN_RE[dialect]
    tokens: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = pattern.match(text, pos)
        if m is None:
            raise ParseError(f"unexpected text {text[pos:pos + 10]!r} at column {pos}")
        tok = m.group(1)
        if dialect == "bool" and tok.isalpha():
            end = m.end()
            if end < len(text) and (text[end].isalnum() or text[end] == "_"):
                raise ParseError(f"unexpected word at column {pos}")
        if tok.isdigit() and len(tok) > MAX_NUMBER_DIGITS:
            raise ParseError(f"number with more than {MAX_NUMBER_DIGITS} digits")
        tokens.append(tok)
        pos = m.end()
    if not tokens:
        raise ParseError("empty expression")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str], dialect: Dialect) -> None:
        self.toks = tokens
        self.i = 0
        self.dialect = dialect
        self.depth = 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end of expression")
        if expected is not None and tok != expected:
            raise ParseError(f"expected {expected!r}, found {tok!r}")
        self.i += 1
        return tok

    def binary_level(self, ops: tuple[str, ...], sub) -> Node:  # type: ignore[no-untyped-def]
        node = sub()
        while self.peek() in ops:
            op = self.take()
            node = Bin(op, node, sub())
        return node

    # arith: sum := prod (('+'|'-') prod)* ; prod := neg ('*' neg)* ; neg := '-' neg | atom
    def a_sum(self) -> Node:
        return self.binary_level(("+", "-"), self.a_prod)

    def a_prod(self) -> Node:
        return self.binary_level(("*",), self.a_neg)

    def a_neg(self) -> Node:
        if self.peek() == "-":
            self.take()
            return Un("-", self.guard(self.a_neg))
        return self.atom(self.a_sum)

    # bool: or := and ('or' and)* ; and := not ('and' not)* ; not := 'not' not | atom
    def b_or(self) -> Node:
        return self.binary_level(("or",), self.b_and)

    def b_and(self) -> Node:
        return self.binary_level(("and",), self.b_not)

    def b_not(self) -> Node:
        if self.peek() == "not":
            self.take()
            return Un("not", self.guard(self.b_not))
        return self.atom(self.b_or)

    def guard(self, fn) -> Node:  # type: ignore[no-untyped-def]
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("expression nested too deeply")
        try:
            return fn()
        finally:
            self.depth -= 1

    def atom(self, top) -> Node:  # type: ignore[no-untyped-def]
        tok = self.take()
        if tok == "(":
            node = self.guard(top)
            self.take(")")
            return node
        if self.dialect == "arith" and tok.isdigit():
            return Val(int(tok))
        if self.dialect == "bool" and tok in ("True", "False"):
            return Val(tok == "True")
        raise ParseError(f"unexpected token {tok!r}")


def parse(text: str, dialect: Dialect) -> Node:
    """Parse expression text of a dialect into a tree (never evaluates code)."""
    parser = _Parser(tokenize(text, dialect), dialect)
    try:
        node = parser.a_sum() if dialect == "arith" else parser.b_or()
    except RecursionError:
        raise ParseError("expression nested too deeply") from None
    if parser.peek() is not None:
        raise ParseError(f"unexpected token {parser.peek()!r} after the expression")
    return node


def parse_value(text: str, dialect: Dialect) -> Value:
    """Parse a literal value (``-5``, ``(-5)``, ``True``); ParseError otherwise."""
    value = as_value(parse(text, dialect))
    if value is None:
        raise ParseError(f"{text.strip()!r} is not a single value")
    return value
