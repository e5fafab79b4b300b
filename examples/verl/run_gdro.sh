#!/usr/bin/env bash
# Prompt-GDRO on verl 0.9.1 (legacy trainer): the "mtgrpo_gdro" advantage estimator (verl's GRPO
# advantage times the adversary's difficulty-bin weights, prompt id = extra_info.index) with
# verl's own dataloader, and the fused "mtgrpo" policy loss. Needs GPUs and a rollout engine (vLLM or SGLang):
# pip install 'mtgrpo_core[verl]' vllm. Not run in this repository's CI (no GPU there).
#
#   DATA=data/mtgrpo-3task MODEL=Qwen/Qwen2.5-1.5B-Instruct NGPUS=8 bash examples/verl/run_gdro.sh
# Prepare the data first:
#   python examples/verl/prepare_data.py --suite mtgrpo-3task --out data/mtgrpo-3task
set -euo pipefail
DATA=${DATA:-data/mtgrpo-3task}
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
NGPUS=${NGPUS:-8}
ROLLOUT=${ROLLOUT:-vllm}          # or sglang
HERE=$(cd "$(dirname "$0")" && pwd)
PLUGIN=mtgrpo_core.integrations.verl_plugin
export VERL_USE_EXTERNAL_MODULES=$PLUGIN   # registers the loss, estimator and sampler hook in this process

python -m verl.trainer.main_ppo trainer.use_v1=False \
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
  data.train_batch_size=128 data.max_prompt_length=1024 data.max_response_length=2048 \
  data.dataloader_num_workers=0 \
  algorithm.adv_estimator=mtgrpo_gdro algorithm.use_kl_in_reward=False \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.actor.policy_loss.loss_mode=mtgrpo actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28 \
  actor_rollout_ref.actor.optim.lr=1e-6 actor_rollout_ref.actor.ppo_mini_batch_size=64 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 actor_rollout_ref.actor.use_kl_loss=False \
  actor_rollout_ref.rollout.name="$ROLLOUT" actor_rollout_ref.rollout.n=8 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
  actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8 \
  custom_reward_function.path="$HERE/reward.py" custom_reward_function.name=compute_score \
  trainer.n_gpus_per_node="$NGPUS" trainer.nnodes=1 trainer.total_epochs=1 trainer.logger='[console]' \
  trainer.project_name=mtgrpo trainer.experiment_name=gdro-3task \
  +ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=$PLUGIN \
  "$@"
