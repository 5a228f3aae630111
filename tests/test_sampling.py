"""Case-control selection keeps every erring trace and a deterministic prefix of error-free ones per n."""

import pytest

from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output
from crv.tasks.sampling import case_control


def records():
    out = []
    for n in (3, 4):
        for i, p in enumerate(generate_problems("bool", n, 12, seed=5)):
            text = p.completion
            if i % 4 == 1:  # every 4th trace errs at its first step
                text = "garbage => True\n" + text
            out.append(label_output(p, text))
    return out


def test_keeps_every_case_and_a_prefix_of_controls_per_n():
    recs = records()
    kept, info = case_control(recs, 1.5)
    cases = [r for r in recs if 0 in r.labels]
    assert len(cases) == info.with_error == 6 and all(r in kept for r in cases)
    for n in (3, 4):
        clean = [r for r in recs if r.n == n and 0 not in r.labels]
        kept_clean = [r for r in kept if r.n == n and 0 not in r.labels]
        assert kept_clean == clean[: round(1.5 * 3)]  # 3 cases at each n
    assert [r.problem_id for r in kept] == [r.problem_id for r in recs if r in kept]  # input order
    assert info.generated == 24 and info.clean == 18 and info.kept_clean == 8
    bigger, _ = case_control(recs, 3)
    assert set(r.problem_id for r in kept) < set(r.problem_id for r in bigger)
    with pytest.raises(ValueError, match="positive"):
        case_control(recs, 0)
