"""Feature descriptions: build time and size of the store, and whether weights alone describe features as
activations do -> benchmarks/results/features.json[KEY].

    python benchmarks/features.py                      # the shipped reasoner's set (store written beside it)
    python benchmarks/features.py --pictures docs/img  # ... and feature cards as pictures (headless Chromium)
    python benchmarks/features.py --model runs/smollm2-ft700 --transcoders runs/smollm2-ft-transcoders --key smollm2

Measured (issue 43): the share of live features WeightLens classifies as context-independent, and on those the
precision@5 of WeightLens input tokens (weights only) against the activation-based top tokens, with a 95%
bootstrap interval over features, beside context-dependent features and chance.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import crv  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP)
import torch

RESULTS = Path(__file__).parent / "results" / "features.json"


def _dir_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6, 2)


def pictures(out: Path, extra: list[tuple[int, int]]) -> list[str]:
    """Screenshots of the viewer's feature card: the flagged example step's two most influential features, then
    ``extra`` (the shipped service, headless Chromium)."""
    import shutil
    import threading

    import uvicorn
    from playwright import sync_api

    from crv.api.app import create_app
    from crv.api.verifier import Verifier

    out.mkdir(parents=True, exist_ok=True)
    server = uvicorn.Server(uvicorn.Config(create_app(Verifier.load()), host="127.0.0.1", port=8765, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    written = []
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--headless=new"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto("http://127.0.0.1:8765/")
            page.wait_for_selector("#examples option", state="attached")
            page.click("#verify")
            page.wait_for_selector("#steplist li.flagged", timeout=60_000)
            page.click("#steplist li.flagged")
            page.wait_for_selector("#top-features tr.feature-row")
            rows = page.locator("#top-features tr.feature-row")
            picks = [(int(rows.nth(i).get_attribute("data-layer")), int(rows.nth(i).get_attribute("data-feature")))
                     for i in range(min(2, rows.count()))] + extra
            for layer, index in picks:
                page.evaluate(f"showFeature({layer}, {index})")
                page.wait_for_function("document.getElementById('feature-card').textContent.includes('WeightLens in')")
                path = out / f"feature-card-L{layer}-{index}.png"
                page.locator("#feature-card").screenshot(path=str(path))
                written.append(str(path))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--transcoders", type=Path, default=None)
    ap.add_argument("--key", default="reasoner")
    ap.add_argument("--per-cell", type=int, default=20, help="own greedy traces per task and n (n = 2, 4, 6)")
    ap.add_argument("--rows-per-trace", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pictures", type=Path, default=None, help="write feature-card screenshots here")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from crv.attribution.attributor import Attributor
    from crv.attribution.engine import AttributionConfig
    from crv.features.agreement import weightlens_agreement
    from crv.features.corpus import corpus_from_records, own_traces
    from crv.features.describe import DescribeConfig, describe_features
    from crv.features.store import STORE_DIRNAME, FeatureStore, save_store

    att = Attributor.load(args.model, args.transcoders, AttributionConfig())
    t0 = time.time()
    records = own_traces(att, ["arith", "bool"], [2, 4, 6], args.per_cell, seed=5, progress=False)
    gen_s = time.time() - t0
    source = f"own greedy traces: tasks ['arith', 'bool'], n [2, 4, 6], {args.per_cell} each, seed 5"
    corpus = corpus_from_records(att, records, source)
    t1 = time.time()
    arrays, index = describe_features(att, corpus, DescribeConfig(circuit_rows_per_trace=args.rows_per_trace or None))
    build_s = time.time() - t1
    index["command"] = "python benchmarks/features.py " + shlex.join(sys.argv[1:])
    dest = att.transcoder_dir / STORE_DIRNAME  # type: ignore[operator]
    save_store(arrays, index, lambda i: att.tokenizer.decode([i]), dest)
    store = FeatureStore(dest)
    agreement = weightlens_agreement(store)
    figures = {
        "command": "python benchmarks/features.py " + shlex.join(sys.argv[1:]), "model": att.model_id,
        "transcoders": att.transcoders.checksum(), "threads": args.threads, "corpus": index["corpus"],
        "generate_seconds": round(gen_s, 1), "build_seconds": round(build_s, 1), "store_mb": _dir_mb(dest),
        "store": str(dest.relative_to(Path.cwd())) if dest.is_relative_to(Path.cwd()) else str(dest),
        "live_features": sum(index["live"]), "features": index["n_layers"] * index["d_transcoder"],
        "polysemantic": sum(index["polysemantic"]), "circuit_rows_per_trace": args.rows_per_trace,
        **agreement,
    }
    if args.pictures is not None:  # plus the most token-like frequent feature and a polysemantic one
        def best(score_of) -> tuple[int, int]:  # type: ignore[no-untyped-def]
            scores = torch.stack([score_of(l) for l in range(store.n_layers)])
            i = int(scores.flatten().argmax())
            return divmod(i, store.d_transcoder)

        freq = lambda l: store.get(l, "count").float() / index["corpus"]["tokens"]  # noqa: E731
        token_like = best(lambda l: store.get(l, "eta2") * (freq(l) > 0.01))
        poly = best(lambda l: (store.get(l, "clusters") == 2) * store.get(l, "circuit_firings").float())
        figures["pictures"] = pictures(args.pictures, [token_like, poly])
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data[args.key] = figures
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({k: v for k, v in figures.items() if k != "layers"}, indent=1))


if __name__ == "__main__":
    main()
