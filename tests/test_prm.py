"""The process-reward-model baselines: they learn from the text, and never from the test problems."""

import numpy as np
import pandas as pd
import pytest
import torch

from crv.classify.metrics import auroc
from crv.evaluate.methods import EvalConfig, TextInputs, score_prms, split
from crv.evaluate.prm import PRMConfig, ProcessRewardModel, last_token_states
from crv.reasoner.model import load_reasoner
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output


def corrupt_product(completion: str, step: int) -> str:
    """Make step ``step`` compute a wrong result (off by 3): a label that only the text shows."""
    lines = completion.split("\n")
    op, rest = lines[step].split("=", 1)
    result, state = rest.split(" => ", 1)
    lines[step] = f"{op}={int(result) + 3} => {state}"
    return "\n".join(lines)


def records(count: int, seed: int):
    out = []
    for i, prob in enumerate(generate_problems("arith", 3, count, seed=seed)):
        text = corrupt_product(prob.completion, (i // 2) % 3) if i % 2 else prob.completion
        out.append(label_output(prob, text))
    return out


@pytest.fixture(scope="module")
def reasoner():
    return load_reasoner()


def test_finetuned_prm_learns_from_the_text(reasoner):
    model, tok = reasoner
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = records(160, seed=1), records(40, seed=2)
    assert {r.problem_id for r in train}.isdisjoint(r.problem_id for r in test)
    prm = ProcessRewardModel(model, tok, PRMConfig(epochs=8)).fit(train)
    assert prm.losses_[-1] < prm.losses_[0]
    scores = prm.score(test)
    y = np.array([int(lab == 0) for r in test for lab in r.labels])
    assert len(scores) == len(y) and list(scores.index[:2]) == [(test[0].problem_id, 0), (test[0].problem_id, 1)]
    assert auroc(y, scores.to_numpy()) > 0.7  # 0.81 measured; chance is 0.5
    # the reasoner it started from is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_prm_errors(reasoner):
    model, tok = reasoner
    prm = ProcessRewardModel(model, tok)
    with pytest.raises(RuntimeError, match="fit"):
        prm.score(records(2, seed=3))
    correct_only = [r for r in records(6, seed=3) if 0 not in r.labels]
    with pytest.raises(ValueError, match="both faulty and correct"):
        prm.fit(correct_only)


def test_last_token_states_match_a_forward_pass(reasoner):
    model, tok = reasoner
    recs = records(2, seed=4)
    states = last_token_states(model, tok, recs)
    L, d = model.config.num_hidden_layers + 1, model.config.hidden_size
    assert states.shape == (sum(len(r.steps) for r in recs), L * d)
    from crv.attribution.attributor import step_position, trace_text
    from crv.reasoner.tokenizer import encode_text

    text, ends = trace_text(recs[1])
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([encode_text(tok, text)]), output_hidden_states=True).hidden_states
    last = hs[L - 1][0, step_position(ends[-1])].numpy()
    row = states.loc[(recs[1].problem_id, len(ends) - 1)]
    np.testing.assert_allclose(row[[f"last{L - 1}.{i}" for i in range(d)]].to_numpy(), last, rtol=1e-5, atol=1e-5)


def test_prms_train_on_the_training_problems_only(reasoner, monkeypatch):
    model, tok = reasoner
    recs = records(40, seed=5)
    rng = np.random.default_rng(0)
    table = pd.DataFrame([{"problem_id": r.problem_id, "task": r.task, "n": r.n, "step_index": k,
                           "faulty": int(lab == 0), "density": rng.random(), "n_nodes": rng.random()}
                          for r in recs for k, lab in enumerate(r.labels)])
    cfg = EvalConfig(test_fraction=0.25, n_boot=10, prm=PRMConfig(epochs=1, crossfit_folds=2))
    tr, te = split(table, cfg)
    train, test = table.iloc[tr], table.iloc[te]
    seen: list[set[str]] = []
    fit = ProcessRewardModel.fit

    def spy(self, records, progress=False):
        seen.append({r.problem_id for r in records})
        return fit(self, records, progress)

    monkeypatch.setattr(ProcessRewardModel, "fit", spy)
    scores, chosen = score_prms(train, test, cfg, TextInputs(model, tok, {r.problem_id: r for r in recs}))
    assert len(seen) == 1 + 2  # the PRM and one per cross-fitting fold
    assert seen[0] == set(train["problem_id"])
    assert all(s < seen[0] for s in seen[1:]) and set.union(*seen[1:]) == seen[0]
    assert set(scores) == {"prm_finetuned", "prm_frozen", "crv_plus_prm"}
    assert all(len(s) == len(test) and np.isfinite(s).all() for s in scores.values())
    assert chosen["prm_frozen_layer"].startswith("last") and set(chosen["ms_per_step"]) == {"prm_finetuned", "prm_frozen"}
