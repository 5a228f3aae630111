"""Transcoder sets in every format circuit-tracer reads, lazy reads, file dtypes, identity and devices.

Each tiny set is written in circuit-tracer's per-layer layout and attributed by crv and by
circuit-tracer 0.5.0 (its own activation: unpatched for relu / jumprelu, its TopK class for topk).
"""

from pathlib import Path

import pytest

from crv.testing.peer import require_circuit_tracer
import torch
import yaml

from crv.attribution.attributor import Attributor
from crv.testing.checks import completeness
from crv.attribution.engine import AttributionConfig, TraceAttribution
from crv.lm.load import load_model
from crv.transcoders.activation_functions import JumpReLU, ReLU, TopK, TopKReLU
from crv.transcoders.formats import TranscoderFormatError, read_format
from crv.transcoders.io import load_transcoders, save_transcoders
from crv.transcoders.safetensors_file import SafetensorsFile
from crv.transcoders.transcoder import Transcoder

TEXT = "Q: (4-2)*3+5\n4-2=2 => 2*3+5\n"
D_MODEL, D_TC, K = 32, 96, 6


def make_set(path: Path, activation: str, skip: bool, dtype=torch.float32, seed: int = 0, layers: int = 2) -> Path:
    """Random transcoders of one format, scaled so that a few features per token fire."""
    g = torch.Generator().manual_seed(seed)
    tcs = []
    for layer in range(layers):
        act = {"topk": TopK(K), "topk_relu": TopKReLU(K), "relu": ReLU(),
               "jumprelu": JumpReLU(0.3 + 0.2 * torch.rand(D_TC, generator=g))}[activation]
        tc = Transcoder(D_MODEL, D_TC, act, layer, skip=skip)
        with torch.no_grad():
            for name, p in tc.named_parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            # relu / jumprelu: sparse, a few features per token; topk: some of the k largest are negative
            tc.b_enc.sub_({"topk": 3.0, "topk_relu": 2.0, "relu": 1.5, "jumprelu": 1.2}[activation])
            if skip:
                tc.W_skip.mul_(0.1)  # larger random skips make rows cancel to far beyond float32 precision
        tcs.append(tc)
    save_transcoders(tcs, path, model_name="tiny-llama", dtype=dtype)
    return path


FORMATS = [("topk", False), ("topk_relu", False), ("relu", False), ("jumprelu", False),
           ("topk", True), ("relu", True), ("jumprelu", True)]


@pytest.mark.slow
@pytest.mark.parametrize("activation,skip", FORMATS)
def test_every_format_gives_circuit_tracers_graph(tiny_gqa_llama_dir, tmp_path, activation, skip):
    require_circuit_tracer()
    from crv.testing.peer import CircuitTracerPeer, compare_graphs

    tc_dir = make_set(tmp_path / "tc", activation, skip)
    att = Attributor.load(tiny_gqa_llama_dir, tc_dir)
    assert att.transcoders.format.activation == activation and att.transcoders.format.skip == skip
    ids = att.encode(TEXT)
    tr = TraceAttribution(att.model, att.transcoders, ids, AttributionConfig(max_feature_nodes=None))
    c = completeness(tr)
    assert c.feature_rel_error <= 1e-4 and c.logit_rel_error <= 1e-4, c
    if activation == "topk":
        assert (tr.lin.features.act < 0).any(), "TopK without ReLU keeps negative activations"
    peer = CircuitTracerPeer.load(tiny_gqa_llama_dir, tc_dir)
    for cap in (None, 40):
        cfg = AttributionConfig(max_feature_nodes=cap)
        mine = TraceAttribution(att.model, att.transcoders, ids, cfg).graph()
        report = compare_graphs(mine, peer.graph(ids, cfg))
        assert report.ok(), (activation, skip, cap, report)


def _write_config(path: Path, **changes) -> None:
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_missing_k_is_refused_with_the_fix_and_accepted_with_k(tiny_gqa_llama_dir, tmp_path):
    tc_dir = make_set(tmp_path / "tc", "topk", skip=False)
    model, _ = load_model(tiny_gqa_llama_dir)
    ids = Attributor.load(tiny_gqa_llama_dir, tc_dir).encode(TEXT)
    before = TraceAttribution(model, load_transcoders(tc_dir, model=model), ids).graph()
    _write_config(tc_dir, k=None)
    with pytest.raises(TranscoderFormatError) as err:
        load_transcoders(tc_dir, model=model)
    for fix in ("--k", "k=", "facebook/crv-8b-instruct-transcoders", "k=128"):
        assert fix in str(err.value)
    ts = load_transcoders(tc_dir, model=model, k=K)
    after = TraceAttribution(model, ts, ids).graph()
    assert torch.equal(before.adjacency, after.adjacency)
    assert Attributor.load(tiny_gqa_llama_dir, tc_dir, k=K).transcoders.k == K


