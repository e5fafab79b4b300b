#!/usr/bin/env bash
# GRPO vs DAPO vs MT-GRPO vs Prompt-GDRO on the compact CPU suite: one shared warm-up per seed
# (a step budget, not a time budget, so results do not depend on machine load), then the same
# RL step budget per algorithm; writes runs/compare/compare.md (the paper-style table) and one
# run folder (metrics, checkpoint, report) per algorithm and seed.
# Cost on 2 quiet cores: about 10 minutes per seed at STEPS=150.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-3}
STEPS=${STEPS:-150}
.venv/bin/mtgrpo compare --out "${OUT:-runs/compare}" --seeds "$SEEDS" --steps "$STEPS" --eval-every 50 \
    --algos grpo,dapo,mtgrpo,prompt-gdro warmup.steps=1800 warmup.max_time_s=0 rl.max_time_s=0 "$@"
