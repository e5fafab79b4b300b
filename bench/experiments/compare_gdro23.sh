#!/usr/bin/env bash
# Issue 23: the Prompt-GDRO default (share floor 1, no rare-bin amplification) against GRPO on
# cpu-3task, 3 seeds, the protocol of RESULTS-compare-gdro14.md (1,000-step warm-up per seed,
# rl.pool_items=200, 150 test items per task, k = 4) with the seeds run ONE AFTER ANOTHER
# (one process, one torch thread: the machine is shared), then the table over all seeds.
# STEPS RL steps per algorithm (default 100, as in issue 14), evaluation every EVAL_EVERY.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/gdro23}
STEPS=${STEPS:-100}
EVAL_EVERY=${EVAL_EVERY:-50}
ALGOS=${ALGOS:-grpo,prompt-gdro}
MTGRPO=${MTGRPO:-.venv/bin/mtgrpo}
COMMON=(warmup.steps=1000 warmup.max_time_s=0 run.threads=1 run.progress=false eval.n_items=150
        rl.pool_items=200 "$@")
mkdir -p "$OUT"
for s in 0 1 2; do
  echo "seed $s start $(date -u +%H:%M:%S)"
  $MTGRPO compare --seeds "$s," --out "$OUT" --steps "$STEPS" --eval-every "$EVAL_EVERY" --algos "$ALGOS" \
    "${COMMON[@]}" > "$OUT.s$s.log" 2>&1
  echo "seed $s done $(date -u +%H:%M:%S)"
done
$MTGRPO compare --table --seeds 0,1,2 --out "$OUT" --algos "$ALGOS"
