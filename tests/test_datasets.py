"""Datasets users already have: the CRV release, first-error files, free-form tasks, rollout labels."""

import json
from pathlib import Path

import pytest

from crv.lm.encode import TraceEncoder
from crv.lm.load import load_model
from crv.lm.prompt import PlainFormat
from crv.tasks.cot import generate_problems
from crv.tasks.datasets import read_dataset
from crv.tasks.label import label_output
from crv.tasks.schema import Record, RecordError, write_records

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE = FIXTURES / "arith.nt3.annotated.json"
FIRST_ERROR = FIXTURES / "processbench_gsm8k.jsonl"


def test_crv_release_reader_maps_steps_labels_and_formatted_text():
    recs = read_dataset(RELEASE, "crv-release")
    assert [r.problem_id for r in recs] == ["arith-nt3-0", "arith-nt3-1", "arith-nt3-2"]
    assert all(r.task == "arith" and r.n == 3 and r.source == "crv-release" for r in recs)
    assert [r.labels for r in recs] == [[1, 1], [1, 0], [0]]  # truncated after the first incorrect step
    raw = json.loads(RELEASE.read_text())
    second = recs[1]
    assert second.question == raw[1]["original_expression"]
    assert second.text == raw[1]["step_expressions"][1]["formatted_assistant_content_after"]
    for (a, b), step in zip(second.step_chars, raw[1]["step_expressions"]):
        assert second.text[a:b] == step["step_content"]
    # the formatted text is what is read, token spans included
    enc = TraceEncoder(load_model()[1], PlainFormat()).encode_record(second)
    assert enc.text == second.text and enc.text.startswith("<|begin_of_text|>")
    assert "".join(enc.text[s:e] for s, e in enc.offsets[enc.spans[1][0] : enc.spans[1][1]]) == second.steps[1]


def test_first_error_reader_truncates_at_the_label():
    recs = read_dataset(FIRST_ERROR, "first-error", task="gsm8k-pb")
    assert [r.labels for r in recs] == [[1, 0], [1, 1, 1], [0]]
    assert [r.first_error for r in recs] == [1, None, 0]
    assert recs[1].solved and not recs[0].solved and recs[0].source == "tiny" and recs[0].task == "gsm8k-pb"
    assert "\n" in recs[1].steps[1]  # multi-line steps are kept as written


@pytest.mark.parametrize("fmt,path,edit,message", [
    ("first-error", FIRST_ERROR, lambda objs: objs[1].update(label=7), ":2: label must be -1"),
    ("first-error", FIRST_ERROR, lambda objs: objs[2].pop("steps"), ":3: missing field"),
    ("crv-release", RELEASE, lambda objs: objs[2]["step_expressions"][0].update(step_label="maybe"), "step 0: label"),
    ("crv-release", RELEASE, lambda objs: objs[0]["step_expressions"][1].update(
        formatted_assistant_content_before="something else"), "must extend the previous step"),
])
def test_malformed_files_name_file_and_line(tmp_path, fmt, path, edit, message):
    if path.suffix == ".jsonl":
        objs = [json.loads(line) for line in path.read_text().splitlines()]
        edit(objs)
        bad = tmp_path / path.name
        bad.write_text("".join(json.dumps(o) + "\n" for o in objs))
    else:
        objs = json.loads(path.read_text())
        edit(objs)
        bad = tmp_path / path.name
        bad.write_text(json.dumps(objs, indent=1))
    with pytest.raises(RecordError, match=message) as err:
        read_dataset(bad, fmt)
    assert str(bad) in str(err.value)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"expression_id": 1,\n "original_expression": }]')
    with pytest.raises(RecordError, match=r"broken.json:2: not valid JSON"):
        read_dataset(broken, "crv-release")


def test_crv_release_line_numbers_point_at_the_expression(tmp_path):
    objs = json.loads(RELEASE.read_text())
    objs[2].pop("original_expression")
    bad = tmp_path / "arith.nt3.annotated.json"
    bad.write_text(json.dumps(objs, indent=1))
    with pytest.raises(RecordError) as err:
        read_dataset(bad, "crv-release")
    reported = int(str(err.value).split(":")[1])
    assert bad.read_text().splitlines()[reported - 1].strip() == "{"
    assert '"expression_id": 2' in "\n".join(bad.read_text().splitlines()[reported - 1 : reported + 2])


@pytest.mark.slow
def test_free_form_task_records_pass_through_evaluate(tmp_path):
    """Records of a task crv knows nothing about: black-box baselines and CRV on the shipped (1M-parameter) model."""
    from crv.attribution.attributor import Attributor
    from crv.attribution.engine import AttributionConfig
    from crv.evaluate.methods import EvalConfig
    from crv.evaluate.pipeline import run_evaluation

    att = Attributor.load(config=AttributionConfig(max_feature_nodes=32))
    records = []
    for i, p in enumerate(generate_problems("arith", 3, 60, seed=4)):
        rec = label_output(p, p.completion)
        labels = rec.labels if i % 3 else rec.labels[:-1] + [0]  # a third of the traces end on a "faulty" step
        records.append(Record(problem_id=f"puzzle-{i}", task="my-puzzles", n=None, question=f"Puzzle: {p.question}",
                              answer=rec.answer, steps=rec.steps, labels=labels, final_answer=None, solved=False,
                              source="user"))
    write_records(records, tmp_path / "puzzles.jsonl")
    results = run_evaluation(records, att, tmp_path / "run", tmp_path / "graphs", EvalConfig(n_boot=20, prm=None),
                             command="test")
    methods = results.tasks["my-puzzles"].methods
    assert "crv" in methods and any(m.startswith("bb.") or m in ("max_prob", "entropy", "ppl") for m in methods), methods
    assert 0.0 <= methods["crv"]["auroc"] <= 1.0
    # no difficulty n: one per-n row holding every step, and the report's plot says so
    per_n = results.tasks["my-puzzles"].per_n
    assert set(per_n) == {"None"} and per_n["None"]["n_steps"] == sum(len(r.steps) for r in records)
    assert (tmp_path / "run" / "summary.png").stat().st_size > 0


def test_rollout_labeller_finds_a_deliberately_wrong_step():
    """On the shipped reasoner (which solves n=3 arithmetic): a corrupted step is labelled faulty at its position."""
    from crv.reasoner.rollout_labels import RolloutConfig, answers_match, label_with_rollouts

    model, tok = load_model()
    enc = TraceEncoder(tok, PlainFormat())
    p = generate_problems("arith", 3, 1, seed=1)[0]
    good = label_output(p, p.completion)
    assert good.labels == [1] * len(good.steps)
    # step 1 jumps to a wrong state: the model continues from it and cannot reach the answer
    lhs = good.steps[1].split("=")[0]
    bad_steps = good.steps[:1] + [f"{lhs}={int(good.answer) + 5} => {int(good.answer) + 5}"]
    bad = Record(problem_id="bad", task="arith", n=3, question=good.question, answer=good.answer, steps=bad_steps,
                 labels=[1, 1], final_answer=None, solved=False)
    out = label_with_rollouts(model, enc, [good, bad], RolloutConfig(rollouts=4, temperature=0.5, max_new_tokens=80, seed=0), progress=False)
    assert out[0].record.labels == good.labels and out[0].soft[0] > 0
    assert out[1].hard == (1, 0) and out[1].record.labels == [1, 0] and out[1].record.first_error == 1
    assert answers_match("14", "14.0") and answers_match(" True", "true") and not answers_match(None, "3")
