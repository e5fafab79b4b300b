#!/usr/bin/env bash
# The 3-seed step-budgeted comparison on cpu-3task of issues 13 (GRPO, DAPO, MT-GRPO, SEC-DAPO,
# Subroutine 2, GRPO+RPS) and 14 (GRPO, Prompt-GDRO, Rollout-GDRO): `mtgrpo compare` once per
# seed, the seeds side by side with one torch thread each, then the table over all seeds.
# Per seed a 1,000-step warm-up (reused when OUT/warmup-sN/checkpoint.pt exists), then STEPS RL
# steps per algorithm and an evaluation every EVAL_EVERY steps. Extra key=value arguments go to
# every run (e.g. warmup.steps=1800, rl.pool_items=200, mtgrpo.clip_scale_lr=false).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/mt13}
STEPS=${STEPS:-100}
EVAL_EVERY=${EVAL_EVERY:-25}
ALGOS=${ALGOS:-dapo,mtgrpo,grpo,sec-dapo,mtgrpo-reward-only,rps-uniform,prompt-gdro,rollout-gdro}
MTGRPO=${MTGRPO:-.venv/bin/mtgrpo}
COMMON=(warmup.steps=1000 warmup.max_time_s=0 run.threads=1 run.progress=false eval.n_items=150 "$@")
for s in 0 1 2; do
  $MTGRPO compare --seeds "$s," --out "$OUT" --steps "$STEPS" --eval-every "$EVAL_EVERY" --algos "$ALGOS" \
    "${COMMON[@]}" > "$OUT.s$s.log" 2>&1 &
done
wait
$MTGRPO compare --table --seeds 0,1,2 --out "$OUT" --algos "$ALGOS"
