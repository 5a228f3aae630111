"""Permutation importance out of fold: a planted column carries the signal, noise columns do not."""

import numpy as np
import pandas as pd

from crv.evaluate.importance import permutation_importance
from crv.fingerprint.features import feature_group


def planted_table(n_problems: int = 120, steps: int = 4, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_problems * steps
    faulty = rng.random(n) < 0.3
    return pd.DataFrame({
        "problem_id": np.repeat([f"p{i}" for i in range(n_problems)], steps),
        "faulty": faulty,
        "act_max": faulty * 1.0 + 0.3 * rng.standard_normal(n),  # the signal
        "act_mean": rng.standard_normal(n),
        "density": rng.standard_normal(n),
        "in_deg_mean": rng.standard_normal(n),
        "in_deg_max": rng.standard_normal(n),
    })


def test_the_planted_column_is_the_important_one():
    table = planted_table()
    cols = ["act_max", "act_mean", "density", "in_deg_mean", "in_deg_max"]
    singles, groups, intact = permutation_importance(table, cols, folds=3, repeats=2, n_boot=200)
    assert intact > 90
    assert singles[0].name == "act_max" and singles[0].ci[0] > 20
    for imp in singles[1:]:
        assert imp.ci[0] <= 0.5 and abs(imp.auroc_drop) < 5, imp  # noise: no real drop
    by_name = {g.name: g for g in groups}
    assert set(by_name) == {"group:activation", "group:degree"}
    assert by_name["group:activation"].auroc_drop > 20 and abs(by_name["group:degree"].auroc_drop) < 5


def test_feature_groups_name_every_fingerprint_column():
    assert feature_group("act_max") == "activation"
    assert feature_group("uncertain:betweenness_mean") == "uncertain:betweenness"
    assert feature_group("layer_hist_29") == "layers"
