"""Graphs as the paper computes them on the paths a user reaches: Llama-3-style BPE step prefixes, BOS-less
sequences, rope types and hooks crv must refuse, stop-token lists kept on import. Peer checks run circuit-tracer
0.5.0's ``attribute(prompt=<text>)`` on the same text and compare entry-wise."""

from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.lm.families import UnsupportedModelError, check_supported
from crv.tasks.cot import generate_problems
from crv.tasks.crv_release import read_crv_release
from crv.tasks.label import label_output
from crv.testing.peer import require_circuit_tracer
from crv.transcoders.io import save_transcoders
from crv.transcoders.transcoder import TopKTranscoder, TranscoderShape

FIXTURE = Path(__file__).parent / "fixtures" / "arith.nt3.annotated.json"
#: Llama-3's pre-tokenizer split (Qwen2 uses the same punctuation rule): punctuation and the newlines after it are one
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]
LLAMA3_TEMPLATE = ("{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                   "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
TEXT_FIRST_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant: {% endif %}")


def llama3_bpe(bos: bool = True, template: str = LLAMA3_TEMPLATE) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with Llama-3's split pattern, trained on the release fixture and crv's CoT text."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    texts = [r.text for r in read_crv_release(FIXTURE)] * 20
    texts += [p.prompt + p.completion for p in generate_problems("arith", 3, 300, seed=3)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>" if bos else None,
                                  eos_token="<|eot_id|>", pad_token="<|end_of_text|>", clean_up_tokenization_spaces=False,
                                  additional_special_tokens=[s for s in SPECIALS if s not in ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>")])
    tok.chat_template = template
    return tok


def tiny_pair(root: Path, tok: PreTrainedTokenizerFast, family: str = "llama", d_transcoder: int = 96) -> tuple[Path, Path]:
    """A random 2-layer model of ``family`` with non-unit norm gains and random TopK transcoders, saved."""
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    model = model_cls(cfg_cls(**shape))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = 1 + 0.2 * torch.randn_like(p)
    model.save_pretrained(root / family)
    tok.save_pretrained(root / family)
    tcs = []
    for layer in range(2):
        tc = TopKTranscoder(TranscoderShape(32, d_transcoder, 6), layer)
        for p in tc.parameters():
            p.data = 0.3 * torch.randn_like(p)
        tcs.append(tc)
    save_transcoders(tcs, root / f"{family}-tc", model_name=family, dtype=torch.float32)
    return root / family, root / f"{family}-tc"


@pytest.fixture(scope="module")
def llama3_dirs(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("llama3bpe"), llama3_bpe())


def test_release_step_prefixes_are_tokenized_as_the_paper_does(llama3_dirs):
    """Each step's ids are ``tok(text[:end_k])``; on this BPE the whole trace's ids differ at step ends, so those
    steps get their own forward, and their graph is computed at ``"."``, not at ``".\\n"``."""
    att = Attributor.load(*llama3_dirs, AttributionConfig(max_feature_nodes=None))
    records = read_crv_release(FIXTURE)
    differing = 0
    for rec in records:
        steps = att.record_steps(rec)
        for k in range(len(rec.steps)):
            view = steps.step(k)
            end = rec.step_chars[k][1]
            expected = att.tokenizer(rec.text[:end], add_special_tokens=False)["input_ids"]
            assert view.encoding.ids.tolist() == expected, (rec.problem_id, k)
            assert view.position == len(expected) - 1 and view.graph.n_pos == len(expected)
            assert att.tokenizer.decode(expected[-1:]).endswith(rec.steps[k][-1])  # the step's own last character
            assert "\n" not in att.tokenizer.decode(expected[-1:])
            differing += view.own_forward
    # the whole-trace ids join a non-final step's "." with its newline: the case this test is about must occur
    assert differing > 0


@pytest.mark.slow
def test_step_graphs_equal_circuit_tracer_on_the_prefix_text(llama3_dirs):
    """The release's steps and crv's own chat format, on Llama-3-style BPE: crv's step graph equals circuit-tracer's
    ``attribute(prompt=text[:end_k])``, same nodes in the same order and every edge entry-wise."""
    require_circuit_tracer()
    from crv.testing.peer import CircuitTracerPeer, compare_graphs

    model_dir, tc_dir = llama3_dirs
    cfg = AttributionConfig(max_feature_nodes=40, batch_size=16)
    att = Attributor.load(model_dir, tc_dir, cfg, prompt_format="chat")
    peer = CircuitTracerPeer.load(model_dir, tc_dir)
    prob = generate_problems("arith", 3, 1, seed=11)[0]
    own = label_output(prob, prob.completion)
    cases = [(r, k) for r in read_crv_release(FIXTURE)[:2] for k in range(len(r.steps))]
    cases += [(own, k) for k in range(len(own.steps))]
    checked_own_forward = 0
    for rec, k in cases:
        view = att.record_steps(rec).step(k)
        enc = att.encode_record(rec)
        prefix_text = enc.text[: enc.step_chars[k][1]]
        report = compare_graphs(view.graph, peer.graph(prefix_text, cfg))
        assert report.ok(), (rec.problem_id, k, report)
        checked_own_forward += view.own_forward
    assert checked_own_forward > 0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["plain_no_bos", "chat_starts_with_text"])
def test_bos_less_sequences_get_circuit_tracers_lead_token(tmp_path, case):
    """A Qwen3 without BOS in the plain format, and a chat template that starts with text: crv puts the token
    circuit-tracer prepends (first of BOS, PAD, EOS) at position 0, so the first real token keeps its features."""
    tok = llama3_bpe(bos=False, template=TEXT_FIRST_TEMPLATE)
    model_dir, tc_dir = tiny_pair(tmp_path, tok, "qwen3")
    fmt = "plain" if case == "plain_no_bos" else "chat"
    att = Attributor.load(model_dir, tc_dir, AttributionConfig(max_feature_nodes=None), prompt_format=fmt)
    prob = generate_problems("arith", 2, 1, seed=4)[0]
    rec = label_output(prob, prob.completion)
    enc = att.encode_record(rec)
    assert enc.text[0] not in "<" and int(enc.ids[0]) == tok.pad_token_id  # circuit-tracer's pick: no BOS, so PAD
    view = att.record_steps(rec).step(0)
    assert (view.graph.active_features[:, 1] == 1).any()  # the first real token has features
    require_circuit_tracer()
    from crv.testing.peer import CircuitTracerPeer, compare_graphs

    peer = CircuitTracerPeer.load(model_dir, tc_dir)
    report = compare_graphs(view.graph, peer.graph(enc.text[: enc.step_chars[0][1]], att.config))
    assert report.ok(), report


def test_length_dependent_rope_is_refused_with_its_name():
    for rope in ({"rope_type": "dynamic", "factor": 2.0}, {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}):
        cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64)
        cfg.rope_scaling = rope
        with pytest.raises(UnsupportedModelError, match=rope.get("rope_type", rope.get("type"))):
            check_supported(cfg)
    cfg.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
    check_supported(cfg)  # static: the same frequencies whatever the length


def test_import_keeps_a_list_of_stop_ids(tmp_path):
    """A Llama-3-style generation config lists several stop ids; the import adds the turn end, drops none."""
    from crv.lm.importer import import_model
    from crv.lm.load import load_model, stop_token_ids

    tok = llama3_bpe()
    tok.eos_token = "<|begin_of_text|>"  # a GGUF-style wrong EOS, so the import fixes it
    src = tmp_path / "src"
    model_dir, _ = tiny_pair(tmp_path, tok)
    model, _ = load_model(model_dir)
    listed = [tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids("<|start_header_id|>")]
    model.generation_config.eos_token_id = listed
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = import_model(src, tmp_path / "imported")
    model2, tok2 = load_model(out)
    eot = tok2.convert_tokens_to_ids("<|eot_id|>")
    assert model2.generation_config.eos_token_id == listed + [eot]
    assert stop_token_ids(model2, tok2) >= set(listed) | {eot}


@pytest.mark.slow
def test_bfloat16_selects_as_circuit_tracer_in_bfloat16(tmp_path):
    """In bfloat16 the encoder runs in bf16 as circuit-tracer's does, so both pick the same active features (with
    4,096 features and k=6 the k-th value has near-ties that float32 breaks otherwise); edges (crv: float32 from bf16
    activations; circuit-tracer: bf16 backward passes) agree within bf16's precision."""
    require_circuit_tracer()
    from crv.testing.peer import CircuitTracerPeer

    model_dir, tc_dir = tiny_pair(tmp_path, llama3_bpe(), d_transcoder=4096)
    cfg = AttributionConfig(max_feature_nodes=None)
    att = Attributor.load(model_dir, tc_dir, cfg, dtype=torch.bfloat16)
    peer = CircuitTracerPeer.load(model_dir, tc_dir, dtype=torch.bfloat16)
    rec = read_crv_release(FIXTURE)[0]
    view = att.record_steps(rec).step(0)
    theirs = peer.graph(view.encoding.ids, cfg)
    assert torch.equal(view.graph.active_features, theirs.active_features)
    # logits: both read the same bf16 logits, but a flat random model has exact bf16 ties whose order differs
    mine_t, their_t = view.graph.logit_tokens.tolist(), theirs.logit_tokens.tolist()
    shared = [t for t in mine_t if t in their_t]
    assert len(shared) >= 0.8 * len(their_t), (mine_t, their_t)
    n = view.graph.adjacency.shape[0] - len(mine_t)
    a = torch.cat([view.graph.adjacency[:n], view.graph.adjacency[[n + mine_t.index(t) for t in shared]]])
    b = torch.cat([theirs.adjacency[:n], theirs.adjacency[[n + their_t.index(t) for t in shared]]])
    a, b = a[:, :n], b[:, :n]
    rel = ((a - b).norm() / b.norm()).item()
    print(f"bf16: {len(shared)}/{len(their_t)} logit tokens shared; adjacency relative Frobenius error {rel:.4f}")
    assert rel <= 0.05, rel  # bf16 carries 8 bits of mantissa: ~0.4% per product, summed over a path of a few


def test_interventions_refuse_records_with_their_own_text(llama3_dirs):
    """A release record is not re-rendered in crv's format for regeneration: it is refused, naming why."""
    from crv.interventions.regenerate import regenerate

    att = Attributor.load(*llama3_dirs)
    rec = read_crv_release(FIXTURE)[0]
    with pytest.raises(ValueError, match="carries its own text"):
        regenerate(att.model, att.encoder, att.transcoders, rec, 0)


def test_empty_steps_are_refused_at_validation_with_file_and_line(tmp_path):
    import json

    from crv.tasks.schema import RecordError, read_records

    prob = generate_problems("arith", 2, 1, seed=1)[0]
    good = label_output(prob, prob.completion).to_dict()
    bad = {**good, "problem_id": "bad", "steps": [good["steps"][0], "   "], "labels": [1, 1]}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r"r\.jsonl:2: step 1 is empty"):
        read_records(path)


