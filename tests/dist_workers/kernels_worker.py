"""One rank of the 2-process kernel checks (tests/test_distributed_kernels.py; torchrun, gloo,
CPU). Writes the measured differences to <out>/rank<r>.json; the test asserts on them.

1. completion_logprobs under DDP: each rank takes half of a batch; after backward the
   gradients equal a single-process run on the whole batch (the DDP all-reduce ran), the
   local-only gradients do not (so the check can fail), and the log-probs equal
   log_softmax of the model's own full logits.
2. group_advantages / grpo_loss with process_group: groups split across ranks (ranks hold 5
   and 3 rows) give the whole batch's advantages, loss (summed over ranks) and gradients.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import mtgrpo_core as mc
from mtgrpo_core.integrations import completion_logprobs

V, B, T, TC, TAU = 40, 4, 9, 4, 0.7


def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, eos_token_id=1,
                      bos_token_id=1)
    return LlamaForCausalLM(cfg).float()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (B, T), generator=g)
    att = torch.ones(B, T, dtype=torch.long)
    att[1, :2] = 0  # left padding
    cm = torch.ones(B, TC, dtype=torch.long)
    cm[2, 3:] = 0
    cm[3, 1:] = 0
    coef = torch.randn(B, TC, generator=g)
    return ids, att, cm, coef


def loss_of(lp, cm, coef):
    return (lp * cm * coef).sum(1).mean()  # mean over rows: DDP's gradient average of equal halves = the whole


def grads(m):
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()])


def main():
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    res = {"rank": rank}
    ids, att, cm, coef = batch()
    sl = slice(rank * B // 2, (rank + 1) * B // 2)

    # -- single process on the whole batch (the reference), and the values against full logits
    ref = model()
    lp_full = completion_logprobs(ref, ids, att, cm, TAU)
    loss_of(lp_full, cm, coef).backward()
    g_ref = grads(ref)
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=att).logits[:, T - TC - 1:T - 1] / TAU
        want = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, T - TC:, None])[..., 0] * cm
    res["value_err"] = float((lp_full.detach() - want).abs().max())

    # -- the local half alone (no DDP): its gradient is not the whole batch's
    alone = model()
    loss_of(completion_logprobs(alone, ids[sl], att[sl], cm[sl], TAU), cm[sl], coef[sl]).backward()
    res["local_only_grad_diff"] = float((grads(alone) - g_ref).abs().max())

    # -- DDP: the wrapper's forward runs, so the reducer averages the gradients over the ranks
    ddp = torch.nn.parallel.DistributedDataParallel(model())
    lp = completion_logprobs(ddp, ids[sl], att[sl], cm[sl], TAU)
    loss_of(lp, cm[sl], coef[sl]).backward()
    g_ddp = grads(ddp.module)
    res["ddp_grad_diff"] = float((g_ddp - g_ref).abs().max())
    res["ddp_grad_scale"] = float(g_ref.abs().max())
    res["ddp_value_err"] = float((lp.detach() - lp_full.detach()[sl]).abs().max())

    # -- advantages and the fused loss with groups split across ranks (ranks hold 5 and 3 rows)
    g = torch.Generator().manual_seed(2)
    n_all, t = 8, 6
    rewards = torch.randint(0, 3, (n_all,), generator=g).float()
    gids = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1])  # every group has rows on both ranks
    rewards[gids == 2] = 1.0  # one flat group
    logp = (torch.randn(n_all, t, generator=g) * 0.3 - 1.0)
    old = logp + torch.randn(n_all, t, generator=g) * 0.3
    mask = torch.rand(n_all, t, generator=g) > 0.2
    rows = slice(0, 5) if rank == 0 else slice(5, 8)
    pg = dist.group.WORLD
    a_ref = mc.group_advantages(rewards, gids)
    a_pg = mc.group_advantages(rewards[rows], gids[rows], process_group=pg)
    a_loc = mc.group_advantages(rewards[rows], gids[rows])
    res["adv_err"] = float((a_pg - a_ref[rows]).abs().max())
    res["adv_local_diff"] = float((a_loc - a_ref[rows]).abs().max())
    ntok = int(mask.sum())
    x_ref = logp.clone().requires_grad_()
    l_ref, s_ref = mc.grpo_loss(x_ref, old, mask, rewards=rewards, group_ids=gids, num_tokens=ntok,
                                clip_eps_high=0.28)
    l_ref.backward()
    x = logp[rows].clone().requires_grad_()
    l_pg, s_pg = mc.grpo_loss(x, old[rows], mask[rows], rewards=rewards[rows], group_ids=gids[rows],
                              num_tokens=ntok, clip_eps_high=0.28, process_group=pg,
                              task_ids=torch.zeros(x.shape[0], dtype=torch.long), num_tasks=1)
    l_pg.backward()
    total = l_pg.detach().clone()
    dist.all_reduce(total)
    res["loss_err"] = float((total - l_ref.detach()).abs())
    res["loss_ref"] = float(l_ref)
    res["loss_grad_err"] = float((x.grad - x_ref.grad[rows]).abs().max())
    res["loss_adv_err"] = float((s_pg.advantages - s_ref.advantages[rows]).abs().max())
    res["zero_adv_group_frac"] = float(s_pg.zero_adv_group_frac)
    res["task_zero_adv_frac"] = float(s_pg.task_zero_adv_frac[0])
    try:
        mc.grpo_loss(x.detach(), None, mask[rows], a_pg, process_group=pg)
        res["refuses_precomputed"] = ""
    except ValueError as e:
        res["refuses_precomputed"] = str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
