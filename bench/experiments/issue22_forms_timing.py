"""Issue 22: forward + backward time of each policy-loss form, C++ (``cpu``) against the eager
reference (``torch``) in the same run, N = 64, T = 4096, fp32, fused advantages, token-mean;
best of 15. A quick check, not the benchmark harness (``mtgrpo bench`` has the roofline rows).

    OMP_NUM_THREADS=1 .venv/bin/python bench/experiments/issue22_forms_timing.py
"""
from __future__ import annotations

import time

import torch

import mtgrpo_core as mc


def main() -> None:
    torch.manual_seed(0)
    n, t = 64, 4096
    lp = -torch.rand(n, t)
    old = lp + 0.2 * torch.randn(n, t)
    roll = old + 0.1 * torch.randn(n, t)
    mask = torch.rand(n, t) > 0.1
    rewards, gids = torch.rand(n), torch.arange(n) // 8

    def best_ms(backend, **kw):
        best = float("inf")
        for _ in range(15):
            x = lp.clone().requires_grad_()
            t0 = time.perf_counter()
            loss, _ = mc.grpo_loss(x, old, mask, rewards=rewards, group_ids=gids, backend=backend, **kw)
            loss.backward()
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    cases = [("vanilla", {}), ("cispo", dict(policy_loss="cispo")), ("sapo", dict(policy_loss="sapo")),
             ("gpg", dict(policy_loss="gpg")),
             ("vanilla + token_mask IS", dict(is_correction="token_mask", is_lo=0.5, is_hi=2.0, rollout_logprobs=roll)),
             ("geo_mean", dict(policy_loss="geo_mean")), ("vespo", dict(policy_loss="vespo"))]
    for name, kw in cases:
        tc, tt = best_ms("cpu", **kw), best_ms("torch", **kw)
        print(f"{name:24s} cpu {tc:7.2f} ms  torch-ref {tt:7.2f} ms  ratio {tt / tc:5.1f}x")


if __name__ == "__main__":
    main()
