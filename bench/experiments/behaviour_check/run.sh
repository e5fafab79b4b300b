#!/bin/bash
# Step-budgeted tiny runs of every algorithm (seed 0); each run's metrics.jsonl is copied to
# DEST/<name>/. Run it before and after a refactor of the training loop, then
#   python compare.py BEFORE AFTER
# must print "ALL IDENTICAL" (wall-time fields ignored). About 2 minutes on 2 cores.
# ENTRY overrides how the CLI is started (e.g. a script that imports another checkout).
set -e
DEST=${1:?usage: run.sh DEST}
REPO=${REPO:-$(cd "$(dirname "$0")/../../.." && pwd)}
PY=${PY:-$REPO/.venv/bin/python}
ENTRY=${ENTRY:--m mtgrpo_core.cli}
WORK=$(mktemp -d)
TINY="run.threads=1 run.progress=false model.hidden_size=32 model.intermediate_size=64 model.num_hidden_layers=1 \
model.num_attention_heads=2 model.num_key_value_heads=2 model.max_position_embeddings=64 \
tasks.train_size=300 tasks.test_size=20 warmup.steps=40 warmup.max_time_s=0 warmup.batch_size=32 \
rl.steps=6 rl.max_time_s=0 rl.batch_prompts=6 rl.group_size=4 rl.mini_batches=2 rl.max_new_tokens=8 rl.max_rounds=3 \
eval.n_items=8 eval.k=2 eval.every=3 checkpoint.every=3"
mkdir -p "$DEST"
run() {
  name=$1; algo=$2; shift 2
  # shellcheck disable=SC2086
  (cd /tmp && $PY $ENTRY train --no-report --algo "$algo" --out "$WORK/$name" $TINY "$@" > "$WORK/$name.log" 2>&1) \
    || { echo "FAIL $name"; tail -20 "$WORK/$name.log"; exit 1; }
  mkdir -p "$DEST/$name"
  cp "$WORK/$name/metrics.jsonl" "$DEST/$name/"
  echo "done $name"
}
run grpo grpo
run dapo dapo
run mtgrpo mtgrpo
run mtgrpo-norp mtgrpo mtgrpo.rp_sampler=false
run sec sec
run prompt-gdro prompt-gdro
run rollout-gdro rollout-gdro
run rollout-bandit rollout-gdro gdro.allocator=bandit
rm -rf "$WORK"
