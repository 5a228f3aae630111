"""First-error localisation (ProcessBench's convention): exact first errors, error-free traces, thresholds from other folds."""

import numpy as np
import pandas as pd
import pytest

from crv.evaluate.localize import Trace, best_threshold, f1_of, first_error_localisation, predicted_first_error, traces_of


def test_prediction_is_the_first_step_reaching_the_threshold():
    s = np.array([0.1, 0.7, 0.9])
    assert predicted_first_error(s, 0.5) == 1 and predicted_first_error(s, 0.95) is None and predicted_first_error(s, 0.0) == 0


def test_traces_from_step_rows_in_step_order():
    steps = pd.DataFrame({"problem_id": ["b", "a", "a", "b"], "step_index": [1, 1, 0, 0], "faulty": [1, 0, 0, 0]})
    tr = traces_of(steps, [0.9, 0.2, 0.1, 0.3])
    by = {t.problem_id: t for t in tr}
    assert by["a"].first_error is None and by["a"].scores.tolist() == [0.1, 0.2]
    assert by["b"].first_error == 1 and by["b"].scores.tolist() == [0.3, 0.9]


def _traces(n: int, seed: int, shift: int = 0) -> list[Trace]:
    """Half the traces err at a random step; the score is high from ``first_error + shift`` on."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, 6))
        first = int(rng.integers(length)) if i % 2 else None
        s = rng.uniform(0, 0.3, length)
        if first is not None and 0 <= first + shift < length:
            s[first + shift:] = rng.uniform(0.7, 1.0, length - first - shift)
        out.append(Trace(f"p{i}", s, first))
    return out


def test_a_perfect_scorer_localises_every_error_and_one_step_early_none():
    traces = _traces(60, 0)
    folds = {t.problem_id: i % 5 for i, t in enumerate(traces)}
    r = first_error_localisation(traces, folds, n_boot=200)
    assert r["acc_erroneous"] == 1.0 and r["acc_correct"] == 1.0 and r["f1"] == 1.0 and r["f1_ci"] == [1.0, 1.0]
    early = [Trace(t.problem_id, np.r_[t.scores[1:], 0.0] if t.first_error else t.scores, t.first_error) for t in traces]
    r = first_error_localisation(early, folds, n_boot=200)
    assert r["acc_erroneous"] < 0.5  # flags the step before the error: wrong place (except errors at step 0)
    assert r["traces_erroneous"] == 30 and r["traces_correct"] == 30


def test_thresholds_come_from_the_other_folds():
    """A fold whose scores are all shifted up gets the threshold the other folds chose, so it over-flags."""
    traces = _traces(50, 1)
    folds = {t.problem_id: (int(t.problem_id[1:]) // 2) % 2 for t in traces}  # both folds hold both kinds
    shifted = [Trace(t.problem_id, t.scores + (0.5 if folds[t.problem_id] == 1 else 0.0), t.first_error) for t in traces]
    r = first_error_localisation(shifted, folds, n_boot=50)
    assert r["acc_correct"] < 0.75  # fold 1's error-free traces now cross fold 0's threshold
    tau = best_threshold([t for t in shifted if folds[t.problem_id] == 1])
    assert tau > 0.5  # chosen on fold 1 alone, it would have been right
    assert f1_of(np.array([True, False]), np.array([True, True]))[2] == pytest.approx(1.0)
