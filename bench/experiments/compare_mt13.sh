#!/usr/bin/env bash
# Issue 13's 3-seed comparison on cpu-3task (see compare_mt13.py): seeds side by side, one
# torch thread each, a 1,000-step warm-up per seed and STEPS RL steps per algorithm.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/mt13}
STEPS=${STEPS:-50}
PY=${PY:-.venv/bin/python}
COMMON=(warmup.steps=1000 warmup.max_time_s=0 run.threads=1 run.progress=false eval.n_items=200 "$@")
for s in 0 1 2; do
  $PY bench/experiments/compare_mt13.py --seed "$s" --out "$OUT" --steps "$STEPS" "${COMMON[@]}" > "$OUT.s$s.log" 2>&1 &
done
wait
$PY bench/experiments/compare_mt13.py --table --seeds 0,1,2 --out "$OUT"
