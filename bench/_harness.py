"""The one benchmark harness: timing, peak memory, bytes/s and CSV rows.

Each case prints one JSON line and appends a CSV row to ``bench/results/<op>.csv``:
op, case (shape), provider, device, median / p20 / p80 time (ms), achieved GB/s for the
bytes the op must touch, peak memory above the inputs (MB), speedup vs ``torch_ref``
measured in the same run, git sha and versions, the UTC date of the run and the machine
(CPU model, cores, GPU). Providers are named ``mtgrpo-<backend>``
and ``torch_ref`` (the reference, imported from ``mtgrpo_core.reference``).
Compare timings only as ratios taken in one run: absolute numbers move with the machine.
"""
from __future__ import annotations

import csv
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, stderr=subprocess.DEVNULL, text=True
        ).strip()
    except Exception:
        return "unknown"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 3, repeats: int = 15,
            min_time_s: float = 0.0) -> tuple[float, float, float]:
    """Median, p20 and p80 wall time of ``fn()`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * repeats:
            break
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def peak_memory_mb(fn: Callable[[], object], *, device: str = "cpu") -> float:
    """Peak memory allocated by torch during ``fn()`` above what was live before, in MB.

    CPU: replays the allocation/free events recorded by the torch profiler in time order
    (memory owned by tensors, including autograd buffers and outputs created by the call), plus
    the CPU output cache's peak in-use bytes during the call (``mtgrpo_core.cpu_cache_info``);
    cross-checked against the process's VmHWM (183 vs 187 MB on a 2048 x 8000 case).
    CUDA: ``torch.cuda.max_memory_allocated`` relative to the memory allocated before.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    from mtgrpo_core import _native
    from mtgrpo_core.ops import _cpu_cache

    # large C++-path outputs come from the CPU output cache, which torch's profiler does not see:
    # its peak in-use bytes during the call are added (an upper bound: the two peaks may differ)
    cache = _native.available()
    if cache:
        _cpu_cache.reset_cpu_cache_peak()
        cache_base = _cpu_cache.cpu_cache_info()["in_use_bytes"]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    cache_peak = _cpu_cache.cpu_cache_info()["peak_in_use_bytes"] - cache_base if cache else 0
    events = []
    for e in prof.events():
        # frees (and allocations outside any op) are "[memory]" events; an op's own
        # allocations are its self memory (children are not counted twice); an op whose self
        # memory is negative (frees inside it, e.g. an autograd.Function dropping its
        # temporaries) has them applied at its end, after its children allocated: an upper bound
        if e.name == "[memory]":
            if e.cpu_memory_usage:
                events.append((e.time_range.start, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage > 0:
            events.append((e.time_range.start, e.self_cpu_memory_usage))
        elif e.self_cpu_memory_usage < 0:
            events.append((e.time_range.end, e.self_cpu_memory_usage))
    events.sort()
    cur = peak = 0
    for _, mem in events:
        cur += mem
        peak = max(peak, cur)
    return (peak + cache_peak) / 2**20


@dataclass
class Row:
    op: str
    case: str
    provider: str
    device: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float | None = None
    peak_mb: float | None = None
    speedup_vs_torch_ref: float | None = None
    extra: dict = field(default_factory=dict)


def machine() -> str:
    """The machine in a few words: CPU model, cores this process may use, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {cores} cores{gpu}"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


CSV_COLUMNS = ["op", "case", "provider", "device", "median_ms", "p20_ms", "p80_ms", "gbps", "peak_mb",
               "speedup_vs_torch_ref", "extra", "git", "torch", "threads", "date", "machine"]


def _upgrade_csv(path: Path) -> None:
    """Rewrite a CSV written before the date and machine columns with those columns added
    (empty for its old rows: when and where they were measured was not recorded)."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] == CSV_COLUMNS:
        return
    head = rows[0]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows[1:]:
            d = dict(zip(head, r))
            w.writerow([d.get(c, "") for c in CSV_COLUMNS])


def versions() -> dict:
    v = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()}
    try:
        import mtgrpo_core

        v["mtgrpo_core"] = mtgrpo_core.__version__
    except Exception:  # pragma: no cover - the harness also runs on a broken install
        pass
    return v


def emit(rows: list[Row], *, csv_name: str | None = None) -> None:
    """Fill ``speedup_vs_torch_ref`` per case, print one JSON line per row, append the CSV."""
    ref = {(r.case, r.device): r.median_ms for r in rows if r.provider == "torch_ref"}
    sha, ver = git_sha(), versions()
    for r in rows:
        base = ref.get((r.case, r.device))
        if base is not None and r.median_ms > 0:
            r.speedup_vs_torch_ref = round(base / r.median_ms, 3)
        d = asdict(r)
        d.update({"git": sha, **ver})
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{csv_name or rows[0].op}.csv"
    new = not path.exists()
    if not new:
        _upgrade_csv(path)
    date, where = utc_now(), machine()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([r.op, r.case, r.provider, r.device, f"{r.median_ms:.4f}", f"{r.p20_ms:.4f}",
                        f"{r.p80_ms:.4f}", "" if r.gbps is None else f"{r.gbps:.3f}",
                        "" if r.peak_mb is None else f"{r.peak_mb:.2f}",
                        "" if r.speedup_vs_torch_ref is None else r.speedup_vs_torch_ref,
                        json.dumps(r.extra), sha, ver["torch"], ver["threads"], date, where])


def memcpy_ms(nbytes: int, *, device: str = "cpu") -> float:
    """Median time of copying ``nbytes`` (the bandwidth ceiling row)."""
    src = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    med, _, _ = time_fn(lambda: dst.copy_(src), device=device, warmup=3, repeats=20)
    return med


def bench_devices() -> list[str]:
    """The devices a benchmark runs on: CPU, and CUDA when present; ``MTGRPO_BENCH_DEVICE=cpu|cuda``
    keeps one of them (``mtgrpo gpu-check`` sets ``cuda`` so no time goes to CPU cases)."""
    want = os.environ.get("MTGRPO_BENCH_DEVICE", "all")
    have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if want not in ("", "all", "cpu", "cuda"):
        raise ValueError(f"MTGRPO_BENCH_DEVICE: expected cpu, cuda or all, got {want!r}")
    return have if want in ("", "all") else [d for d in have if d == want]


def quick() -> bool:
    """MTGRPO_BENCH_QUICK=1 shrinks every benchmark (used by the test that runs them)."""
    return os.environ.get("MTGRPO_BENCH_QUICK", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------
# Roofline on paper (until a GPU is measured): bytes and FLOPs against the H200's peaks
# ---------------------------------------------------------------------------------------
# NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s dense BF16/FP16 tensor-core,
# 67 TFLOP/s FP32 (non-tensor), 132 SMs.
H200 = {"name": "H200", "hbm_bytes_per_s": 4.8e12, "bf16_flops_per_s": 989e12, "fp32_flops_per_s": 67e12,
        "sms": 132}


def roofline(*, min_bytes: float, kernel_bytes: float, flops: float = 0.0, tensor_core: bool = True,
             device: dict = H200) -> dict:
    """The paper roofline of one op: the minimum bytes it must move, the bytes the kernel moves
    by construction, their ratio, and the lower bound on its time on ``device`` (ms):
    max(kernel_bytes / bandwidth, flops / peak FLOP/s).

    Parameters
    ----------
    min_bytes : bytes any implementation must read and write (inputs once, outputs once).
    kernel_bytes : bytes this kernel reads and writes as written (re-reads included).
    flops : floating-point operations (2 per multiply-add); 0 for memory-bound ops.
    tensor_core : whether the FLOPs run on tensor cores (bf16/fp16/tf32 GEMMs) or CUDA cores.
    """
    if min_bytes <= 0 or kernel_bytes <= 0:
        raise ValueError(f"min_bytes and kernel_bytes must be > 0, got {min_bytes}, {kernel_bytes}")
    peak = device["bf16_flops_per_s"] if tensor_core else device["fp32_flops_per_s"]
    t_mem = kernel_bytes / device["hbm_bytes_per_s"]
    t_flop = flops / peak if flops else 0.0
    return {
        "device_model": device["name"],
        "min_bytes": int(min_bytes),
        "kernel_bytes": int(kernel_bytes),
        "bytes_over_min": round(kernel_bytes / min_bytes, 3),
        "flops": int(flops),
        "lower_bound_ms": round(max(t_mem, t_flop) * 1e3, 4),
        "bound": "memory" if t_mem >= t_flop else "compute",
    }
