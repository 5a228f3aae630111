"""A tiny reasoner trained inside the test, and the shipped one."""

import pytest
from crv.lm.encode import TraceEncoder
from crv.lm.prompt import PlainFormat
from crv.reasoner.generate import GenerationConfig, complete, generate_records
from crv.lm.load import DEFAULT_MODEL_DIR, load_model
from crv.tasks.cot import Problem, generate_problems
from crv.tasks.schema import read_records, write_records


@pytest.fixture
def tiny(tiny_reasoner_dir):
    return tiny_reasoner_dir


def test_tiny_training_lowers_loss(tiny):
    import json

    log = json.loads((tiny / "train_log.json").read_text())
    assert log[-1]["loss"] < 0.75 * log[0]["loss"]  # from uniform (ln 100) towards the data


@pytest.mark.slow
def test_tiny_reasoner_generates_valid_records(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model(tiny)
    problems = generate_problems("arith", 2, 6, seed=0) + generate_problems("bool", 2, 6, seed=0)
    enc = TraceEncoder(tok, PlainFormat())
    records = generate_records(model, enc, problems, GenerationConfig(batch_size=4), progress=False)
    assert [r.problem_id for r in records] == [p.problem_id for p in problems]
    path = tmp_path / "r.jsonl"
    write_records(records, path)
    assert read_records(path) == records  # every record passes schema validation
    # batching must not change greedy output
    prompts = [enc.prefix(p.task, p.question, []) for p in (problems[0], problems[7])]
    single = complete(model, enc, prompts[:1], 40)[0]
    batched = complete(model, enc, prompts, 40)[0]
    assert single == batched


def test_prompt_longer_than_context_is_refused(tiny):
    model, tok = load_model(tiny)
    with pytest.raises(ValueError, match="does not fit"):
        enc = TraceEncoder(tok, PlainFormat())
        complete(model, enc, [enc.prefix("arith", "1+" * 200 + "1", [])], 10)


def test_shipped_reasoner_loads_offline_and_solves_easy_problems(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = load_model()  # models/reasoner
    assert DEFAULT_MODEL_DIR.joinpath("model.safetensors").is_file()
    assert tok.bos_token_id != 0
    easy = [Problem("e1", "arith", 1, "3+4", "7"), Problem("e2", "bool", 1, "True and False", "False"),
            Problem("e3", "arith", 2, "(2*3)+1", "7")]
    records = generate_records(model, TraceEncoder(tok, PlainFormat()), easy, progress=False)
    for r in records:
        assert r.solved and r.labels == [1] * len(r.labels) and len(r.labels) == r.n, r


@pytest.mark.parametrize(
    "bad", [{"n_min": 0}, {"n_min": 6, "n_max": 5}, {"task_weights": (("arith", 0.0), ("bool", 0.0))}, {"iterations": 0}]
)
def test_train_config_rejects_bad_settings(bad):
    from crv.reasoner.train import TrainConfig

    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_training_stream_respects_the_difficulty_range():
    from crv.reasoner.tokenizer import build_tokenizer
    from crv.reasoner.train import BatchStream, TrainConfig

    stream = BatchStream(TrainConfig(n_min=4, n_max=4, task_weights=(("arith", 1.0),)), build_tokenizer(), pool=16)
    ids, _ = next(stream)
    tok = build_tokenizer()
    for row in ids:
        text = tok.decode(row, skip_special_tokens=True)
        assert text.count(" => ") == 4, text  # one reduction per operator


def test_generation_budget_counts_the_models_tokens():
    """The new-token budget is in tokens: equal to the character count on the char-level reasoner, and on a BPE
    model the reference completion's token count (a character budget let one looping row hold a batch 3-5x longer)."""
    from test_real_models import byte_level_bpe

    from crv.reasoner.generate import token_budget
    from crv.reasoner.tokenizer import build_tokenizer

    problems = generate_problems("arith", 4, 3, seed=1)
    cfg = GenerationConfig()
    chars = max(max(int(cfg.length_factor * len(p.completion)) + cfg.slack, (p.n + 1) * (len(p.question) + cfg.slack))
                for p in problems)
    assert token_budget(TraceEncoder(build_tokenizer(), PlainFormat()), problems, cfg) == chars
    bpe = byte_level_bpe()
    tokens = max(max(int(cfg.length_factor * len(bpe(p.completion, add_special_tokens=False)["input_ids"])) + cfg.slack,
                     (p.n + 1) * (len(bpe(p.question, add_special_tokens=False)["input_ids"]) + cfg.slack))
                 for p in problems)
    assert token_budget(TraceEncoder(bpe, PlainFormat()), problems, cfg) == tokens < chars
