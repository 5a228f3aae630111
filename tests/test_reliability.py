"""Errors that name the real cause and the fix (one line, no traceback), and files that are never mistaken for data."""

import json
import sys
from pathlib import Path

import pytest
import torch

from crv.cli import main
from crv.tasks.cot import generate_problems
from crv.tasks.label import label_output
from crv.tasks.schema import write_records
from crv.transcoders.io import TranscoderLoadError, load_transcoders, save_transcoders
from crv.transcoders.transcoder import TopKTranscoder, TranscoderShape


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["crv", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


def tiny_set(path: Path) -> Path:
    tcs = [TopKTranscoder(TranscoderShape(16, 32, 4), i) for i in range(2)]
    for t in tcs:
        t.reset_parameters()
    save_transcoders(tcs, path, "tiny", dtype=torch.float32)
    return path


def test_a_stray_file_beside_the_layers_is_not_a_layer(tmp_path):
    ts = tiny_set(tmp_path / "tc")
    cfg = (ts / "config.yaml").read_text().split("transcoders:")[0]  # no file list: layers are found by name
    (ts / "config.yaml").write_text(cfg)
    (ts / "layer_final.safetensors").write_bytes((ts / "layer_1.safetensors").read_bytes())
    assert len(load_transcoders(ts)) == 2


def test_a_transposed_encoder_is_named_as_such(tmp_path):
    from safetensors.torch import load_file, save_file

    ts = tiny_set(tmp_path / "tc")
    for f in ts.glob("layer_*.safetensors"):
        w = load_file(f)
        save_file({**w, "W_enc": w["W_enc"].T.contiguous()}, str(f))
    with pytest.raises(TranscoderLoadError, match=r"transposed: .*\[d_transcoder, d_model\]"):
        load_transcoders(ts)


def test_a_bin_only_model_is_told_how_to_convert_it(tmp_path, tiny_gqa_llama_dir, monkeypatch, capsys):
    import shutil

    d = tmp_path / "binmodel"
    shutil.copytree(tiny_gqa_llama_dir, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    code, _, err = run_cli(monkeypatch, capsys, "generate", "--model", str(d), "--out", str(tmp_path / "r.jsonl"))
    assert code == 2 and "safe_serialization=True" in err and "never unpickles" in err and "Traceback" not in err


def test_verify_against_a_server_that_is_not_there_is_one_line(tmp_path, monkeypatch, capsys):
    prob = generate_problems("arith", 2, 1, seed=1)[0]
    write_records([label_output(prob, prob.completion)], tmp_path / "r.jsonl")
    code, _, err = run_cli(monkeypatch, capsys, "verify", str(tmp_path / "r.jsonl"), "--server", "http://127.0.0.1:9")
    assert code != 0 and "Traceback" not in err and err.strip().count("\n") == 0, err


def test_temp_files_of_a_killed_writer_are_cleaned_and_never_entries(tmp_path):
    from crv.extract.store import TraceStore

    (tmp_path / "ab").mkdir(parents=True)
    dead = tmp_path / "ab" / ".abcdef.999999999.tmp.json"  # a pid that cannot exist
    dead.write_text("{}")
    live = tmp_path / "ab" / f".abcdef.{__import__('os').getpid()}.tmp.json"  # a writer still running
    live.write_text("{}")
    store = TraceStore(tmp_path)
    assert not dead.exists() and live.exists()
    assert store.keys() == []


def test_label_says_so_when_no_rollout_reaches_any_answer(tmp_path, monkeypatch, capsys):
    prob = generate_problems("arith", 2, 2, seed=3)
    recs = [label_output(p, p.completion) for p in prob]
    for r in recs:
        r.answer = "123456789"  # unreachable: every rollout misses it
    write_records(recs, tmp_path / "r.jsonl")
    code, _, err = run_cli(monkeypatch, capsys, "label", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                           "--rollouts", "1", "--max-new-tokens", "40")
    assert code == 1 and "no rollout reached" in err
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])["labels"]  # the file is still written


def test_an_attributor_spec_round_trips_through_json(tiny_gqa_llama_dir, tmp_path):
    """What a Ray worker (or a classifier's metadata) receives rebuilds the same attributor: same ids, settings."""
    from crv.attribution.attributor import Attributor, AttributorSpec
    from crv.attribution.engine import AttributionConfig

    ts = tiny_set(tmp_path / "tc")
    model, _ = __import__("crv.lm.load", fromlist=["load_model"]).load_model(tiny_gqa_llama_dir)
    tcs = [TopKTranscoder(TranscoderShape(model.config.hidden_size, 32, 4), i) for i in range(2)]
    for t in tcs:
        t.reset_parameters()
    save_transcoders(tcs, ts, "tiny", dtype=torch.float32)
    att = Attributor.load(tiny_gqa_llama_dir, ts, AttributionConfig(max_feature_nodes=33, batch_size=16))
    spec = AttributorSpec.from_dict(json.loads(json.dumps(att.spec.to_dict())))
    again = Attributor.from_spec(spec)
    assert spec == att.spec and again.model_id == att.model_id and again.config == att.config
    assert again.transcoders.checksum() == att.transcoders.checksum()
