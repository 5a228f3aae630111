import json

import pytest

from crv.tasks.schema import Record, RecordError, read_records, write_records


def good(**kw):
    base = dict(problem_id="p1", task="arith", n=1, question="3+4", answer="7", steps=["3+4=7 => 7"],
                labels=[1], final_answer="7", solved=True)
    base.update(kw)
    return base


def test_round_trip(tmp_path):
    recs = [Record(**good()), Record(**good(problem_id="p2", labels=[0], solved=False, final_answer=None))]
    path = tmp_path / "d.jsonl"
    assert write_records(recs, path) == 2
    assert read_records(path) == recs


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(task=""), "task must be"),
        (dict(task=" arith"), "task must be"),
        (dict(text="Q: 3+4\n3+4=7 => 7\n"), "come together"),
        (dict(text="Q: 3+4\n3+4=7 => 7\n", step_chars=[[7, 99]]), r"step_chars\[0\]"),
        (dict(text="Q: 3+4\n3+4=7 => 7\n", step_chars=[[6, 7]]), "only whitespace"),
        (dict(labels=[1, 1]), "differ in length"),
        (dict(steps=["a", "b"], labels=[0, 1]), "only the last step"),
        (dict(labels=[2]), "0/1"),
        (dict(question="  "), "question"),
        (dict(n=-1), "n must be"),
    ],
)
def test_invalid_records_are_rejected(change, message):
    with pytest.raises(RecordError, match=message):
        Record(**good(**change))


def test_free_form_tasks_and_exact_text_are_records(tmp_path):
    text = "Q: 3+4\n3+4=7 => 7\n"
    rec = Record(**good(task="my-logic-puzzles", n=None, text=text, step_chars=[[7, 17]]))
    write_records([rec], tmp_path / "d.jsonl")
    assert read_records(tmp_path / "d.jsonl") == [rec]


def test_corrupt_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good()) + "\n" + '{"problem_id": "p2", "task": \n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: not valid JSON"):
        read_records(path)
    path.write_text(json.dumps(good()) + "\n" + json.dumps({k: v for k, v in good().items() if k != "labels"}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:2: missing field\(s\): labels"):
        read_records(path)
    path.write_text(json.dumps(good(extra=1)) + "\n")
    with pytest.raises(RecordError, match=r":1: unknown field"):
        read_records(path)
