import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from crv.lm.encode import TraceEncoder
from crv.lm.prompt import PlainFormat
from crv.lm.load import load_model
from crv.transcoders.activations import cot_sequences, encode_batch
from crv.transcoders.io import DEFAULT_TRANSCODER_DIR, TranscoderLoadError, load_transcoders, save_transcoders
from crv.transcoders.metrics import layer_quality, replaced_mlps
from crv.transcoders.train import TranscoderTrainConfig, resample_dead, train_transcoders
from crv.transcoders.transcoder import TopKTranscoder, TranscoderShape

SHAPE = TranscoderShape(d_model=16, d_transcoder=64, k=5)


def random_transcoder(layer=0, seed=0):
    tc = TopKTranscoder(SHAPE, layer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return tc


def test_shapes_and_exact_topk_sparsity():
    tc = random_transcoder()
    with torch.no_grad():
        tc.b_enc.fill_(100.0)  # every pre-activation positive: exactly k survive
    x = torch.randn(7, 3, SHAPE.d_model)
    feats = tc.encode(x)
    assert feats.shape == (7, 3, SHAPE.d_transcoder)
    assert ((feats != 0).sum(-1) == SHAPE.k).all()
    assert tc(x).shape == x.shape
    pre = tc.pre_activations(x)
    kept = pre.topk(SHAPE.k, -1).values
    assert torch.allclose(feats.sort(-1, descending=True).values[..., : SHAPE.k], kept)
    with torch.no_grad():
        tc.b_enc.fill_(-100.0)  # nothing positive: TopK keeps none (ReLU)
    assert (tc.encode(x) == 0).all()


def test_invalid_k_is_rejected():
    with pytest.raises(ValueError, match="k must be"):
        TranscoderShape(d_model=4, d_transcoder=8, k=9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    tcs = [random_transcoder(i, seed=i) for i in range(3)]
    save_transcoders(tcs, tmp_path, "toy", dtype=dtype)
    for resident in (True, False):
        loaded = load_transcoders(tmp_path, d_model=SHAPE.d_model, n_layers=3, resident=resident)
        assert (loaded.shape.d_model, loaded.shape.d_transcoder, len(loaded)) == (SHAPE.d_model, SHAPE.d_transcoder, 3)
        assert loaded.format.activation == "topk_relu" and loaded.k == SHAPE.k
        everything = torch.arange(SHAPE.d_transcoder)
        for tc, back in zip(tcs, loaded):
            assert torch.equal(tc.W_enc.to(dtype), back.encoder_rows(everything))  # weights stay in the file dtype
            assert torch.equal(tc.W_dec.to(dtype), back.decoder_rows(everything))
            assert torch.equal(tc.b_enc.to(dtype).float(), back.b_enc) and torch.equal(tc.b_dec.to(dtype).float(), back.b_dec)


def test_loader_rejects_missing_layers_and_wrong_shapes(tmp_path):
    tcs = [random_transcoder(i) for i in range(2)]
    save_transcoders(tcs, tmp_path, "toy")
    with pytest.raises(TranscoderLoadError, match="d_model=16, the model has 32"):
        load_transcoders(tmp_path, d_model=32)
    with pytest.raises(TranscoderLoadError, match="layer 2 is missing"):
        load_transcoders(tmp_path, n_layers=3)
    state = load_file(tmp_path / "layer_1.safetensors")
    state["W_dec"] = state["W_dec"][:, :8].contiguous()
    save_file(state, tmp_path / "layer_1.safetensors")
    with pytest.raises(TranscoderLoadError, match=r"layer_1.safetensors: W_dec has shape \[64, 8\], expected \[64, 16\]"):
        load_transcoders(tmp_path)
    (tmp_path / "layer_1.safetensors").unlink()
    with pytest.raises(TranscoderLoadError, match="layer 1 is missing"):
        load_transcoders(tmp_path)
    with pytest.raises(TranscoderLoadError, match="config.yaml is missing"):
        load_transcoders(tmp_path / "nowhere")


def test_tiny_transcoders_learn(tiny_reasoner_dir, tmp_path):
    model, tok = load_model(tiny_reasoner_dir)
    cfg = TranscoderTrainConfig(expansion=4, k=4, steps=40, batch_tokens=256, buffer_tokens=2048, dead_tokens=4000, warmup=5)
    enc = TraceEncoder(tok, PlainFormat())
    texts = cot_sequences(enc, random.Random(123), 16, n_max=3)
    out = tmp_path / "tc"
    train_transcoders(model, enc, cfg, out, progress=False)
    trained = load_transcoders(out, model=model)
    fvu_trained = [q.fvu for q in layer_quality(model, trained, texts, tok.pad_token_id)]
    short = tmp_path / "short"
    train_transcoders(model, enc, TranscoderTrainConfig(**{**cfg.__dict__, "steps": 2}), short, progress=False)
    fvu_short = [q.fvu for q in layer_quality(model, load_transcoders(short, model=model), texts, tok.pad_token_id)]
    assert all(a < 0.7 * b for a, b in zip(fvu_trained, fvu_short)), (fvu_trained, fvu_short)


def test_transcoder_training_resumes_from_its_checkpoint(tiny_reasoner_dir, tmp_path):
    """A stopped run's checkpoint restores every layer exactly; a resumed run continues its step count and log."""
    import json

    model, tok = load_model(tiny_reasoner_dir)
    enc = TraceEncoder(tok, PlainFormat())
    cfg = TranscoderTrainConfig(expansion=4, k=4, steps=6, batch_tokens=128, buffer_tokens=1024, dead_tokens=4000, warmup=2)
    first = train_transcoders(model, enc, cfg, tmp_path / "tc", progress=False, checkpoint_seconds=1e9)
    stopped = json.loads((tmp_path / "tc" / "checkpoint" / "checkpoint.json").read_text())
    assert stopped["step"] == 5
    again = train_transcoders(model, enc, cfg, tmp_path / "tc", progress=False, resume=True)  # nothing left to do
    for a, b in zip(first, again):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    longer = TranscoderTrainConfig(**{**cfg.__dict__, "steps": 10})
    train_transcoders(model, enc, longer, tmp_path / "tc", progress=False, resume=True)
    meta = json.loads((tmp_path / "tc" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["step"] == 9 and meta["log"][-1]["step"] == 9
    assert meta["log"][: len(stopped["log"])] == stopped["log"]  # the stopped run's log (and times) carried on
    with pytest.raises(ValueError, match="other settings"):
        train_transcoders(model, enc, TranscoderTrainConfig(**{**cfg.__dict__, "k": 3}), tmp_path / "tc", progress=False,
                          resume=True)


def test_resampling_revives_dead_features():
    gen = torch.Generator().manual_seed(0)
    tc = TopKTranscoder(TranscoderShape(16, 64, 4), 0)
    tc.reset_parameters(gen)
    x, y = torch.randn(200, 16, generator=gen), torch.randn(200, 16, generator=gen)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    with torch.no_grad():
        tc.b_enc[:10] = -1e4  # these ten can never win the TopK
    assert not (tc.encode(x)[:, :10] > 0).any()
    alive_before = tc.W_enc[10:].clone()
    idx = resample_dead(tc, dead, x, y, gen)
    assert idx.tolist() == list(range(10))
    assert torch.equal(tc.W_enc[10:], alive_before)
    assert torch.allclose(tc.W_dec[:10].norm(dim=-1), torch.ones(10))
    revived = (tc.encode(x)[:, :10] > 0).any(0)
    assert revived.float().mean() >= 0.8, revived


def test_replacement_hooks_are_removed(tiny_reasoner_dir, tmp_path):
    model, tok = load_model(tiny_reasoner_dir)
    ids, _ = encode_batch([TraceEncoder(tok, PlainFormat()).prefix("arith", "1+2", [])], tok.pad_token_id)
    before = model(input_ids=ids).logits
    shape = TranscoderShape(32, 64, 4)
    ts = [TopKTranscoder(shape, i) for i in range(2)]
    for t in ts:
        t.reset_parameters()
    save_transcoders(ts, tmp_path, "tiny", dtype=torch.float32)
    with replaced_mlps(model, load_transcoders(tmp_path, model=model)):
        during = model(input_ids=ids).logits
    # the same replacement written out with the in-memory transcoders (another code path): layer i's MLP -> ts[i]
    # at every position but the lead token's, whose MLP outputs stay the model's (no features there, as in the graphs)
    mlps = [layer.mlp for layer in model.model.layers]
    handles = [m.register_forward_hook(lambda mod, args, out, t=t: torch.cat([out[:, :1], t(args[0])[:, 1:]], 1))
               for m, t in zip(mlps, ts)]
    try:
        reference = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(during, reference, atol=1e-5) and not torch.allclose(before, reference, atol=1e-3)
    assert torch.allclose(during[:, 0], before[:, 0], atol=1e-6)  # position 0 sees only itself: unchanged
    assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.slow
def test_shipped_transcoders_meet_targets():
    model, tok = load_model()
    ts = load_transcoders(DEFAULT_TRANSCODER_DIR, model=model)
    texts = cot_sequences(TraceEncoder(tok, PlainFormat()), random.Random(99), 120)  # ~30k tokens: fewer would call rare features dead
    for q in layer_quality(model, ts, texts, tok.pad_token_id):
        assert q.fvu <= 0.10, q
        assert q.dead_fraction <= 0.10, q
        assert q.l0 <= ts.k


def test_a_shared_prompt_is_run_once_and_counted_once(tiny_reasoner_dir):
    """counted_mlp_io (shared prefix through the KV cache) gives the same activations as full forwards."""
    from crv.transcoders.activations import counted_mlp_io, mlp_io

    model, tok = load_model(tiny_reasoner_dir)
    enc = TraceEncoder(tok, PlainFormat())
    shared = "(1+2)*(3-4)+(5*6)-7"
    seqs = [enc.prefix("arith", shared + tail, []) for tail in ("+1", "*2-3", "-(4)")]
    ids, mask = encode_batch(seqs, tok.pad_token_id)
    n_shared = len(enc.prefix("arith", shared, [])) - 1  # the newline differs
    assert int(mask.sum()) == sum(len(s) for s in seqs) - 1 - 2 * n_shared  # position 0 never, the prefix once
    x, y = counted_mlp_io(model, seqs, tok.pad_token_id)
    xr, yr = mlp_io(model, ids)
    torch.testing.assert_close(x, xr[:, mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, yr[:, mask], rtol=1e-4, atol=1e-4)


def test_pooled_training_resumes_bit_exactly(tiny_reasoner_dir, tmp_path, monkeypatch):
    """With an activation pool, batches are a pure function of (seed, step): a run stopped midway and
    resumed ends with exactly the weights of an uninterrupted run."""
    from crv.transcoders.activations import ActivationPool

    model, tok = load_model(tiny_reasoner_dir)
    enc = TraceEncoder(tok, PlainFormat())
    cfg = TranscoderTrainConfig(expansion=4, k=4, steps=12, batch_tokens=128, pool_tokens=512, dead_tokens=300,
                                warmup=2, resample_every=4)
    straight = train_transcoders(model, enc, cfg, tmp_path / "a", progress=False, checkpoint_seconds=0)

    real_batch = ActivationPool.batch

    def stop_at_7(self, step):
        if step == 7:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(ActivationPool, "batch", stop_at_7)
    with pytest.raises(KeyboardInterrupt):
        train_transcoders(model, enc, cfg, tmp_path / "b", progress=False, checkpoint_seconds=0)
    monkeypatch.setattr(ActivationPool, "batch", real_batch)
    resumed = train_transcoders(model, enc, cfg, tmp_path / "b", progress=False, resume=True, checkpoint_seconds=0)
    for a, b in zip(straight, resumed):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    pool = ActivationPool(model, enc, 128, 512, seed=0, progress=False)
    x, y = pool.batch(3)
    assert x.shape == (model.config.num_hidden_layers, 128, model.config.hidden_size) and x.dtype == torch.float32
    assert pool.per_epoch == 4 and not torch.equal(pool.batch(0)[0], pool.batch(4)[0])  # a new permutation each epoch


def test_replacement_quality_on_assistant_tokens_counts_only_their_predictions():
    """``starts`` = each trace's first step token; the metric equals a direct computation over the logits that
    predict the assistant tokens (and differs from the all-token one)."""
    import torch.nn.functional as F

    from crv.transcoders.activations import cot_examples
    from crv.transcoders.metrics import replacement_quality

    model, tok = load_model()
    ts = load_transcoders(DEFAULT_TRANSCODER_DIR, model=model)
    enc = TraceEncoder(tok, PlainFormat())
    examples = cot_examples(enc, random.Random(7), 6, n_max=3)
    seqs, starts = [e for e, _ in examples], [s for _, s in examples]
    for ids, s in examples:  # the assistant part is the steps and the answer line
        assert tok.decode(ids[:s]).endswith("\n") and "A: " in tok.decode(ids[s:]) and "A: " not in tok.decode(ids[:s])
    agree, kl, n = 0, 0.0, 0
    with torch.no_grad():
        for ids, s in examples:
            x = torch.tensor([ids])
            logp = F.log_softmax(model(input_ids=x).logits[0, s - 1 : len(ids) - 1].float(), -1)
            with replaced_mlps(model, ts):
                logq = F.log_softmax(model(input_ids=x).logits[0, s - 1 : len(ids) - 1].float(), -1)
            agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
            kl += float((logp.exp() * (logp - logq)).sum())
            n += logp.shape[0]
    q = replacement_quality(model, ts, seqs, tok.pad_token_id, batch=4, starts=starts)
    assert q.argmax_agreement == pytest.approx(agree / n) and q.mean_kl == pytest.approx(kl / n, rel=1e-4)
    assert replacement_quality(model, ts, seqs, tok.pad_token_id, batch=4).mean_kl != pytest.approx(q.mean_kl, rel=1e-4)
