"""Issue 25 item 3: a tiny call before and after, in one process, interleaved (the same load for both).

"before" is the Python wrappers of commit b971fc4 (``ops/grpo_loss.py``, ``ops/task_accumulate.py``,
read with ``git show`` and loaded under other op names, ``mtgrpo_old::``) on today's extension and
``ops/_dispatch.py``; "after" is the installed package; ``torch_ref`` the pure-PyTorch reference.
Each provider runs ``CALLS`` timed calls per round, ``ROUNDS`` rounds taken in turn, after 200
warm-up calls: median and p90 wall time (``time.perf_counter``) and CPU time per call
(``time.thread_time``). 4 x 8 fp32 inputs, groups of 4, one thread.

    OMP_NUM_THREADS=1 python bench/experiments/issue25_small_calls_ab.py [case substring ...]
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BEFORE = "b971fc4"
ROOT = Path(__file__).resolve().parents[2]


def load_old(rel: str, name: str):
    src = subprocess.check_output(["git", "show", f"{BEFORE}:{rel}"], cwd=ROOT, text=True)
    src = src.replace('"mtgrpo::', '"mtgrpo_old::').replace("torch.ops.mtgrpo.", "torch.ops.mtgrpo_old.")
    path = Path(tempfile.mkdtemp()) / f"{name}.py"  # (triton's jit wants a file)
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"mtgrpo_core.ops.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    torch.set_num_threads(1)
    import mtgrpo_core as mc
    from mtgrpo_core.config import GRPOConfig
    from mtgrpo_core.reference.grpo_loss import grpo_loss_ref
    from mtgrpo_core.reference.task_accumulate import task_masked_sum_ref

    old_gl = load_old("mtgrpo_core/ops/grpo_loss.py", "_old_grpo_loss")
    old_ta = load_old("mtgrpo_core/ops/task_accumulate.py", "_old_task_accumulate")
    g = torch.Generator().manual_seed(0)
    n, t = 4, 8
    lp = -torch.rand(n, t, generator=g)
    old = lp + 0.05 * torch.randn(n, t, generator=g)
    mask = torch.rand(n, t, generator=g) > 0.2
    r, gid, adv = torch.rand(n, generator=g), torch.arange(n) // 4, torch.randn(n, generator=g)
    x = lp.clone().requires_grad_()
    v, tid = torch.randn(n, t, generator=g), torch.tensor([0, 1, 2, 0])
    cfg = GRPOConfig()

    def bwd(f):
        def call():
            f().backward()
            x.grad = None
        return call

    cases = {
        "grpo_loss fused, no grad": {
            "before": lambda: old_gl.grpo_loss(lp, old, mask, rewards=r, group_ids=gid),
            "after": lambda: mc.grpo_loss(lp, old, mask, rewards=r, group_ids=gid),
            "torch_ref": lambda: grpo_loss_ref(lp, old, mask, rewards=r, group_ids=gid, config=cfg)},
        "grpo_loss [N] advantages, no grad": {
            "before": lambda: old_gl.grpo_loss(lp, old, mask, adv),
            "after": lambda: mc.grpo_loss(lp, old, mask, adv),
            "torch_ref": lambda: grpo_loss_ref(lp, old, mask, adv, config=cfg)},
        "grpo_loss fused, logprobs requires grad (the call)": {
            "before": lambda: old_gl.grpo_loss(x, old, mask, rewards=r, group_ids=gid),
            "after": lambda: mc.grpo_loss(x, old, mask, rewards=r, group_ids=gid)},
        "grpo_loss fused, forward + backward": {
            "before": bwd(lambda: old_gl.grpo_loss(x, old, mask, rewards=r, group_ids=gid)[0]),
            "after": bwd(lambda: mc.grpo_loss(x, old, mask, rewards=r, group_ids=gid)[0]),
            "torch_ref": bwd(lambda: grpo_loss_ref(x, old, mask, rewards=r, group_ids=gid, config=cfg)[0])},
        "grpo_loss [N] advantages, forward + backward": {
            "before": bwd(lambda: old_gl.grpo_loss(x, old, mask, adv)[0]),
            "after": bwd(lambda: mc.grpo_loss(x, old, mask, adv)[0])},
        "grpo_loss fused, no grad, then one stats field read": {
            "before": lambda: old_gl.grpo_loss(lp, old, mask, rewards=r, group_ids=gid)[1].clip_frac_high,
            "after": lambda: mc.grpo_loss(lp, old, mask, rewards=r, group_ids=gid)[1].clip_frac_high},
        "task_masked_sum 4x8 K=3": {
            "before": lambda: old_ta.task_masked_sum(v, mask, tid, 3),
            "after": lambda: mc.task_masked_sum(v, mask, tid, 3),
            "torch_ref": lambda: task_masked_sum_ref(v, mask, tid, 3)},
    }
    calls, rounds = int(os.environ.get("CALLS", 2000)), int(os.environ.get("ROUNDS", 3))
    print(subprocess.check_output(["uptime"], text=True).strip(), f"| {torch.get_num_threads()} thread(s)",
          f"| {calls * rounds} calls per provider")
    sel = sys.argv[1:]
    for case, provs in cases.items():
        if sel and not any(s in case for s in sel):
            continue
        times = {p: [] for p in provs}
        cpu = dict.fromkeys(provs, 0.0)
        for f in provs.values():
            for _ in range(200):
                f()
        for _ in range(rounds):
            for p, f in provs.items():
                ts, c0 = times[p], time.thread_time()
                for _ in range(calls):
                    t0 = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t0)
                cpu[p] += time.thread_time() - c0
        print(f"## {case}\n| provider | median us | p90 us | CPU us per call |\n|---|---|---|---|")
        for p, ts in times.items():
            ts.sort()
            k = len(ts)
            print(f"| {p} | {ts[k // 2] * 1e6:.1f} | {ts[int(k * 0.9)] * 1e6:.1f} | {cpu[p] / k * 1e6:.1f} |")


if __name__ == "__main__":
    main()
