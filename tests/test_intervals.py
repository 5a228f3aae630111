"""Intervals by problem, paired differences and the across-seed spread (pure numpy, fast)."""

import numpy as np
import pytest

from crv.classify.metrics import aupr, auroc, bootstrap_ci, fpr_at_95
from crv.evaluate.intervals import ProblemBootstrap, weighted_metrics
from crv.evaluate.run import seed_spread


def test_weighted_metrics_are_sklearns_on_repeated_steps():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(5, 200))
        y = rng.random(n) < rng.uniform(0.05, 0.5)
        y[:2] = [True, False]
        s = np.round(rng.normal(size=n) + y * rng.uniform(0, 2), int(rng.integers(0, 3)))  # with ties
        w = rng.integers(0, 4, n)
        w[:2] = 1
        got = weighted_metrics(y, s, w[None].astype(float))
        idx = np.repeat(np.arange(n), w)
        assert got["auroc"][0] == pytest.approx(auroc(y[idx], s[idx]), abs=1e-9)
        assert got["aupr"][0] == pytest.approx(aupr(y[idx], s[idx]), abs=1e-9)
        assert got["fpr95"][0] == pytest.approx(fpr_at_95(y[idx], s[idx]), abs=1e-9)


def toy_duplicated(n_problems=60, copies=6, seed=1):
    """Each problem is one step repeated ``copies`` times: the steps of a problem are not independent."""
    rng = np.random.default_rng(seed)
    y1 = (rng.random(n_problems) < 0.3).astype(int)
    y1[:2] = [0, 1]
    s1 = y1 * 0.8 + rng.normal(size=n_problems)
    return np.repeat(y1, copies), np.repeat(s1, copies), np.repeat(np.arange(n_problems), copies)


@pytest.mark.slow
def test_problem_bootstrap_is_wider_than_step_bootstrap_when_steps_repeat():
    y, s, problems = toy_duplicated()
    step_lo, step_hi = bootstrap_ci(y, s, n=1000, seed=0)
    lo, hi = ProblemBootstrap(y, problems, n=1000, seed=0).metric_ci(s)["auroc"]
    assert lo < auroc(y, s) < hi
    assert (hi - lo) > 1.8 * (step_hi - step_lo)  # ~sqrt(6) wider in expectation
    # one step per problem: the two bootstraps are the same procedure
    one = np.arange(len(y))
    lo1, hi1 = ProblemBootstrap(y, one, n=1000, seed=0).metric_ci(s)["auroc"]
    assert (hi1 - lo1) == pytest.approx(step_hi - step_lo, rel=0.25)


def test_paired_difference_of_a_method_with_itself_is_exactly_zero():
    y, s, problems = toy_duplicated()
    boot = ProblemBootstrap(y, problems, n=300, seed=2)
    d = boot.paired_diff(s, s)
    assert d.diff == 0.0 and d.ci == (0.0, 0.0)
    # a method against a noisier copy of itself: positive difference, interval above zero, narrower than each method's
    noisy = s + np.random.default_rng(3).normal(scale=3.0, size=len(s))
    d2 = boot.paired_diff(s, noisy)
    assert d2.diff == pytest.approx(auroc(y, s) - auroc(y, noisy))
    assert d2.ci[0] <= d2.diff <= d2.ci[1]


def test_resamples_without_both_classes_are_skipped():
    y = np.array([1, 0, 0, 0])
    boot = ProblemBootstrap(y, np.array(["a", "b", "c", "d"]), n=200, seed=0)
    assert 0 < len(boot.weights) < 200
    assert (boot.weights @ y > 0).all() and (boot.weights @ (1 - y) > 0).all()
    with pytest.raises(ValueError, match="problem ids"):
        ProblemBootstrap(y, np.array(["a", "b"]))


def test_seed_spread_is_mean_and_sample_sd_per_method():
    from crv.evaluate.results import EvaluationResults

    runs = [EvaluationResults.from_dict({"arith": {"methods": {"crv": {"auroc": v}, "maxprob": {"auroc": 0.9}}}})
            for v in (0.7, 0.8, 0.9)]
    out = seed_spread(runs)
    assert out["arith"]["crv"]["auroc_mean"] == pytest.approx(0.8)
    assert out["arith"]["crv"]["auroc_sd"] == pytest.approx(0.1)
    assert out["arith"]["maxprob"]["auroc_sd"] == 0.0 and out["arith"]["crv"]["n_seeds"] == 3


def test_report_table_puts_the_spread_across_seeds_next_to_the_intervals():
    from crv.evaluate.report import markdown_table
    from crv.evaluate.results import EvaluationResults

    def task(crv, maxprob):
        m = {name: {"auroc": v, "aupr": 0.5, "fpr95": 0.4, "auroc_ci": [v - 0.02, v + 0.02]}
             for name, v in (("crv", crv), ("maxprob", maxprob))}
        return {"methods": m, "n_steps": 10, "n_faulty": 2, "n_test_steps": 10, "n_test_faulty": 2,
                "ablation_auroc": {}, "paired_vs_crv": {"maxprob": {"auroc_diff": maxprob - crv, "ci": [0.0, 0.1]}}}

    runs = [EvaluationResults.from_dict({"arith": task(c, 0.9)}) for c in (0.7, 0.8, 0.9)]
    pooled = EvaluationResults.from_dict({"arith": task(0.8, 0.9), "settings": {}, "seeds": seed_spread(runs)})
    lines = markdown_table(pooled).splitlines()
    assert lines[0].endswith("| arith AUROC over 3 seeds |")
    crv = next(line for line in lines if line.startswith("| crv |"))
    assert crv.endswith("| 80.0 ± 10.0 |") and "80.0 [78.0, 82.0]" in crv
    assert next(line for line in lines if line.startswith("| maxprob |")).endswith("| 90.0 ± 0.0 |")
    assert all("no spread" not in line for line in lines)
    pooled.tasks["arith"].methods["prm_finetuned"] = {**pooled.tasks["arith"].methods["maxprob"]}
    lines = markdown_table(pooled).splitlines()
    assert next(line for line in lines if line.startswith("| prm_finetuned |")).endswith("| — |")
    assert next(line for line in lines if line.startswith("Across datasets")).endswith("(no spread): prm_finetuned")
    pooled.extra["seeds"] = seed_spread(runs[:1])
    one_seed = markdown_table(pooled).splitlines()
    assert "seeds" not in one_seed[0] and any("one seed's dataset only" in line for line in one_seed)
