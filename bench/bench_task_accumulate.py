"""Benchmark of the per-task masked sums and the multi-task weighted loss (``mtgrpo bench ops``).

Cases: N x T in {1M, 8M} tokens (T = 1024, right-padded response masks, fp32 values, bool
mask), K in {3, 9, 100} tasks; modes ``fwd`` (``task_masked_sum``), ``bwd`` (the backward of
``task_weighted_loss`` alone: a retained graph's backward to the token losses) and ``fwd+bwd``
(``task_weighted_loss`` + backward). Providers: ``mtgrpo-cpu`` (C++
path), ``torch_ref`` (the reference from ``mtgrpo_core.reference.task_accumulate``),
``index_add`` (fwd only: the idiomatic torch code, ``(values * mask).sum(1)`` scattered with
``index_add_``), ``mtgrpo-cuda`` on a GPU, and ``memcpy``: a copy of the bytes the op must
touch (the bandwidth ceiling). GB/s counts the bytes the op must touch: values + mask +
task ids read (fwd), plus the mask read and the gradient written (bwd).
Every row's ``extra`` carries the paper roofline (``_harness.roofline``) of its case: the
minimum bytes, the bytes the CUDA kernels move by construction, and the H200 lower bound.
``MTGRPO_BENCH_DEVICE=cpu|cuda`` limits the run to one device (``mtgrpo gpu-check`` sets cuda).
Goal: mtgrpo-cpu at least 2x faster than torch_ref at 1M tokens and 3x at 8M.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, bench_devices, emit, memcpy_ms, peak_memory_mb, quick, roofline, time_fn  # noqa: E402

import mtgrpo_core as mc  # noqa: E402
from mtgrpo_core.reference.task_accumulate import task_masked_sum_ref, task_weighted_loss_ref  # noqa: E402

SHAPES = [(1024, 1024), (8192, 1024)]  # 1M and 8M tokens
QUICK_SHAPES = [(64, 256)]
TASKS = [3, 9, 100]
QUICK_TASKS = [3]


def make_inputs(n: int, t: int, k: int, device: str):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(n, t, generator=g).to(device)
    lengths = torch.randint(t // 4, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(device)
    ids = torch.randint(0, k, (n,), generator=g).to(device)
    weights = (torch.rand(k, generator=g) + 0.5).to(device)
    return values, mask, ids, weights


def paper_roofline(n: int, t: int, k: int, value_bytes: int, mask_bytes: int, mode: str) -> dict:
    """Bytes of one case on paper (fp32 accumulation: 4-byte sums; fp64 values: 8).

    min_bytes: what any implementation must move. Forward: values + mask read once, the
    8-byte task id of each row, sums (acc) + counts (int64) written. Backward adds the mask
    read again and the gradient written (value bytes per token), ids read again.
    kernel_bytes: what the CUDA kernels move as written. Forward: values + mask once, one
    8-byte id read per unit (thread 0 of a block reads it for each of the row's units),
    the partial bins written and read back once (blocks * K * (acc + 4-byte count)), the
    outputs. Backward (task_weighted_grad_kernel): mask read, gradient written, ids read
    once per row (cached across its T elements), the K-entry table.
    """
    from mtgrpo_core import _native

    acc = 8 if value_bytes == 8 else 4
    plan = _native.native().task_masked_sum_plan(n, t, k)
    out = k * (acc + 8)
    fwd_min = n * t * (value_bytes + mask_bytes) + 8 * n + out
    fwd_kernel = (n * t * (value_bytes + mask_bytes) + 8 * plan["units"] + 2 * plan["blocks"] * k * (acc + 4)
                  + out)
    if mode == "fwd":
        return roofline(min_bytes=fwd_min, kernel_bytes=fwd_kernel)
    bwd = n * t * (mask_bytes + value_bytes) + 8 * n + k * value_bytes
    if mode == "bwd":
        return roofline(min_bytes=bwd, kernel_bytes=bwd)
    return roofline(min_bytes=fwd_min + bwd, kernel_bytes=fwd_kernel + bwd)


def main() -> None:
    devices = bench_devices()
    shapes = QUICK_SHAPES if quick() else SHAPES
    tasks = QUICK_TASKS if quick() else TASKS
    rows: list[Row] = []
    for device in devices:
        native = "mtgrpo-cuda" if device == "cuda" else "mtgrpo-cpu"
        backend = "cuda" if device == "cuda" else "cpu"
        have_native = mc.build_info()["cuda_kernels_compiled" if device == "cuda" else "cxx_extension"]
        for n, t in shapes:
            repeats = 3 if quick() else (15 if n * t <= 1 << 20 else 7)
            for k in tasks:
                values, mask, ids, weights = make_inputs(n, t, k, device)
                x = values.clone().requires_grad_(True)
                fwd_bytes = n * t * (values.element_size() + mask.element_size()) + 8 * n
                bwd_bytes = n * t * (mask.element_size() + values.element_size())

                def fwd_ref():
                    return task_masked_sum_ref(values, mask, ids, k)

                def fwd_native():
                    return mc.task_masked_sum(values, mask, ids, k, backend=backend)

                def both_ref():
                    loss = task_weighted_loss_ref(x, mask, ids, weights)
                    return torch.autograd.grad(loss, x)[0]

                def both_native():
                    loss = mc.task_weighted_loss(x, mask, ids, weights, backend=backend)
                    return torch.autograd.grad(loss, x)[0]

                def fwd_index_add():
                    picked = (values * mask).sum(dim=1)
                    sums = torch.zeros(k, dtype=picked.dtype, device=device).index_add_(0, ids, picked)
                    counts = torch.zeros(k, dtype=torch.int64, device=device).index_add_(
                        0, ids, mask.sum(dim=1, dtype=torch.int64))
                    return sums, counts

                # the backward alone (issue 25): one forward, then its retained graph's backward per call
                loss_ref = task_weighted_loss_ref(x, mask, ids, weights)
                loss_nat = mc.task_weighted_loss(x, mask, ids, weights, backend=backend) if have_native else None

                def bwd_ref():
                    return torch.autograd.grad(loss_ref, x, retain_graph=True)[0]

                def bwd_native():
                    return torch.autograd.grad(loss_nat, x, retain_graph=True)[0]

                modes = {"fwd": ({"torch_ref": fwd_ref, "index_add": fwd_index_add}, fwd_native, fwd_bytes),
                         "bwd": ({"torch_ref": bwd_ref}, bwd_native, bwd_bytes),
                         "fwd+bwd": ({"torch_ref": both_ref}, both_native, fwd_bytes + bwd_bytes)}
                for mode, (providers, native_fn, nbytes) in modes.items():
                    if have_native:
                        providers = {**providers, native: native_fn}
                    case = f"{mode}/{n}x{t}/K{k}"
                    rf = paper_roofline(n, t, k, values.element_size(), mask.element_size(), mode)
                    for name, fn in providers.items():
                        med, p20, p80 = time_fn(fn, device=device, warmup=2, repeats=repeats)
                        peak = peak_memory_mb(fn, device=device)
                        rows.append(Row("task_accumulate", case, name, device, med, p20, p80,
                                        gbps=nbytes / med / 1e6, peak_mb=peak,
                                        extra={"tokens": n * t, "tasks": k, "mode": mode, **rf}))
                    med = memcpy_ms(nbytes, device=device)
                    rows.append(Row("task_accumulate", case, "memcpy", device, med, med, med,
                                    gbps=nbytes / med / 1e6, extra={"tokens": n * t, "tasks": k, "mode": mode, **rf}))
                    if mode == "bwd":  # what any op returning a new [N, T] tensor pays: allocate it, write it
                        med, p20, p80 = time_fn(lambda: torch.empty_like(values).fill_(0), device=device, warmup=2,
                                                repeats=repeats)
                        rows.append(Row("task_accumulate", case, "alloc+fill", device, med, p20, p80,
                                        gbps=n * t * values.element_size() / med / 1e6,
                                        extra={"tokens": n * t, "tasks": k, "mode": mode}))
    rows += small_call_rows(devices)
    copy = {(r.case, r.device): r.median_ms for r in rows if r.provider == "memcpy"}
    fresh = {(r.case, r.device): r.median_ms for r in rows if r.provider == "alloc+fill"}
    for r in rows:  # the bandwidth share: a copy of the same bytes in the same run / this row
        if (r.case, r.device) in copy and r.provider not in ("memcpy", "alloc+fill"):
            r.extra["of_copy"] = round(copy[(r.case, r.device)] / r.median_ms, 3)
            if (r.case, r.device) in fresh:  # and of allocating + writing a fresh output of its size
                r.extra["of_alloc_fill"] = round(fresh[(r.case, r.device)] / r.median_ms, 3)
    emit(rows, csv_name="task_accumulate")
    print("# task_accumulate: native path vs torch_ref and vs a copy of the same bytes, same run "
          "(goals: >= 2x torch_ref at 1M, >= 3x at 8M tokens; >= 70% of the copy)")
    for r in rows:
        if r.provider.startswith("mtgrpo") and "min_bytes" in r.extra:
            e = r.extra
            print(f"#   {r.device:4s} {r.case:24s} {r.provider:12s} {r.median_ms:9.3f} ms  {r.gbps:7.2f} GB/s  "
                  f"x{r.speedup_vs_torch_ref:.2f} vs torch_ref  {100 * e['of_copy']:5.1f}% of copy "
                  + (f"{100 * e['of_alloc_fill']:5.1f}% of alloc+fill " if "of_alloc_fill" in e else "") +
                  f"| paper: min {e['min_bytes'] / 1e6:.1f} MB, "
                  f"kernel {e['kernel_bytes'] / 1e6:.1f} MB (x{e['bytes_over_min']}), "
                  f"{e['device_model']} lower bound {e['lower_bound_ms']:.4f} ms")
    for r in rows:
        if r.case.startswith("small/"):
            print(f"#   {r.device:4s} {r.case:24s} {r.provider:12s} median {1e3 * r.median_ms:7.1f} us  "
                  f"p80 {1e3 * r.p80_ms:7.1f} us  (one call; goal <= 10 us for task_masked_sum)")


def small_call_rows(devices: list[str]) -> list[Row]:
    """One call on a tiny 4 x 8 input (the per-call overhead: validation, dispatch, allocation),
    CPU only: median and p80 of many calls."""
    if "cpu" not in devices:
        return []
    values, mask, ids, weights = make_inputs(4, 8, 3, "cpu")
    fns = {"mtgrpo-cpu": lambda: mc.task_masked_sum(values, mask, ids, 3, backend="cpu"),
           "torch_ref": lambda: task_masked_sum_ref(values, mask, ids, 3)}
    if not mc.build_info()["cxx_extension"]:
        del fns["mtgrpo-cpu"]
    out = []
    for name, fn in fns.items():
        med, p20, p80 = time_fn(fn, warmup=200, repeats=200 if quick() else 2000)
        out.append(Row("task_accumulate", "small/fwd/4x8/K3", name, "cpu", med, p20, p80,
                       extra={"tokens": 32, "tasks": 3, "mode": "fwd"}))
    return out


if __name__ == "__main__":
    main()
