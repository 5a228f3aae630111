"""Memory and time of one step graph at Llama-3.1-8B scale, measured on a few layers, projected to 32.

    python benchmarks/projection_8b.py                     # layers 1, 2, 4; 128 tokens; cap 4096
    python benchmarks/projection_8b.py --layers 1 2 --tokens 64

The CRV 8B transcoders (32 layers x 131,072 features, ~69 GB in bf16) and Llama-3.1-8B cannot be
downloaded here, so this builds their shapes with random weights: a Llama with d=4096, MLP 14,336,
GQA 32/8 heads, vocab 128,256 (bf16) but only L layers, and L per-layer TopK transcoders (k=128,
131,072 features, bf16 safetensors, no ReLU as in the CRV set). Each L runs in a fresh process
that loads the set lazily (``resident=False``: encoder read in row chunks, decoder rows only for
active features) and builds one step graph (capture, rows, greedy selection at the cap, adjacency);
its peak RSS and wall time are recorded. Memory is projected to 32 layers by the straight line
through the measured points (each point's model has that many layers, so the line carries the
per-layer weights); time by the quadratic through them (a feature row walks back through every
layer below it, so row cost grows ~L^2). Peak RSS is host memory on the CPU; on a GPU the same
tensors live in device memory.

Writes ``benchmarks/results/scale.json["projection_8b"]`` (other keys kept). The random sets go
under ``runs/synth8b`` (about 2.1 GB per layer) and are reused.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

RESULTS = Path(__file__).parent / "results"
WORK = Path(__file__).resolve().parents[1] / "runs" / "synth8b"
D, D_MLP, HEADS, KV, VOCAB, D_TC, K = 4096, 14336, 32, 8, 128256, 131072, 128
LAYER_PARAMS = D * (D + 2 * D // HEADS * KV + D) + 3 * D * D_MLP + 2 * D  # attention + MLP + norms


def build(layers: int, seed: int = 0) -> tuple[Path, Path]:
    """Random 8B-shaped model and transcoders with ``layers`` layers (made once, then reused)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from crv.reasoner.tokenizer import build_tokenizer

    model_dir, tc_dir = WORK / f"model_{layers}", WORK / "transcoders"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=D_MLP, num_hidden_layers=layers,
                          num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=8192,
                          rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = LlamaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
        model.save_pretrained(model_dir)
        build_tokenizer().save_pretrained(model_dir)  # the char tokenizer's ids all lie in the 128k vocabulary
        del model
    tc_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for layer in range(layers):
        f = tc_dir / f"layer_{layer}.safetensors"
        if f.is_file():
            continue
        w = torch.randn(D_TC, D, generator=g).div_(D**0.5).to(torch.bfloat16)
        save_file({"W_enc": w, "W_dec": torch.randn(D_TC, D, generator=g).div_(D**0.5).to(torch.bfloat16),
                   "b_enc": torch.zeros(D_TC, dtype=torch.bfloat16), "b_dec": torch.zeros(D, dtype=torch.bfloat16)}, str(f))
        del w
    names = [f"layer_{i}.safetensors" for i in range(layers)]
    cfg_dir = WORK / f"transcoders_{layers}"  # a config over the first `layers` files
    cfg_dir.mkdir(exist_ok=True)
    for n in names:
        if not (cfg_dir / n).exists():
            (cfg_dir / n).symlink_to(tc_dir / n)
    (cfg_dir / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n"
        f"activation: topk\nk: {K}\ntranscoders: [{', '.join(names)}]\n")
    return model_dir, cfg_dir


def measure(model_dir: str, tc_dir: str, tokens: int, cap: int, threads: int) -> dict:
    """One step graph in this process: its wall time and this process's peak RSS."""
    from crv.attribution.engine import AttributionConfig, TraceAttribution
    from crv.lm.load import load_model
    from crv.transcoders.io import load_transcoders

    torch.set_num_threads(threads)
    model, _ = load_model(model_dir, dtype=torch.bfloat16)
    ts = load_transcoders(tc_dir, model=model, resident=False)
    ids = torch.randint(3, 100, (tokens,))
    ids[0] = 1
    start = time.perf_counter()
    tr = TraceAttribution(model, ts, ids, AttributionConfig(max_feature_nodes=cap))
    forward_s = time.perf_counter() - start
    g = tr.graph()
    seconds = time.perf_counter() - start
    read = ts.bytes_read()
    return {"layers": len(ts), "tokens": tokens, "seconds": round(seconds, 2), "forward_and_encode_s": round(forward_s, 2),
            "n_active_features": int(g.meta["n_active_features"]), "n_selected": int(g.n_features),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "W_dec_read_fraction": round(read.get("W_dec", 0) / (len(ts) * D_TC * D * 2), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--max-feature-nodes", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure", nargs=2, metavar=("MODEL", "TRANSCODERS"), help=argparse.SUPPRESS)  # child process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.tokens, args.max_feature_nodes, args.threads)))
        return
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/projection_8b.py", *sys.argv[1:]])
    points = []
    for n in sorted(args.layers):
        model_dir, tc_dir = build(n)
        child = subprocess.run([sys.executable, __file__, "--measure", str(model_dir), str(tc_dir), "--tokens", str(args.tokens),
                                "--max-feature-nodes", str(args.max_feature_nodes), "--threads", str(args.threads)],
                               capture_output=True, text=True, check=True)
        points.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(points[-1], flush=True)
    L = np.array([p["layers"] for p in points], dtype=float)
    mem = np.array([p["peak_rss_gb"] for p in points])
    sec = np.array([p["seconds"] for p in points])
    mem_fit = np.polyfit(L, mem, 1) if len(L) > 1 else np.array([0.0, mem[0]])
    time_fit = np.polyfit(L, sec, min(2, len(L) - 1))
    last = points[-1]
    out = {
        "layers_measured": int(last["layers"]),
        "tokens": args.tokens,
        "peak_rss_gb": last["peak_rss_gb"],
        "ms_per_graph": round(1000 * last["seconds"], 1),
        "projected_32_layers": {"peak_gb": round(float(np.polyval(mem_fit, 32)), 1),
                                "s_per_graph": round(float(np.polyval(time_fit, 32)), 1)},
        "points": points,
        "fits": {"peak_gb_per_layer": round(float(mem_fit[0]), 3), "time_poly_coeffs": [round(float(c), 4) for c in time_fit]},
        "shapes": {"d_model": D, "d_mlp": D_MLP, "heads": HEADS, "kv_heads": KV, "vocab": VOCAB, "d_transcoder": D_TC, "k": K,
                   "weights": "bf16 model and transcoders, lazily read (resident=False)",
                   "model_params_per_layer": LAYER_PARAMS},
        "settings": {"max_feature_nodes": args.max_feature_nodes, "threads": args.threads, "device": "cpu"},
        "command": command,
    }
    path = RESULTS / "scale.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["projection_8b"] = out
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
