import pytest

from crv.tasks.cot import detect_task, generate_problems, make_problem, solve
from crv.tasks.expr import evaluate, parse
from crv.tasks.label import check_step, label_output, split_output
from crv.tasks.cot import Problem


def test_solver_writes_one_reduction_per_step():
    steps, answer = solve(parse("(3+4)*(2-(5*7))", "arith"))
    assert steps == [
        "3+4=7 => 7*(2-(5*7))",
        "5*7=35 => 7*(2-35)",
        "2-35=-33 => 7*(-33)",
        "7*(-33)=-231 => -231",
    ]
    assert answer == "-231"


def test_solver_boolean_and_unary():
    steps, answer = solve(parse("not (True and False) or False", "bool"))
    assert steps == [
        "True and False=False => not False or False",
        "not False=True => True or False",
        "True or False=True => True",
    ]
    assert answer == "True"
    steps, answer = solve(parse("-(3)*-(2+1)", "arith"))
    assert steps[0] == "-(3)=-3 => (-3)*-(2+1)"
    assert answer == "9"


@pytest.mark.parametrize("task", ["arith", "bool"])
@pytest.mark.parametrize("n", [1, 3, 7, 10])
def test_generated_problems_have_n_operators_and_valid_solutions(task, n):
    problems = generate_problems(task, n, 20, seed=3)
    for p in problems:
        assert p.n == n and len(p.steps) == n
        assert detect_task(p.question) == task
        record = label_output(p, p.completion, source="reference")
        assert record.labels == [1] * n and record.solved
        assert str(evaluate(parse(p.question, task))) == p.answer


def test_generator_is_deterministic_per_seed():
    a = generate_problems("arith", 5, 30, seed=11)
    b = generate_problems("arith", 5, 30, seed=11)
    c = generate_problems("arith", 5, 30, seed=12)
    assert a == b
    assert [p.question for p in a] != [p.question for p in c]


def test_generator_rejects_bad_arguments():
    import random

    with pytest.raises(ValueError, match="unknown task"):
        make_problem("algebra", 3, random.Random(0), "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        make_problem("arith", 0, random.Random(0), "x")


def test_arith_intermediate_values_are_bounded():
    from crv.tasks.cot import GeneratorConfig

    for p in generate_problems("arith", 10, 30, seed=5, config=GeneratorConfig(max_abs=50)):
        for step in p.steps:
            result = int(step.split(" => ")[0].rsplit("=", 1)[1])
            assert abs(result) <= 50


TRUTH = -231


@pytest.mark.parametrize(
    "step,correct,reason",
    [
        ("3+4=7 => 7*(2-(5*7))", True, "ok"),
        ("5*7=35 => (3+4)*(2-35)", True, "ok"),  # another valid reduction order is fine
        ("3+4=8 => 8*(2-(5*7))", False, "wrong_operation"),
        ("3+4=7 => 7*(2-(5*8))", False, "wrong_state"),
        ("3+4=7 => 7*(2-(5*7)", False, "malformed"),
        ("3+4=7 7*(2-(5*7))", False, "malformed"),
        ("3+4+5=12 => 7*(2-(5*7))", False, "malformed"),  # not a single operation
        ("3**4=81 => 7", False, "malformed"),
        ("", False, "malformed"),
        ("3+4= => 7", False, "malformed"),
    ],
)
def test_step_labeller_arith(step, correct, reason):
    check = check_step(step, TRUTH, "arith")
    assert (check.correct, check.reason) == (correct, reason)


def test_step_labeller_bool():
    assert check_step("True and False=False => not False", True, "bool").correct
    assert check_step("True and False=True => not False", True, "bool").reason == "wrong_operation"
    assert check_step("True and False=False => False", True, "bool").reason == "wrong_state"
    assert check_step("True and False=1 => not False", True, "bool").reason == "malformed"


def test_label_output_truncates_after_first_error():
    p = Problem("t-1", "arith", 4, "(3+4)*(2-(5*7))", "-231")
    output = "3+4=7 => 7*(2-(5*7))\n5*7=36 => 7*(2-36)\n2-36=-34 => 7*(-34)\n7*(-34)=-238 => -238\nA: -238\n"
    r = label_output(p, output)
    assert r.steps == ["3+4=7 => 7*(2-(5*7))", "5*7=36 => 7*(2-36)"]
    assert r.labels == [1, 0]
    assert r.final_answer == "-238" and not r.solved
    assert r.raw_output == output


def test_label_output_without_answer_line():
    p = Problem("t-2", "arith", 1, "3+4", "7")
    r = label_output(p, "3+4=7 => 7\n")
    assert r.labels == [1] and r.final_answer is None and not r.solved
    assert split_output("garbage") == (["garbage"], None)