def test_config_reading_rules():
    cfg_path = Path("/sets/x/config.yaml")
    plain = [{"W_enc", "W_dec", "b_enc", "b_dec"}] * 2
    thresh = [n | {"activation_function.threshold"} for n in plain]
    # the CRV 8B set: no activation, no k, recognised by its hub id -> TopK k=128
    crv8b = {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
             "transcoders": [f"hf://facebook/crv-8b-instruct-transcoders/layer_{i}.safetensors" for i in range(2)]}
    fmt = read_format(crv8b, cfg_path, plain)
    assert (fmt.activation, fmt.k) == ("topk", 128) and fmt.notes
    assert read_format(crv8b, cfg_path, plain, k=64).k == 64
    # circuit-tracer's rule when nothing is said: threshold -> jumprelu, else relu
    assert read_format({}, cfg_path, thresh).activation == "jumprelu"
    assert read_format({}, cfg_path, plain).activation == "relu"
    assert read_format({"activation": "jump_relu"}, cfg_path, thresh).activation == "jumprelu"
    # a `crv` entry (crv's training record) never changes an explicit activation
    assert read_format({"activation": "topk", "k": 4, "crv": {}}, cfg_path, plain).activation == "topk"
    assert read_format({"activation": "topk_relu", "k": 4, "crv": {}}, cfg_path, plain).activation == "topk_relu"
    # an integer k tensor in the files gives k (and TopK) where the config says nothing
    assert (read_format({}, cfg_path, plain, file_k=7).activation, read_format({}, cfg_path, plain, file_k=7).k) == ("topk", 7)
    refusals = [
        ({"model_kind": "cross_layer_transcoder"}, plain, "cross-layer"),
        ({"activation": "jumprelu"}, plain, "needs activation_function.threshold"),
        ({"activation": "relu"}, thresh, "set activation: jumprelu"),
        ({"activation": "gelu"}, plain, "not one crv reads"),
        ({"feature_input_hook": "hook_resid_mid"}, plain, "mlp.hook_in"),
        ({"feature_input_hook": "ln2.hook_normalized"}, plain, "before the post-attention norm's gain"),
        ({"feature_output_hook": "hook_resid_post"}, plain, "mlp.hook_out"),
        ({}, [{"W_enc", "W_dec", "b_enc"}] * 2, "lacks b_dec"),
        ({}, [plain[0], plain[0] | {"W_skip"}], "disagree"),
    ]
    for cfg, names, message in refusals:
        with pytest.raises(TranscoderFormatError, match=message):
            read_format(cfg, cfg_path, names)


def test_a_k_tensor_in_the_files_is_read_as_k(tiny_gqa_llama_dir, tmp_path):
    """Files saved from a state_dict carry TopK's k as an int64 tensor: read, not refused, and the graph is unchanged."""
    from safetensors.torch import load_file, save_file

    tc_dir = make_set(tmp_path / "tc", "topk", skip=False)
    model, _ = load_model(tiny_gqa_llama_dir)
    ids = Attributor.load(tiny_gqa_llama_dir, tc_dir).encode(TEXT)
    before = TraceAttribution(model, load_transcoders(tc_dir, model=model), ids).graph()
    _write_config(tc_dir, k=None, activation=None)
    for f in tc_dir.glob("layer_*.safetensors"):
        save_file({**load_file(f), "k": torch.tensor(K, dtype=torch.int64)}, str(f))
    ts = load_transcoders(tc_dir, model=model)
    assert (ts.format.activation, ts.format.k) == ("topk", K) and "k tensor" in " ".join(ts.format.notes)
    assert torch.equal(TraceAttribution(model, ts, ids).graph().adjacency, before.adjacency)
    save_file({**load_file(tc_dir / "layer_1.safetensors"), "k": torch.tensor(K + 1)}, str(tc_dir / "layer_1.safetensors"))
    with pytest.raises(ValueError, match="disagree on k"):
        load_transcoders(tc_dir, model=model)


def test_lazy_loader_reads_only_active_decoder_rows(tiny_gqa_llama_dir, tmp_path, monkeypatch):
    tc_dir = make_set(tmp_path / "tc", "relu", skip=False)
    model, _ = load_model(tiny_gqa_llama_dir)
    eager = load_transcoders(tc_dir, model=model, resident=True)
    lazy = load_transcoders(tc_dir, model=model, resident=False)
    real_read = SafetensorsFile.read

    def read(self, name):  # a whole W_dec / W_enc must never be read by the lazy path
        assert name not in ("W_dec", "W_enc"), f"read the whole {name}"
        return real_read(self, name)

    ids = Attributor.load(tiny_gqa_llama_dir, tc_dir).encode(TEXT)
    ref = TraceAttribution(model, eager, ids).graph()
    monkeypatch.setattr(SafetensorsFile, "read", read)
    tr = TraceAttribution(model, lazy, ids)
    assert torch.equal(tr.graph().adjacency, ref.adjacency)
    f = tr.lin.features
    distinct = sum(len(f.feat[f.layer == l].unique()) for l in range(len(lazy)))
    row = D_MODEL * 4
    assert lazy.bytes_read()["W_dec"] == distinct * row < len(lazy) * D_TC * row


