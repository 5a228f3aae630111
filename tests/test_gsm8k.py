import json

import pytest

from crv.tasks.gsm8k import DEFAULT_GSM8K_DIR, label_solution, load_gsm8k, safe_calc, step_calculations_ok


def test_calculator_annotations():
    assert step_calculations_ok("She has 16 - 3 = <<16-3=13>>13 eggs")
    assert not step_calculations_ok("so 16 * 7 = <<16*7=111>>111 eggs")
    assert step_calculations_ok("60/100 * $5 = $<<60/100*5=3.0>>3")
    assert step_calculations_ok("no calculator here")
    assert not step_calculations_ok("<<2**999999=1>>")  # not plain arithmetic: never evaluated
    assert safe_calc("__import__('os').system('true')") is None


def test_label_solution_truncates_and_marks_final_answer():
    sol = "A = <<2+2=5>>5\nB = <<5*2=10>>10\nA: 10"
    r = label_solution("x", "q?", "8", sol, "test")
    assert r.steps == ["A = <<2+2=5>>5"] and r.labels == [0] and not r.solved
    r = label_solution("y", "q?", "8", "A = <<2+2=4>>4\nB = <<4*2=8>>8\nA: 7", "test")
    assert r.labels == [1, 0] and not r.solved
    r = label_solution("z", "q?", "8", "A = <<2+2=4>>4\nB = <<4*2=8>>8\nA: 8", "test")
    assert r.labels == [1, 1] and r.solved


@pytest.mark.skipif(not DEFAULT_GSM8K_DIR.is_dir(), reason="GSM8K not beside the checkout")
def test_import_agrees_with_shipped_correctness_flags():
    records = load_gsm8k()
    rows = [json.loads(line) for line in (DEFAULT_GSM8K_DIR / "example_model_solutions.jsonl").open()]
    assert len(records) == 4 * len(rows)
    for r in records[:400]:
        _, i, key = r.problem_id.split("-", 2)
        assert rows[int(i)][key]["is_correct"] == r.solved
    assert 0.05 < sum(l == 0 for r in records for l in r.labels) / sum(len(r.labels) for r in records) < 0.5
