"""Benchmark of the fused GRPO loss, forward + backward (``mtgrpo bench ops``).

Providers: ``mtgrpo-cpu`` (C++), ``torch_ref`` (the eager reference, same statistics),
``torch_ref-compiled`` (``torch.compile`` of the reference), ``mtgrpo-triton`` (GPU only),
and a ``memcpy`` row: a copy of the bytes the op must touch (logprobs, old_logprobs and
mask read, the gradient written), the bandwidth ceiling. Inputs use the fused path
(rewards + group ids of 8-completion groups), token-mean aggregation, fp32.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, emit, memcpy_ms, peak_memory_mb, quick, time_fn  # noqa: E402

import mtgrpo_core as mc  # noqa: E402
from mtgrpo_core.config import GRPOConfig  # noqa: E402
from mtgrpo_core.reference.grpo_loss import grpo_loss_ref  # noqa: E402

SHAPES = [(64, 1024), (256, 2048), (512, 2048)]
QUICK_SHAPES = [(16, 128)]


def make_inputs(n: int, t: int, device: str):
    g = torch.Generator().manual_seed(0)
    lp = (-torch.rand(n, t, generator=g) * 2).to(device)
    old = (lp + 0.1 * torch.randn(n, t, generator=g).to(device))
    lengths = torch.randint(t // 4, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(device)
    rewards = torch.randint(0, 2, (n,), generator=g).float().to(device)
    gids = (torch.arange(n) // 8).to(device)
    return lp, old, mask, rewards, gids


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    shapes = QUICK_SHAPES if quick() else SHAPES
    repeats = 3 if quick() else 15
    rows: list[Row] = []
    cfg = GRPOConfig()
    compiled_ref = torch.compile(grpo_loss_ref, dynamic=False)
    for device in devices:
        for n, t in shapes:
            lp0, old, mask, rewards, gids = make_inputs(n, t, device)
            case = f"{n}x{t}"
            nbytes = n * t * (4 + 4 + 1 + 4)
            providers = {
                "torch_ref": lambda x: grpo_loss_ref(x, old, mask, rewards=rewards, group_ids=gids, config=cfg)[0],
                "torch_ref-compiled": lambda x: compiled_ref(x, old, mask, rewards=rewards, group_ids=gids, config=cfg)[0],
            }
            if device == "cpu" and mc.build_info()["cxx_extension"]:
                providers["mtgrpo-cpu"] = lambda x: mc.grpo_loss(x, old, mask, rewards=rewards, group_ids=gids,
                                                               backend="cpu")[0]
            if device == "cuda":
                providers["mtgrpo-triton"] = lambda x: mc.grpo_loss(x, old, mask, rewards=rewards, group_ids=gids,
                                                                  backend="triton")[0]
            for name, fn in providers.items():
                x = lp0.clone().requires_grad_()

                def step(fn=fn, x=x):
                    x.grad = None
                    loss = fn(x)
                    loss.backward()
                    return loss

                med, p20, p80 = time_fn(step, device=device, warmup=3, repeats=repeats)
                x.grad = None
                peak = peak_memory_mb(step, device=device)
                rows.append(Row("grpo_loss", case, name, device, med, p20, p80, gbps=nbytes / med / 1e6,
                                peak_mb=peak, extra={"fwd_bwd": True, "inputs_mb": round(n * t * 9 / 2**20, 2),
                                                     "one_fp32_NxT_mb": round(n * t * 4 / 2**20, 2)}))
            mc_ms = memcpy_ms(nbytes, device=device)
            rows.append(Row("grpo_loss", case, "memcpy", device, mc_ms, mc_ms, mc_ms, gbps=nbytes / mc_ms / 1e6))
    emit(rows)
    # Summary of the goals at the largest shape (issue: >= 10x eager, >= 2x compiled, memory <= one [N, T] fp32).
    big = f"{shapes[-1][0]}x{shapes[-1][1]}"
    by = {r.provider: r for r in rows if r.case == big and r.device == "cpu"}
    if "mtgrpo-cpu" in by:
        c = by["mtgrpo-cpu"]
        print(f"# summary {big} cpu fwd+bwd: mtgrpo-cpu {c.median_ms:.3f} ms ({c.gbps:.1f} GB/s, memcpy ceiling "
              f"{by['memcpy'].gbps:.1f} GB/s); vs torch_ref {by['torch_ref'].median_ms / c.median_ms:.1f}x; vs "
              f"torch_ref-compiled {by['torch_ref-compiled'].median_ms / c.median_ms:.1f}x; peak above inputs "
              f"{c.peak_mb:.1f} MB (one [N,T] fp32 = {c.extra['one_fp32_NxT_mb']} MB)")


if __name__ == "__main__":
    main()
