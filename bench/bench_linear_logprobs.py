"""Benchmark: fused linear + log-prob (forward + backward) vs the naive full-logits reference.

Case: M = 8192 tokens, H = 512, V = 32,000, fp32 on CPU (the issue's shape); grads wrt hidden and
weight. Providers: ``torch_ref`` (the reference, imported), ``torch_ref-compile`` (torch.compile
of it, inductor's C++ codegen: ~5 s to compile here; skipped with ``--no-compile``), ``mtgrpo-cpu``
(the C++ epilogue + torch BLAS) and, on a GPU, ``mtgrpo-triton`` and ``torch_ref`` on CUDA (bf16).
Prints one JSON line per row (harness) and a summary with peak memory in GB and the ratios.

Every row's ``extra`` carries the paper roofline of its shape on an H200 (``roofline_fwd`` /
``roofline_bwd``, from ``mtgrpo_core.ops.linear_logprobs.cost_model``: minimum bytes, the bytes
the Triton path moves by construction, FLOPs, lower bound in ms), and the script always prints
the roofline of the GPU case M=8192, H=4096, V=151,936 bf16, with or without a GPU.

    python bench/bench_linear_logprobs.py            # the issue's case
    python bench/bench_linear_logprobs.py --sweep    # chunk-size sweep of the chunked path
    MTGRPO_BENCH_QUICK=1 python bench/bench_linear_logprobs.py   # tiny smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Row, bench_devices, emit, peak_memory_mb, quick, roofline  # noqa: E402

from mtgrpo_core.ops.linear_logprobs import cost_model, linear_logprobs  # noqa: E402
from mtgrpo_core.reference.linear_logprobs import linear_logprobs_ref  # noqa: E402

OP = "linear_logprobs"


def make_inputs(M, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, H, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * H ** -0.5).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, V, (M,), generator=g).to(device)
    return h, w, y


def step_fn(fn, h, w, y, *, clear=True, **kw):
    def run():
        if clear:  # off for the memory replay: freeing old grads inside would offset the peak
            h.grad = None
            w.grad = None
        lp = fn(h, w, y, **kw)
        lp.sum().backward()
        return None
    return run


def bench_case(M, H, V, dtype, device, *, compile_ref: bool, warmup: int, repeats: int):
    h, w, y = make_inputs(M, H, V, dtype, device)
    case = f"M={M},H={H},V={V},{str(dtype).replace('torch.', '')},fwd+bwd"
    providers = [("torch_ref", linear_logprobs_ref, {})]
    if compile_ref:
        providers.append(("torch_ref-compile", torch.compile(linear_logprobs_ref, dynamic=False), {}))
    if device == "cuda":
        providers.append(("mtgrpo-triton", linear_logprobs, {"backend": "triton"}))
    providers.append(("mtgrpo-cpu", linear_logprobs, {"backend": "cpu"}))
    rows = []
    inputs_mb = (h.numel() * h.element_size() + w.numel() * w.element_size()) / 2**20
    # Timing is round-robin over the providers (one call each per round) rather than
    # time_fn per provider in turn: on this 2-core machine other jobs' load drifts over minutes
    # and a provider timed last would carry it (sequential runs gave this op 0.8x-2.2x of the
    # reference and torch.compile 0.9x-1.6x of eager for the same code).
    steps = [step_fn(fn, h, w, y, **kw) for _, fn, kw in providers]
    for st in steps:
        for _ in range(warmup):
            st()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for i, st in enumerate(steps):
            t0 = time.perf_counter()
            st()
            if device == "cuda":
                torch.cuda.synchronize()
            times[i].append((time.perf_counter() - t0) * 1e3)
    for (name, fn, kw), ts in zip(providers, times):
        ts.sort()
        q = statistics.quantiles(ts, n=5) if len(ts) >= 5 else [ts[0]] * 4
        med, p20, p80 = statistics.median(ts), q[0], q[3]
        h.grad = w.grad = None
        once = step_fn(fn, h, w, y, clear=False, **kw)
        peak = peak_memory_mb(once, device=device)
        flops = 8 * M * H * V if name.startswith("mtgrpo") else 6 * M * H * V  # fwd 2 + bwd 6 (recompute)
        rows.append(Row(OP, case, name, device, med, p20, p80, peak_mb=peak,
                        extra={"inputs_mb": round(inputs_mb, 1), "gflop": round(flops / 1e9, 1),
                               **paper_roofline(M, H, V, h.element_size())}))
    return rows


def paper_roofline(M, H, V, elt) -> dict:
    """The H200 roofline of the Triton path at this shape (see cost_model's docstring for how the
    bytes are counted: each GEMM-like pass reads its operands once, L2 tiling). fp32 inputs run
    3xTF32 dots on tensor cores in the kernels; the bf16 peak is used for the FLOP bound."""
    c = cost_model(M, H, V, elt)
    fwd = roofline(min_bytes=c["fwd_min_bytes"], kernel_bytes=c["fwd_kernel_bytes"], flops=c["fwd_flops"])
    # backward minimum: its two GEMMs' bytes (the issue's yardstick: kernel <= 2x that)
    bwd = roofline(min_bytes=c["bwd_gemm_bytes"], kernel_bytes=c["bwd_kernel_bytes"], flops=c["bwd_flops"])
    bwd["chunk_columns"], bwd["chunks"] = c["bwd_chunk"], c["bwd_chunks"]
    return {"roofline_fwd": fwd, "roofline_bwd": bwd}


def print_roofline(M, H, V, elt, label):
    r = paper_roofline(M, H, V, elt)
    for k in ("roofline_fwd", "roofline_bwd"):
        x = r[k]
        print(f"# roofline {label} M={M},H={H},V={V} {k[9:]}: min {x['min_bytes'] / 1e9:.2f} GB, kernel "
              f"{x['kernel_bytes'] / 1e9:.2f} GB ({x['bytes_over_min']}x), {x['flops'] / 1e12:.1f} TFLOP, "
              f"H200 lower bound {x['lower_bound_ms']:.2f} ms ({x['bound']} bound)", flush=True)


def summary(rows):
    ref = next(r for r in rows if r.provider == "torch_ref")
    for r in rows:
        print(f"# {r.device} {r.case} {r.provider:>18}: peak {r.peak_mb / 1024:.3f} GB above inputs "
              f"(ref/this = {ref.peak_mb / max(r.peak_mb, 1e-9):.1f}x lower), "
              f"time {r.median_ms / 1e3:.3f} s (this/ref = {r.median_ms / ref.median_ms:.2f}x)", flush=True)


def sweep(M, H, V, reps=3):
    """Fwd+bwd time of the chunked path over chunk sizes, interleaved with the reference so
    that load from other jobs hits every configuration alike (the numbers behind the defaults)."""
    h, w, y = make_inputs(M, H, V, torch.float32, "cpu")
    cfgs = [(256, V), (512, V), (1024, V), (1024, 8192), (2048, 4096), (4096, 2048)]
    fns = {"torch_ref": step_fn(linear_logprobs_ref, h, w, y)}
    for ct, cv in cfgs:
        fns[f"chunk_tokens={ct},chunk_vocab={cv}"] = step_fn(linear_logprobs, h, w, y, backend="cpu",
                                                              chunk_tokens=ct, chunk_vocab=cv)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    ref = min(times["torch_ref"])
    for k, ts in times.items():
        print(f"# sweep {k:>32}: min {min(ts):.3f} s, median {statistics.median(ts):.3f} s, "
              f"min/ref-min {min(ts) / ref:.2f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="chunk-size sweep of the chunked path")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip torch.compile of the reference (compiles in ~5 s here; off in quick mode)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if quick():
        M, H, V, warmup, repeats = 256, 64, 1000, 1, 3
    else:
        M, H, V, warmup, repeats = 8192, 512, 32000, 1, args.repeats
    if args.sweep:
        sweep(M, H, V)
        return 0
    print_roofline(8192, 4096, 151936, 2, "bf16 (paper, H200; bwd min = its two GEMMs)")
    devices = bench_devices()
    if "cpu" in devices:
        rows = bench_case(M, H, V, torch.float32, "cpu", compile_ref=not (args.no_compile or quick()), warmup=warmup,
                          repeats=repeats)
        emit(rows, csv_name=OP)
        summary(rows)
    if "cuda" in devices:
        M2, H2, V2 = (256, 64, 1000) if quick() else (16384, 4096, 151936)
        rows = bench_case(M2, H2, V2, torch.bfloat16, "cuda", compile_ref=False, warmup=2,
                          repeats=repeats)
        emit(rows, csv_name=OP)
        summary(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
