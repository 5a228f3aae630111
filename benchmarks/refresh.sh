#!/usr/bin/env bash
# Rebuild everything that depends on the shipped reasoner, in dependency order:
# its figures, its transcoders, both verifier classifiers and every figures file.
#
#   benchmarks/refresh.sh                 # all stages (~80 min on 2 cores)
#   benchmarks/refresh.sh evaluation      # resume from a stage (runs it and the ones after it)
#   benchmarks/refresh.sh --list          # the stages, in order
#
# Run it after replacing models/reasoner (or models/transcoders: start at `transcoders-bench`).
# Each stage overwrites what it owns under models/ and benchmarks/results/; runs/ keeps the
# intermediate files. The README's figures are written by hand from the results files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CRV=${CRV:-.venv/bin/crv}
STAGES=(reasoner transcoders transcoders-bench evaluation verifier fast-verifier interventions service scale attribution)

stage_reasoner() { "$PY" benchmarks/reasoner.py --count 150 --threads 2; }
stage_transcoders() {
  rm -rf runs/refresh-transcoders
  "$CRV" train-transcoders --out runs/refresh-transcoders --expansion 8 --k 16 --steps 600 --threads 2
  rm -f models/transcoders/*
  cp runs/refresh-transcoders/config.yaml runs/refresh-transcoders/layer_*.safetensors models/transcoders/
}
stage_transcoders-bench() { "$PY" benchmarks/transcoders.py --sequences 400 --threads 2; }
stage_evaluation() { "$PY" benchmarks/evaluation.py --count 80 --bool-count 30 --max-feature-nodes 1024; }
stage_verifier() { "$CRV" train-verifier runs/benchmark-evaluation/steps.parquet --max-feature-nodes 1024; }
stage_fast-verifier() {
  "$CRV" evaluate --data runs/benchmark-evaluation/records.jsonl --run-dir runs/eval-cap256 --max-feature-nodes 256 --prm-epochs 0
  "$CRV" train-verifier runs/eval-cap256/steps.parquet --out models/classifiers/fast --max-feature-nodes 256
}
stage_interventions() { "$PY" benchmarks/interventions.py --count 150 --bool-count 100; }
stage_service() {
  "$PY" benchmarks/service.py
  "$PY" benchmarks/service.py --classifier models/classifiers/fast --out benchmarks/results/service-fast.json
}
stage_scale() { "$PY" benchmarks/scale.py; }
stage_attribution() {
  "$PY" benchmarks/attribution.py --count 2
  "$PY" benchmarks/attribution.py --memory-only --seed 5150 --threads 2
}

if [[ "${1:-}" == "--list" ]]; then printf '%s\n' "${STAGES[@]}"; exit 0; fi
first=${1:-${STAGES[0]}}
started=0
for s in "${STAGES[@]}"; do
  [[ "$s" == "$first" ]] && started=1
  [[ $started == 1 ]] || continue
  echo "=== refresh: $s ($(date -u +%H:%M:%S))"
  t0=$SECONDS
  "stage_$s"
  echo "=== refresh: $s done in $((SECONDS - t0)) s"
done
if [[ $started == 0 ]]; then echo "unknown stage '$first'; stages: ${STAGES[*]}" >&2; exit 2; fi
