"""Supervised warm-up: teacher forcing on the training tasks' reference answers.

Each batch holds ``warmup.batch_size`` items split across tasks by ``warmup.task_shares``
(largest-remainder rounding; balanced by default), the sequence BOS + prompt + answer + EOS,
and the loss (cross-entropy) on the answer and EOS tokens only. AdamW (lr 2e-3, betas
(0.9, 0.98), weight decay 0.01) with a cosine schedule over the budget consumed, where the
budget is ``warmup.steps`` or ``warmup.max_time_s``, whichever ends first (CPU-DEFAULT-RUN:
9.7-17k tokens/s on 2 cores; 150 s leaves non-zero, imperfect accuracy on every task).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .model import PAD


def _counts(shares, total: int) -> np.ndarray:
    s = np.asarray(shares, np.float64)
    s = s / s.sum()
    raw = s * total
    base = np.floor(raw).astype(np.int64)
    rem = total - int(base.sum())
    order = np.argsort(-(raw - base), kind="stable")
    base[order[:rem]] += 1
    return base


def _target(suite, p) -> str:
    return suite.target_completion(p) if hasattr(suite, "target_completion") else str(p.answer)


def supervised_warmup(tr) -> dict:
    cfg, w = tr.cfg, tr.cfg.warmup
    K, tok, model, dev = tr.K, tr.tok, tr.model, tr.device
    shares = w.task_shares if w.task_shares else (1.0,) * K
    if len(shares) != K:
        raise ValueError(f"warmup.task_shares: expected {K} shares (tasks {tr.task_names}), got {len(shares)}")
    counts = _counts(shares, w.batch_size)
    rng = np.random.default_rng(cfg.run.seed + 11)
    sizes = [min(int(tr.suite.pool_size(t, "train")), w.pool_items) for t in tr.task_names]
    # encode the pools once: (prompt ids, answer ids) per item
    t_enc0 = time.time()
    enc = []
    for k in range(K):
        if counts[k] == 0:
            enc.append([])
            continue
        ps = tr.suite.prompts(tr.task_names[k], "train", range(sizes[k]))
        enc.append([(tok.encode(p.text, bos=True), tok.encode(_target(tr.suite, p), eos=True)) for p in ps])
    t_enc = time.time() - t_enc0
    perms = [rng.permutation(len(e)) if e else None for e in enc]
    pos = [0] * K
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, betas=tuple(w.betas), weight_decay=w.weight_decay)
    model.train()
    prog = bar = None
    if cfg.run.progress and tr.console is not None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        prog = Progress(TextColumn("[bold]warm-up"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TimeElapsedColumn(), TextColumn("{task.fields[msg]}"), console=tr.console)
        prog.start()
        bar = prog.add_task("warmup", total=1.0, msg="")
    t0 = time.time()
    step, tokens, loss_ema = 0, 0, None
    try:
        while step < w.steps:
            elapsed = time.time() - t0
            frac = step / w.steps
            if w.max_time_s:
                frac = max(frac, elapsed / w.max_time_s)
            if frac >= 1.0:
                break
            lr = w.lr * 0.5 * (1 + math.cos(math.pi * frac))
            for gr in opt.param_groups:
                gr["lr"] = lr
            seqs = []
            for k in range(K):
                for _ in range(int(counts[k])):
                    if pos[k] >= len(enc[k]):
                        perms[k] = rng.permutation(len(enc[k]))
                        pos[k] = 0
                    seqs.append(enc[k][int(perms[k][pos[k]])])
                    pos[k] += 1
            L = max(len(a) + len(b) for a, b in seqs)
            ids = torch.full((len(seqs), L), PAD, dtype=torch.long)
            att = torch.zeros((len(seqs), L), dtype=torch.long)
            lab = torch.full((len(seqs), L), -100, dtype=torch.long)
            for i, (a, b) in enumerate(seqs):
                s = a + b
                ids[i, :len(s)] = torch.tensor(s)
                att[i, :len(s)] = 1
                lab[i, len(a):len(s)] = torch.tensor(b)
            ids, att, lab = ids.to(dev), att.to(dev), lab.to(dev)
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                                     ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += int((lab != -100).sum())
            lv = float(loss.detach())
            loss_ema = lv if loss_ema is None else 0.95 * loss_ema + 0.05 * lv
            if prog is not None and step % 10 == 0:
                prog.update(bar, completed=min(frac, 1.0), msg=f"step {step} loss {loss_ema:.3f}")
    finally:
        if prog is not None:
            prog.update(bar, completed=1.0)
            prog.stop()
    wall = time.time() - t0
    return {"kind": "warmup", "steps": step, "time_s": wall, "encode_time_s": t_enc, "answer_tokens": tokens,
            "tokens_per_s": tokens / max(wall, 1e-9), "final_loss": loss_ema, "batch_counts": counts.tolist()}

