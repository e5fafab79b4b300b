"""One rank of the 2-process MTGRPOTrainer check (launched by tests/test_distributed_trl.py
with torchrun, gloo on CPU). Runs A: 4 steps with a checkpoint at step 2; B: resumed from
A's checkpoint-2 to step 4. Writes what each rank saw to <out>/rank<r>.json."""
from __future__ import annotations

import collections
import json
import os
import sys
import zlib

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig

from mtgrpo_core.integrations.trl import MTGRPOTrainer
from mtgrpo_core.sampling import target_counts

TASKS = ("alpha", "beta", "gamma")
# per-task chance (percent) that a rollout is "correct": tasks of different accuracy, so the
# MT-GRPO weights move away from uniform
ACC = {"alpha": 15, "beta": 50, "gamma": 85}
G = 2


def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in [chr(i) for i in range(32, 127)]:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def model(vocab_size):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(cfg)


def dataset():
    rows = [{"prompt": f"{t} {i}:", "task": t} for t in TASKS for i in range(10)]
    return Dataset.from_list(rows)


SEEN: list = []  # (run, local task list) per reward call
PROMPTS: list = []  # (run, local prompt list) per reward call


def make_reward(run):
    def reward(prompts, completions, task, **kwargs):
        """Depends on the prompt and the rollout's position in its group only (not on the sampled
        text), so an interrupted and an uninterrupted run see the same rewards for the same batches."""
        SEEN.append((run, list(task)))
        PROMPTS.append((run, list(prompts)))
        return [1.0 if zlib.crc32(f"{p}|{i % G}".encode()) % 100 < ACC[t] else 0.0
                for i, (p, t) in enumerate(zip(prompts, task))]
    return reward


def args(out, **kw):
    base = dict(output_dir=out, per_device_train_batch_size=6, num_generations=G, max_completion_length=3,
                max_steps=4, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                save_strategy="steps", save_steps=2, seed=0, loss_type="dapo", dataloader_num_workers=0, bf16=False,
                disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def trainer(out, run, tok, data, rounds=None):
    # runs a/b: the composer's exact resume (I_k off: with it the weights also depend on the
    # completions TRL samples after a resume); runs c/d: rounds with I_k
    kw = {"measure_improvement": False} if rounds is None else {"max_generation_rounds": rounds}
    # with rounds: gradient accumulation 2 and 2 micro-batches a generation (issue 23)
    a = args(out) if rounds is None else args(out, gradient_accumulation_steps=2, steps_per_generation=2)
    tr = MTGRPOTrainer(model=model(len(tok)), reward_funcs=make_reward(run), args=a, train_dataset=data,
                       processing_class=tok, task_weighting_kwargs={"lam": 1.0, "lr": 0.5}, correct_threshold=0.5,
                       **kw)
    plans = []
    orig = tr.task_composer.next_batch

    def recording_next_batch():  # remember each drawn batch's quota and target_counts(shares)
        shares = tr.task_composer.draw_shares()
        idx = orig()
        plans.append({"counts": tr.task_composer.last_counts.tolist(),
                      "target": target_counts(shares, tr.task_composer.batch_size).tolist(),
                      "tasks": [tr.task_names[tr.task_composer.task_ids[i]] for i in idx]})
        return idx

    tr.task_composer.next_batch = recording_next_batch
    return tr, plans


def main():
    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    tok, data = tokenizer(), dataset()
    a, plans_a = trainer(os.path.join(out, "a"), "a", tok, data)
    a.train()
    weights_a = a.task_weights.tolist()
    logs_a = [{k: v for k, v in h.items() if k.startswith("task/")} for h in a.state.log_history if "loss" in h]
    ckpt = os.path.join(out, "a", "checkpoint-2")
    with open(os.path.join(ckpt, "mtgrpo_task_weighting.json")) as f:
        weights_at_2 = json.load(f)["composer"]["controller"]
    b, _ = trainer(os.path.join(out, "b"), "b", tok, data)
    b.train(resume_from_checkpoint=ckpt)
    res = {"rank": rank, "world": a.accelerator.num_processes, "task_names": a.task_names,
           "seen_a": [t for run, t in SEEN if run == "a"], "seen_b": [t for run, t in SEEN if run == "b"],
           "plans_a": plans_a, "logs_a": logs_a, "weights_a": weights_a, "weights_b": b.task_weights.tolist(),
           "controller_at_2": weights_at_2, "num_processes_P": a.task_composer.batch_size,
           "step_counts_a": [dict(collections.Counter(t)) for run, t in SEEN if run == "a"]}
    # issue 23: acceptance-aware rounds with I_k (run c), resumed from c's checkpoint-2 (run d)
    c, _ = trainer(os.path.join(out, "c"), "c", tok, data, rounds=3)
    c.train()
    d, _ = trainer(os.path.join(out, "d"), "d", tok, data, rounds=3)
    d.train(resume_from_checkpoint=os.path.join(out, "c", "checkpoint-2"))
    res.update({"logs_c": [{k: v for k, v in h.items() if k.startswith(("task/", "generation/"))}
                           for h in c.state.log_history if "loss" in h],
                "weights_c": c.task_weights.tolist(), "weights_d": d.task_weights.tolist(),
                "seen_c": [t for run, t in SEEN if run == "c"], "seen_d": [t for run, t in SEEN if run == "d"],
                "prompts_c": [p for run, p in PROMPTS if run == "c"],
                "prompts_d": [p for run, p in PROMPTS if run == "d"]})
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f, default=lambda x: x.tolist() if isinstance(x, np.ndarray) else float(x))


if __name__ == "__main__":
    main()