def test_bf16_weights_match_their_float32_values(tiny_gqa_llama_dir, tmp_path):
    """bf16 files are computed in float32: the same graph as float32 files holding the bf16-rounded values."""
    make_set(tmp_path / "bf16", "topk", skip=True, dtype=torch.bfloat16)
    up = tmp_path / "upcast"
    up.mkdir()
    for f in (tmp_path / "bf16").glob("layer_*.safetensors"):
        from safetensors.torch import load_file, save_file

        save_file({k: v.float() for k, v in load_file(f).items()}, str(up / f.name))
    (up / "config.yaml").write_text((tmp_path / "bf16" / "config.yaml").read_text())
    model, _ = load_model(tiny_gqa_llama_dir)
    ids = Attributor.load(tiny_gqa_llama_dir, up).encode(TEXT)
    half = load_transcoders(tmp_path / "bf16", model=model, resident=False)
    assert half[0].encoder_rows(torch.tensor([0])).dtype == torch.bfloat16  # kept in the file dtype
    a = TraceAttribution(model, half, ids).graph()
    b = TraceAttribution(model, load_transcoders(up, model=model), ids).graph()
    assert torch.equal(a.active_features, b.active_features) and torch.equal(a.selected_features, b.selected_features)
    assert (a.adjacency - b.adjacency).abs().max() <= 1e-5 * b.adjacency.abs().max()


def test_identity_sees_the_weight_bytes_and_hashes_each_file_once(tmp_path, monkeypatch):
    """Other weights under the same names, sizes and headers are another set; a set crv wrote is never hashed again
    while its files are unchanged (the digest manifest beside them)."""
    import crv.digest

    tc_dir = make_set(tmp_path / "tc", "relu", skip=False)
    hashed = []
    real = crv.digest.sha256_file
    monkeypatch.setattr(crv.digest, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    crv.digest._memory.clear()
    before = load_transcoders(tc_dir).checksum()
    assert hashed == []  # save_transcoders recorded the digests as it wrote the files
    f = tc_dir / "layer_1.safetensors"
    data = bytearray(f.read_bytes())
    data[-64:] = bytes(64)  # overwrite weight bytes, same size, same header
    f.write_bytes(bytes(data))
    after = load_transcoders(tc_dir).checksum()
    assert after != before and hashed == ["layer_1.safetensors"]
    assert load_transcoders(tc_dir).checksum() == after and hashed == ["layer_1.safetensors"]
    _write_config(tc_dir, activation="jumprelu")
    with pytest.raises(TranscoderFormatError):
        load_transcoders(tc_dir)
    _write_config(tc_dir, activation="relu", model_name="other")
    assert load_transcoders(tc_dir).checksum() != after


def test_a_model_with_other_weights_under_the_same_name_gets_another_id(tiny_gqa_llama_dir, tmp_path):
    """The experiment of the reliability report: a copy of a model with other weights (same names, sizes, headers) in
    a directory of the same name must not share its id, so stored entries are not reused for it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from crv.attribution.attributor import model_checksum

    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_gqa_llama_dir, a)
    shutil.copytree(tiny_gqa_llama_dir, b)
    w = load_file(b / "model.safetensors")
    save_file({k: (v.flip(0) if v.ndim else v).contiguous() for k, v in w.items()}, str(b / "model.safetensors"),
              metadata={"format": "pt"})
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert model_checksum(a) != model_checksum(b) and model_checksum(a) == model_checksum(tiny_gqa_llama_dir)


def test_no_engine_tensor_is_created_without_a_device(tiny_gqa_llama_dir, tmp_path):
    """With the default device set to ``meta`` any tensor made without ``device=`` has no data and breaks the graph."""
    tc_dir = make_set(tmp_path / "tc", "jumprelu", skip=True)
    att = Attributor.load(tiny_gqa_llama_dir, tc_dir, AttributionConfig(max_feature_nodes=30), device="cpu")
    ids = att.encode(TEXT)
    ref = TraceAttribution(att.model, att.transcoders, ids, att.config).graph()
    with torch.device("meta"):
        g = TraceAttribution(att.model, att.transcoders, ids, att.config).graph()
    assert g.adjacency.device.type == "cpu" and torch.equal(g.adjacency, ref.adjacency)


def test_cli_names_the_k_fix_and_takes_engine_options(tiny_gqa_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from crv.cli import app
    from crv.tasks.cot import generate_problems
    from crv.tasks.label import label_output
    from crv.tasks.schema import write_records

    prob = generate_problems("arith", 3, 1, seed=2)[0]
    rec = label_output(prob, prob.completion)
    write_records([rec], tmp_path / "r.jsonl")
    tc_dir = make_set(tmp_path / "tc", "topk", skip=False)
    _write_config(tc_dir, k=None)
    args = ["attribute", str(tmp_path / "r.jsonl"), "--model", str(tiny_gqa_llama_dir), "--transcoders", str(tc_dir),
            "--out", str(tmp_path / "graphs"), "--max-feature-nodes", "20", "--batch-size", "8", "--device", "cpu"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and "--k" in refused.output
    done = CliRunner().invoke(app, [*args, "--k", str(K), "--dtype", "bfloat16"])
    assert done.exit_code == 0, done.output
    assert len(list((tmp_path / "graphs").rglob("*.json.gz"))) == len(rec.steps)
