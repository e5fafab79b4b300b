"""MT-GRPO with generation rounds against DAPO with dynamic sampling, both inside TRL, on the
library's cpu-3task suite (CPU, a few minutes).

What it does
------------
1. Builds the library's policy (a small Llama) and warm-starts it with the library's
   supervised warm-up (``mtgrpo_core.train``), exactly as ``mtgrpo train`` does.
2. Wraps the library's character tokenizer (PAD 0, BOS 1, EOS 2, printable ASCII from 3)
   as a ``transformers`` fast tokenizer with the same ids, so TRL's tokenisation, generation
   and decoding give the token ids the policy was warm-started on.
3. Trains two copies of the warm-started policy with ``MTGRPOTrainer`` for ``--steps``
   optimiser steps each, same prompts pool, same budget:
   * MT-GRPO: ``task_weighting="mtgrpo"`` (IWU weights with I_k measured after every
     optimiser step) and ``max_generation_rounds=3`` (acceptance-aware, ratio-preserving
     rounds);
   * DAPO: ``dynamic_sampling=True`` on a dataset without the task column (one task:
     zero-advantage groups redrawn for up to 3 rounds, uniform mix of the tasks).
   Both use TRL's ``loss_type="dapo"`` with clip-higher (0.2 / 0.28), no KL.
4. Evaluates each on the test split with the library's evaluator (greedy accuracy, mean@4,
   pass@4 per task) and prints the table and the rounds / I_k statistics.

Run:  .venv/bin/python examples/trl/cpu_3task.py [--steps 60] [--out runs/trl_example]
(the committed output, ``examples/trl/output.txt``, says the budget it ran at).
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch


def char_tokenizer():
    """The library's CharTokenizer as a transformers fast tokenizer (same ids, BOS prepended)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    from mtgrpo_core.train.model import BOS, EOS, PAD, CharTokenizer

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS}
    ct = CharTokenizer()
    for o in range(32, 127):
        vocab[chr(o)] = ct.encode(chr(o))[0]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="?"))  # no merges: one token a character
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="?", padding_side="left")
    probe = "C:3,5>8=3+5"
    assert tok(text=[probe])["input_ids"][0] == ct.encode(probe, bos=True), "the wrapped tokenizer must match"
    return tok


def build(args):
    """The library trainer (suite, evaluator) with its warm-started policy."""
    from mtgrpo_core.train import config as C
    from mtgrpo_core.train.trainer import Trainer

    cfg = C.load_config(None, [f"warmup.steps={args.warmup_steps}", "warmup.max_time_s=0",
                               f"run.threads={args.threads}", "run.progress=false", f"eval.n_items={args.eval_items}",
                               f"rl.pool_items={args.pool_items}", f"run.seed={args.seed}"],
                        algo="mtgrpo", out=f"{args.out}/library")
    lib = Trainer(cfg)
    t0 = time.time()
    if args.init_from:  # a warm-up checkpoint of the library (e.g. runs/<out>/warmup-s0/checkpoint.pt)
        lib.load_checkpoint(args.init_from, full=False)
        print(f"warm start: {args.init_from}")
    else:
        lib.warmup()
        print(f"warm-up: {args.warmup_steps} steps in {time.time() - t0:.0f} s")
    return lib


def dataset(lib, with_task: bool):
    from datasets import Dataset

    rows = []
    for k, name in enumerate(lib.task_names):
        for i in range(lib.pool_sizes[k]):
            row = {"prompt": lib.prompts(k, "train", [i])[0].text, "pid": i}
            row["task_name" if not with_task else "task"] = name
            rows.append(row)
    return Dataset.from_list(rows)


def make_reward(lib):
    pos = {n: k for k, n in enumerate(lib.task_names)}

    def reward(prompts, completions, pid, task=None, task_name=None, **kwargs):
        """The suite's verifier: 1 correct, the format reward when well formed, else 0."""
        names = task if task is not None else task_name
        ps = [lib.prompts(pos[n], "train", [int(i)])[0] for n, i in zip(names, pid)]
        return lib.score(ps, list(completions))[0].tolist()
    return reward


