#!/usr/bin/env bash
# GRPO vs DAPO vs MT-GRPO vs Prompt-GDRO on the compact CPU suite: one shared 150 s warm-up per
# seed, then the same RL step budget per algorithm; writes runs/compare/compare.md (the
# paper-style table) and one run folder (metrics, checkpoint, report) per algorithm and seed.
# Cost on 2 quiet cores: about (150 s + 4 x (steps x ~0.4 s + 30 s)) per seed.
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-2}
STEPS=${STEPS:-300}
.venv/bin/mtgrpo compare --out "${OUT:-runs/compare}" --seeds "$SEEDS" --steps "$STEPS" --eval-every 50 \
    --algos grpo,dapo,mtgrpo,prompt-gdro "$@"