def test_cli_errors_are_one_line_and_a_bad_record_does_not_stop_the_others(tmp_path, capsys, monkeypatch):
    """`crv attribute` on a missing file: one line, exit 2. A record the tokenizer cannot read is reported and
    skipped; the records after it still get their graphs."""
    import sys

    from crv.cli import main
    from crv.tasks.schema import write_records

    monkeypatch.setattr(sys, "argv", ["crv", "attribute", str(tmp_path / "none.jsonl")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("crv: error: no such dataset file") and err.count("\n") == 1
    recs = [label_output(p, p.completion) for p in generate_problems("arith", 2, 3, seed=2)]
    recs[1].question = recs[1].question + " é"  # a character the shipped char-level vocabulary lacks
    write_records(recs, tmp_path / "r.jsonl")
    out = tmp_path / "graphs"
    monkeypatch.setattr(sys, "argv", ["crv", "attribute", str(tmp_path / "r.jsonl"), "--out", str(out),
                                      "--max-feature-nodes", "32", "--threads", "1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 0
    captured = capsys.readouterr()
    assert f"skipped {recs[1].problem_id}" in captured.err and "skipped 1 record" in captured.out
    assert sorted(p.name for p in out.iterdir()) == sorted([recs[0].problem_id, recs[2].problem_id])


@pytest.mark.slow
def test_pruning_equals_circuit_tracers_prune_graph(llama3_dirs):
    """crv's prune on circuit-tracer's adjacency keeps exactly the nodes and edges circuit-tracer's ``prune_graph``
    keeps, at the paper's thresholds and at others, with the same cumulative scores."""
    require_circuit_tracer()
    import dataclasses

    from circuit_tracer.graph import prune_graph

    from crv.attribution.prune import prune
    from crv.testing.peer import CircuitTracerPeer

    model_dir, tc_dir = llama3_dirs
    cfg = AttributionConfig(max_feature_nodes=60, batch_size=16)
    att = Attributor.load(model_dir, tc_dir, cfg)
    peer = CircuitTracerPeer.load(model_dir, tc_dir)
    for rec in read_crv_release(FIXTURE)[:2]:
        view = att.record_steps(rec).step(len(rec.steps) - 1)
        theirs = peer.graph(view.encoding.ids, cfg)
        graph = dataclasses.replace(view.graph, adjacency=theirs.adjacency.clone())  # the same input for both
        for node_t, edge_t in ((0.8, 0.98), (0.5, 0.9), (0.95, 0.99)):
            mine = prune(graph, node_t, edge_t)
            ref = prune_graph(theirs.raw, node_t, edge_t)
            assert torch.equal(mine.node_mask, ref.node_mask.cpu()), (node_t, edge_t)
            dst, src = mine.edges()
            edge_mask = torch.zeros_like(ref.edge_mask.cpu())
            edge_mask[dst, src] = True
            assert torch.equal(edge_mask, ref.edge_mask.cpu()), (node_t, edge_t)
            assert torch.allclose(mine.cumulative_scores, ref.cumulative_scores.cpu().float(), atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_rows_equal_an_autograd_oracle_on_the_real_modules(family, tmp_path):
    """Qwen2's q/k/v biases (which circuit-tracer 0.5.0's nnsight backend cannot load), Qwen3's q/k norms and
    Llama: every edge of late-layer feature rows equals the frozen HF model's autograd derivative, entry-wise."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_real_models import _shape, _tiny
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from crv.attribution.engine import TraceAttribution
    from crv.reasoner.tokenizer import build_tokenizer
    from crv.testing.oracle import reading_gradients
    from crv.testing.peer import ROW_ATOL, RTOL

    tok = build_tokenizer()
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
               "llama": (LlamaConfig, LlamaForCausalLM)}[family]
    model_dir, tc_dir = _tiny(tmp_path, family, classes[0](**_shape(tok, tie_word_embeddings=False)), classes[1], tok)
    att = Attributor.load(model_dir, tc_dir)
    if family == "qwen2":
        assert att.model.model.layers[0].self_attn.v_proj.bias is not None
    prob = generate_problems("arith", 2, 1, seed=9)[0]
    ids = att.encode_record(label_output(prob, prob.completion)).ids
    tr = TraceAttribution(att.model, att.transcoders, ids, AttributionConfig(max_feature_nodes=None))
    lin, T = tr.lin, tr.lin.n_pos
    last = (lin.features.layer == lin.n_layers - 1).nonzero(as_tuple=True)[0]
    for t in last[torch.linspace(0, len(last) - 1, 4).long()].tolist():
        l, p, f = int(lin.features.layer[t]), int(lin.features.pos[t]), int(lin.features.feat[t])
        g, g_emb = reading_gradients(att.model, ids, att.transcoders[l].encoder_rows(torch.tensor([f]))[0], l, p)
        expected = torch.zeros(lin.n_sources)
        below = (lin.features.layer < l).nonzero(as_tuple=True)[0]
        dec = lin.scaled_decoders(below)
        expected[below] = (dec * g[lin.features.layer[below], lin.features.pos[below]]).sum(-1)
        for j in range(l):
            expected[lin.error_offset + j * T : lin.error_offset + (j + 1) * T] = (lin.errors[j] * g[j]).sum(-1)
        expected[lin.token_offset :] = (tr.cap.embed * g_emb).sum(-1)
        row = tr.feature_rows(torch.tensor([t]))[0]
        tol = RTOL * expected.abs() + ROW_ATOL * expected.abs().max()
        assert ((row - expected).abs() <= tol).all(), (family, t, (row - expected).abs().max())
        assert expected.abs().max() > 0


def test_a_token_straddling_two_steps_belongs_to_both_and_the_prefix_ends_inside_the_step():
    """A token holding the end of step 0, the newline and the start of step 1 (a tokenizer that merges across
    lines) is in both steps' spans; step 0's own prefix is tokenized without it."""
    from crv.lm.encode import spans_of

    offsets = [(0, 0), (0, 1), (1, 4), (4, 5), (5, 6)]  # BOS, "a", "b\nc" (straddles), "d", "\n"
    assert spans_of(offsets, [(0, 2), (3, 5)]) == ((1, 3), (2, 4))
    with pytest.raises(ValueError, match="no token covers"):
        spans_of(offsets, [(6, 6)])


def test_export_keeps_the_prompt_text_as_given(llama3_dirs):
    """circuit-tracer's frontend JSON carries the text the graph was computed on, not a join of per-token decodes
    (which turns a character split across byte-level tokens into U+FFFD)."""
    from crv.attribution.export import to_circuit_tracer_json

    att = Attributor.load(*llama3_dirs, AttributionConfig(max_feature_nodes=20))
    prob = generate_problems("arith", 2, 1, seed=3)[0]
    rec = label_output(prob, prob.completion)
    rec.question = rec.question + " — café"  # multi-byte characters the tiny BPE splits into byte tokens
    view = att.record_steps(rec).step(0)
    doc = to_circuit_tracer_json(view.graph, lambda t: att.tokenizer.decode([t]), "x")
    assert doc["metadata"]["prompt"] == view.encoding.text and "café" in doc["metadata"]["prompt"]
    assert "\ufffd" in "".join(doc["metadata"]["prompt_tokens"])  # what the old join would have shown