def run(lib, warm_state, tok, args, name, **kw):
    from transformers import PrinterCallback
    from trl import GRPOConfig

    from mtgrpo_core.integrations.trl import MTGRPOTrainer

    lib.model.load_state_dict(warm_state)
    r = lib.cfg.rl
    targs = GRPOConfig(output_dir=f"{args.out}/{name}", per_device_train_batch_size=args.prompts * args.group,
                       num_generations=args.group, max_completion_length=r.max_new_tokens, learning_rate=r.lr,
                       max_steps=args.steps, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                       seed=args.seed, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, temperature=1.0,
                       bf16=False, disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant",
                       log_level="warning")
    with_task = not kw.get("dynamic_sampling", False)
    tr = MTGRPOTrainer(model=lib.model, reward_funcs=make_reward(lib), args=targs,
                       train_dataset=dataset(lib, with_task), processing_class=tok, loss_backend=args.loss_backend,
                       **kw)
    tr.remove_callback(PrinterCallback)  # the per-step log dicts; the summary below is printed instead
    t0 = time.time()
    tr.train()
    wall = time.time() - t0
    logs = [h for h in tr.state.log_history if "loss" in h]
    lib.model.eval()
    ev = lib.evaluate("test", tag=name)["tasks"]
    return {"wall": wall, "logs": logs, "eval": ev, "weights": tr.task_weights, "tasks": tr.task_names}


def mean_log(logs, key):
    v = [h[key] for h in logs if key in h]
    return float(np.mean(v)) if v else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="TRL optimiser steps per run")
    ap.add_argument("--warmup-steps", type=int, default=1000)
    ap.add_argument("--init-from", default="", help="a library checkpoint to start from instead of the warm-up")
    ap.add_argument("--prompts", type=int, default=24, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool-items", type=int, default=200, help="training prompts per task")
    ap.add_argument("--eval-items", type=int, default=150, help="test items per task")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loss-backend", default="auto", help="MTGRPOTrainer loss_backend (auto | cpu | triton | torch)")
    ap.add_argument("--out", default="runs/trl_example")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.time()
    tok = char_tokenizer()
    lib = build(args)
    warm = copy.deepcopy(lib.model.state_dict())
    before = lib.evaluate("test", tag="before")["tasks"]
    res = {
        "MT-GRPO, rounds": run(lib, warm, tok, args, "mtgrpo", task_weighting="mtgrpo",
                               max_generation_rounds=args.rounds),
        "DAPO, dynamic sampling": run(lib, warm, tok, args, "dapo", dynamic_sampling=True,
                                      max_generation_rounds=args.rounds),
    }
    names = lib.task_names
    print(f"\ncpu-3task in TRL: {args.steps} optimiser steps a run, {args.prompts} prompts x {args.group} "
          f"completions a step, up to {args.rounds} generation rounds, {args.eval_items} test items a task, "
          f"seed {args.seed}, loss backend {args.loss_backend}\n")
    print("| run | " + " | ".join(f"{n} mean@4 / pass@4" for n in names) + " | worst mean@4 | wall s |")
    print("|---|" + "---|" * (len(names) + 2))
    rows = [("warm-up (before RL)", before, None)] + [(k, v["eval"], v) for k, v in res.items()]
    for label, ev, v in rows:
        cells = [f"{100 * ev[n]['mean_at_k']:.1f} / {100 * ev[n]['pass_at_k']:.1f}" for n in names]
        worst = min(100 * ev[n]["mean_at_k"] for n in names)
        wall = "" if v is None else f"{v['wall']:.0f}"
        print(f"| {label} | " + " | ".join(cells) + f" | {worst:.1f} | {wall} |")
    print()
    for label, v in res.items():
        logs = v["logs"]
        line = (f"{label}: generation rounds a step {mean_log(logs, 'generation/rounds'):.2f}, shortfall "
                f"{mean_log(logs, 'generation/shortfall'):.2f} of {args.prompts} prompts, informative share "
                + ", ".join(f"{n} {mean_log(logs, f'task/{n}/informative_frac'):.2f}" for n in v["tasks"]))
        print(line)
        if any("improvement/time_share" in h for h in logs):
            print(f"  I_k measurement: {100 * mean_log(logs, 'improvement/time_share'):.1f}% of the step time "
                  f"({mean_log(logs, 'improvement/time_s'):.2f} s a step); final task weights "
                  + ", ".join(f"{n} {w:.2f}" for n, w in zip(v["tasks"], v["weights"])))
    print(f"\ntotal wall time {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    main()
