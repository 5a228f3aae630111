import time

import pytest

from crv.tasks.expr import Bin, ParseError, Un, Val, evaluate, fmt, is_redex, parse, parse_value


@pytest.mark.parametrize(
    "text,value",
    [
        ("(3+4)*(2-(5*7))", -231),
        ("-(3)", -3),
        ("-(-(5))", 5),
        ("(-84)+-(9)", -93),
        ("7*(-33)", -231),
        ("2+3*4", 14),  # usual precedence even though we never print it
        ("-5", -5),
    ],
)
def test_arith_parse_and_evaluate(text, value):
    assert evaluate(parse(text, "arith")) == value


@pytest.mark.parametrize(
    "text,value",
    [
        ("True and False", False),
        ("not (True and False)", True),
        ("(True and False) or not True", False),
        ("not not False", False),
        ("True or False and False", True),  # and binds tighter than or
    ],
)
def test_bool_parse_and_evaluate(text, value):
    assert evaluate(parse(text, "bool")) is value


def test_canonical_printing_round_trips():
    tree = Bin("*", Bin("+", Val(3), Val(4)), Un("-", Bin("-", Val(2), Val(-5))))
    text = fmt(tree)
    assert text == "(3+4)*-(2-(-5))"
    assert evaluate(parse(text, "arith")) == evaluate(tree) == -49
    btree = Un("not", Bin("and", Val(True), Un("not", Val(False))))
    assert fmt(btree) == "not (True and not False)"
    assert evaluate(parse(fmt(btree), "bool")) is False


@pytest.mark.parametrize(
    "text,dialect",
    [
        ("", "arith"),
        ("3+", "arith"),
        ("(3+4", "arith"),
        ("3+4)", "arith"),
        ("3**4", "arith"),
        ("__import__('os')", "arith"),
        ("3/4", "arith"),
        ("Truth and False", "bool"),
        ("True and", "bool"),
        ("True + False", "bool"),
        ("1 and 0", "bool"),
        ("(" * 500 + "3" + ")" * 500, "arith"),
    ],
)
def test_malformed_text_is_rejected(text, dialect):
    with pytest.raises(ParseError):
        parse(text, dialect)


def test_huge_power_like_input_does_not_hang():
    start = time.time()
    with pytest.raises(ParseError):
        parse("9**9**9**9**9", "arith")
    assert time.time() - start < 1.0


def test_values_and_redexes():
    assert parse_value("(-12)", "arith") == -12
    assert parse_value("False", "bool") is False
    with pytest.raises(ParseError):
        parse_value("3+4", "arith")
    assert is_redex(parse("3+(-4)", "arith"))
    assert is_redex(parse("-(7)", "arith"))
    assert not is_redex(parse("3+(4*5)", "arith"))
    assert is_redex(parse("not True", "bool"))
