"""End-to-end (KL) tuning of a transcoder set through the replacement model, on the tiny reasoner."""

import random

import pytest
import torch

from crv.lm.encode import TraceEncoder
from crv.lm.load import DEFAULT_MODEL_DIR, load_model
from crv.lm.prompt import PlainFormat
from crv.transcoders.activations import cot_examples
from crv.transcoders.io import load_transcoders
from crv.transcoders.kl_tune import KLTuneConfig, kl_tune, trainable_copy, tune_loss
from crv.transcoders.metrics import replacement_quality
from crv.transcoders.train import TranscoderTrainConfig, train_transcoders


@pytest.fixture(scope="module")
def undertrained(tmp_path_factory):
    """The shipped reasoner with a deliberately undertrained set (a replacement far from the model; the test-trained
    tiny reasoner is too unsure for its MLPs to matter: KL 0.002 nats with any set)."""
    model, tok = load_model(DEFAULT_MODEL_DIR)
    enc = TraceEncoder(tok, PlainFormat())
    out = tmp_path_factory.mktemp("tc")
    cfg = TranscoderTrainConfig(expansion=4, k=4, steps=3, batch_tokens=256, pool_tokens=1024, warmup=2, resample_every=0)
    train_transcoders(model, enc, cfg, out, progress=False)
    return model, enc, out


def held_out(enc):
    return cot_examples(enc, random.Random(99), 24)


@pytest.mark.slow
def test_tuning_brings_the_replacement_closer_and_resumes_exactly(undertrained, tmp_path, monkeypatch):
    model, enc, path = undertrained
    ts = load_transcoders(path, model=model)
    ex = held_out(enc)
    seqs, starts = [s for s, _ in ex], [s for _, s in ex]
    pad = enc.tokenizer.pad_token_id
    before = replacement_quality(model, ts, seqs, pad, starts=starts)
    cfg = KLTuneConfig(steps=12, sequences=8, lr=2e-3, warmup=2)
    tuned = kl_tune(model, enc, ts, cfg, tmp_path / "a", progress=False, checkpoint_seconds=0)
    after_set = load_transcoders(tmp_path / "a", model=model)
    after = replacement_quality(model, after_set, seqs, pad, starts=starts)
    assert after.mean_kl < 0.8 * before.mean_kl, (before, after)
    assert all(p.requires_grad for p in model.parameters())  # the model is given back trainable
    assert after_set.config["crv"]["kl_tune"]["config"]["steps"] == 12

    # stopped at step 7 and resumed: the same weights as the run straight through
    import crv.transcoders.kl_tune as kt

    real = kt.tune_loss

    def stop_at_7(model, tcs, examples, pad_id, coef, calls=[0]):  # noqa: B006
        calls[0] += 1
        if calls[0] == 8:
            raise KeyboardInterrupt
        return real(model, tcs, examples, pad_id, coef)

    monkeypatch.setattr(kt, "tune_loss", stop_at_7)
    with pytest.raises(KeyboardInterrupt):
        kl_tune(model, enc, ts, cfg, tmp_path / "b", progress=False, checkpoint_seconds=0)
    calls = []
    monkeypatch.setattr(kt, "tune_loss", lambda *a: calls.append(1) or real(*a))
    resumed = kl_tune(model, enc, ts, cfg, tmp_path / "b", progress=False, resume=True, checkpoint_seconds=0)
    assert len(calls) == 12 - 7  # steps 0..6 were checkpointed: not redone
    for a, b in zip(tuned, resumed):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_loss_is_kl_plus_local_fvu_and_zero_for_the_models_own_mlps(undertrained):
    """With each 'transcoder' replaced by its exact MLP the KL part is 0; the local part is each layer's FVU."""
    model, enc, path = undertrained
    tcs = trainable_copy(load_transcoders(path, model=model))
    ex = held_out(enc)[:4]
    pad = enc.tokenizer.pad_token_id
    loss, parts = tune_loss(model, tcs, ex, pad, local_coef=0.5)
    assert loss.item() == pytest.approx(parts["kl"] + 0.5 * parts["fvu"], rel=1e-5)
    assert parts["kl"] > 0 and 0 < parts["fvu"] < 2
    from crv.transcoders.activations import mlp_modules

    exact = [type("Exact", (torch.nn.Module,), {"forward": lambda self, x, m=m: m.forward(x)})() for m in mlp_modules(model)]
    _, same = tune_loss(model, exact, ex, pad, local_coef=1.0)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["fvu"] == pytest.approx(0.0, abs=1e-6)
    assert same["agreement"] == 1.0
