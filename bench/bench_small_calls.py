"""Small calls: the per-call overhead of the ops on a tiny input (``mtgrpo bench ops``).

What is timed is one call on a 4 x 8 CPU input (32 tokens: the kernel itself is well under a
microsecond), so a row measures the Python wrapper, validation, dispatch and allocation: issue
25's goals are <= 20 us for ``grpo_loss`` on the C++ path and <= 10 us for ``task_masked_sum``.
Cases (fp32 log-probs, bool mask with a few masked tokens):

- ``small/fused/4x8``: ``grpo_loss`` with rewards + group_ids (groups of 4), no gradient;
- ``small/fused+bwd/4x8``: the same with log-probs requiring grad, then ``loss.backward()``;
- ``small/adv/4x8``: ``grpo_loss`` with given [N] advantages, no gradient;
- ``small/fwd/4x8/K3`` (task_accumulate): ``task_masked_sum`` with K = 3, measured by
  ``bench_task_accumulate.small_call_rows`` (one definition of that case; this file only
  prints it next to the others).

Providers: ``mtgrpo-cpu`` (the C++ path) and ``torch_ref``: the pure-PyTorch reference
(``mtgrpo_core.reference``) on the same inputs, measured in the same run. Each row: median,
p20, p80 over >= 2000 calls after 200 warm-up calls (``time.perf_counter``); ``extra`` adds
the p90 and the CPU time per call (``time.thread_time``: what the call cost this thread, the
figure to read on a loaded machine). Run with ``OMP_NUM_THREADS=1`` for the issue's figures.
The grpo_loss rows are appended to ``bench/results/grpo_loss.csv`` (one table per op).
"""
from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, emit, quick  # noqa: E402

import mtgrpo_core as mc  # noqa: E402
from mtgrpo_core.config import GRPOConfig  # noqa: E402
from mtgrpo_core.reference.grpo_loss import grpo_loss_ref  # noqa: E402

N, T = 4, 8


def time_small(fn: Callable[[], object], *, calls: int, warmup: int = 200) -> dict:
    """Median / p20 / p80 / p90 wall time (ms) of one ``fn()`` over ``calls`` calls, and the
    thread's CPU time per call (us)."""
    for _ in range(warmup):
        fn()
    times = []
    cpu0 = time.thread_time()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    cpu_us = (time.thread_time() - cpu0) / calls * 1e6
    q = statistics.quantiles(times, n=10)
    q5 = statistics.quantiles(times, n=5)
    return {"median": statistics.median(times), "p20": q5[0], "p80": q5[3], "p90": q[8], "cpu_us": cpu_us}


def make_loss_inputs():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(N, T, generator=g)
    old = lp + 0.05 * torch.randn(N, T, generator=g)
    mask = torch.rand(N, T, generator=g) > 0.2
    rewards = torch.rand(N, generator=g)
    gids = torch.arange(N) // 4
    adv = torch.randn(N, generator=g)
    return lp, old, mask, rewards, gids, adv


def grpo_loss_cases() -> dict[str, dict[str, Callable[[], object]]]:
    """case -> provider -> one call."""
    lp, old, mask, rewards, gids, adv = make_loss_inputs()
    x = lp.clone().requires_grad_()
    cfg = GRPOConfig()

    def fused_bwd(loss_fn):
        def call():
            loss = loss_fn()
            loss.backward()
            x.grad = None
        return call

    cases = {
        "small/fused/4x8": {
            "mtgrpo-cpu": lambda: mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, backend="cpu"),
            "torch_ref": lambda: grpo_loss_ref(lp, old, mask, rewards=rewards, group_ids=gids, config=cfg),
        },
        "small/fused+bwd/4x8": {
            "mtgrpo-cpu": fused_bwd(lambda: mc.grpo_loss(x, old, mask, rewards=rewards, group_ids=gids,
                                                         backend="cpu")[0]),
            "torch_ref": fused_bwd(lambda: grpo_loss_ref(x, old, mask, rewards=rewards, group_ids=gids,
                                                         config=cfg)[0]),
        },
        "small/adv/4x8": {
            "mtgrpo-cpu": lambda: mc.grpo_loss(lp, old, mask, adv, backend="cpu"),
            "torch_ref": lambda: grpo_loss_ref(lp, old, mask, adv, config=cfg),
        },
    }
    if not mc.build_info()["cxx_extension"]:
        for c in cases.values():
            del c["mtgrpo-cpu"]
    return cases


def small_call_rows() -> list[Row]:
    calls = 300 if quick() else 2000
    rows = []
    for case, providers in grpo_loss_cases().items():
        for name, fn in providers.items():
            s = time_small(fn, calls=calls)
            rows.append(Row("grpo_loss", case, name, "cpu", s["median"], s["p20"], s["p80"],
                            extra={"tokens": N * T, "p90_ms": round(s["p90"], 5), "cpu_us": round(s["cpu_us"], 2),
                                   "calls": calls}))
    return rows


def main() -> None:
    rows = small_call_rows()
    emit(rows, csv_name="grpo_loss")
    from bench_task_accumulate import small_call_rows as task_small_rows

    task_rows = task_small_rows(["cpu"])  # its own benchmark appends them to task_accumulate.csv
    ref = {r.case: r.median_ms for r in rows + task_rows if r.provider == "torch_ref"}
    print(f"# small calls, one call on a {N} x {T} CPU input, {torch.get_num_threads()} thread(s) "
          "(goals: grpo_loss <= 20 us, task_masked_sum <= 10 us; ratio = torch_ref time / this time)")
    for r in rows + task_rows:
        p90 = r.extra.get("p90_ms")
        tail = f"p90 {1e3 * p90:7.1f} us  cpu {r.extra['cpu_us']:6.1f} us" if p90 is not None else \
            f"p80 {1e3 * r.p80_ms:7.1f} us"
        ratio = ref.get(r.case, 0.0) / r.median_ms if r.median_ms > 0 else float("nan")
        print(f"#   {r.op:15s} {r.case:22s} {r.provider:11s} median {1e3 * r.median_ms:7.1f} us  {tail}  "
              f"x{ratio:.2f} vs torch_ref")


if __name__ == "__main__":
    main()
