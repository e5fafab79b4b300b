"""Where the CPU backward of ``task_weighted_loss`` spends its time (issue 25).

Prints the medians of: the whole backward (``torch.autograd.grad`` on a retained graph), the
Python scatter function it calls, the C++ binding alone on a reused output, and a copy of the
same bytes (the gradient written, the mask read). Run it under different ``OMP_WAIT_POLICY`` /
``OMP_NUM_THREADS`` settings to see what waking the OpenMP threads costs::

    python bench/backward_breakdown.py [N T K]      # default 1024 1024 9 (1M tokens)
"""
from __future__ import annotations

import sys
import time

import torch

import mtgrpo_core as mc
from mtgrpo_core import _native
from mtgrpo_core.ops import task_accumulate as ta


def _median_ms(fn, repeats: int = 300) -> str:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    times.sort()
    return (f"median {times[repeats // 2] * 1e3:.3f} ms  p20 {times[repeats // 5] * 1e3:.3f}  "
            f"p80 {times[4 * repeats // 5] * 1e3:.3f}")


def main() -> None:
    n, t, k = (int(a) for a in sys.argv[1:4]) if len(sys.argv) >= 4 else (1024, 1024, 9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, t, generator=g, requires_grad=True)
    mask = torch.rand(n, t, generator=g) > 0.3
    ids = torch.randint(0, k, (n,), generator=g)
    loss = mc.task_weighted_loss(x, mask, ids, torch.rand(k, generator=g), backend="cpu")
    table = torch.rand(k)
    C = _native.native()
    out = torch.empty(n, t)
    mask_np = ta._np(mask, ta._mask_np_view(mask.dtype))
    ids_np, tab_np, out_np = ids.numpy(), table.view(torch.int32).numpy(), out.view(torch.int32).numpy()
    src, dst = torch.rand(n, t), torch.empty(n, t)
    mask_u8, mask_dst = mask.view(torch.uint8), torch.empty(n, t, dtype=torch.uint8)
    print(f"# task_weighted_loss backward, {n} x {t} tokens, K = {k}, {torch.get_num_threads()} thread(s)")
    print("whole backward     ", _median_ms(lambda: torch.autograd.grad(loss, x, retain_graph=True)[0]))
    print("scatter function   ", _median_ms(lambda: ta._scatter_grad_kernel(table, mask, ids, "cpu")))
    print("C++ binding alone  ", _median_ms(lambda: C.task_weighted_grad_cpu(out_np, mask_np, ta._mask_kind(mask.dtype),
                                                                             ids_np, tab_np)))
    print("copy of the bytes  ", _median_ms(lambda: (dst.copy_(src), mask_dst.copy_(mask_u8))))


if __name__ == "__main__":
    main()
