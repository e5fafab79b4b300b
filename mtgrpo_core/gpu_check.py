"""``mtgrpo gpu-check``: the one-command check of the kernels on an NVIDIA GPU (issue 11 item 9).

What it does, on a machine where ``torch.cuda.is_available()``:

1. runs every ``requires_cuda`` test (``pytest -m requires_cuda tests``);
2. runs the GPU benchmarks through their command lines (``bench/bench_grpo_loss.py``,
   ``bench/bench_linear_logprobs.py``, ``bench/bench_task_accumulate.py``) with
   ``MTGRPO_BENCH_DEVICE=cuda`` (a script that honours it skips its CPU cases) and reads the
   JSON line each prints per (case, provider) row (``bench/_harness.py: emit``);
3. writes ONE markdown table, ``bench/results/GPU-CHECK.md``: per GPU row the median time,
   the achieved GB/s (bytes the op must touch / time) or TFLOP/s, that as a percentage of
   the device's datasheet peak (the H200 constants of ``bench/_harness.py``), and the
   paper roofline's lower bound when the bench row carries it.

Budget: every step has a time limit, and the limits add up to 8 minutes on one H200
(tests 200 s, benchmarks 75 + 120 + 45 s, 40 s for start-up and the copy-bandwidth probe);
a step that runs out is stopped, its rows so far are kept, and the table says so.

On a machine without an NVIDIA GPU it measures nothing, writes nothing, prints why, and
exits with status 2.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NO_GPU_EXIT = 2
ROOT = Path(__file__).resolve().parent.parent
# (script, extra argv, time limit in s). Together with the tests: 200 + 240 = 440 s of the
# 480 s budget; the rest covers interpreter start-up, CUDA init and the copy probe.
BENCHES = [("bench_grpo_loss.py", [], 75), ("bench_linear_logprobs.py", [], 120), ("bench_task_accumulate.py", [], 45)]
TESTS_LIMIT_S = 200
BUDGET_S = 480
# The comparisons issue 11 asks for, per op: a missing one is listed as "not measured".
EXPECTED_PROVIDERS = {
    "grpo_loss": ["torch_ref", "torch_ref-compiled", "liger"],
    "linear_logprobs": ["torch_ref", "liger"],
    "task_accumulate": ["torch_ref", "index_add"],
}
# Datasheet peaks (dense). H200 comes from bench/_harness.py when the folder is present.
KNOWN_PEAKS = {
    "H200": {"name": "H200", "hbm_bytes_per_s": 4.8e12, "bf16_flops_per_s": 989e12, "fp32_flops_per_s": 67e12},
    "H100": {"name": "H100 SXM", "hbm_bytes_per_s": 3.35e12, "bf16_flops_per_s": 989e12, "fp32_flops_per_s": 67e12},
    "A100": {"name": "A100 80GB SXM", "hbm_bytes_per_s": 2.039e12, "bf16_flops_per_s": 312e12,
             "fp32_flops_per_s": 19.5e12},
}


def no_gpu_reason() -> str | None:
    """Why no GPU check can run here (None when an NVIDIA GPU is visible to torch)."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no NVIDIA GPU or driver visible)"
    return None


def device_peaks(name: str) -> dict | None:
    """Datasheet peaks for a device name such as 'NVIDIA H200' (None when unknown)."""
    if "H200" in name:
        try:
            sys.path.insert(0, str(ROOT / "bench"))
            from _harness import H200  # the one copy of the H200 constants

            return dict(H200)
        except ImportError:
            return dict(KNOWN_PEAKS["H200"])
        finally:
            sys.path.pop(0)
    for key, peaks in KNOWN_PEAKS.items():
        if key in name:
            return dict(peaks)
    return None


@dataclass
class Step:
    """One subprocess of the check: its command, exit status, time and output."""
    name: str
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    output: str = ""
    note: str = ""
    rows: list[dict] = field(default_factory=list)


def run_step(name: str, cmd: list[str], limit_s: float, env: dict) -> Step:
    """Run ``cmd`` in its own process group; stop the group after ``limit_s`` seconds."""
    st = Step(name)
    if limit_s < 5:
        st.note = "not run: the 8-minute budget was spent"
        return st
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        st.output, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this call started (pytest/bench + children)
        st.output, _ = proc.communicate()
        st.timed_out = True
        st.note = f"stopped after its {limit_s:.0f} s limit; rows printed before that are kept"
    st.rc = proc.returncode
    st.seconds = time.perf_counter() - t0
    return st


def parse_bench_rows(output: str) -> list[dict]:
    """The harness's JSON rows (one per line) in a bench script's output."""
    rows = []
    for line in output.splitlines():
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and {"op", "case", "provider", "device", "median_ms"} <= d.keys():
            rows.append(d)
    return rows


def parse_pytest_summary(output: str) -> dict:
    """Counts from pytest's last summary line ('3 passed, 1 failed in 2.0s')."""
    counts: dict[str, int] = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)", line)
        if found and (" in " in line or "no tests ran" in line):
            for n, what in found:
                counts["error" if what.startswith("error") else what] = int(n)
            break
    return counts


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v and v > 0 else None


def row_metrics(row: dict, peaks: dict | None) -> dict:
    """Achieved rate of one bench row and its share of the device peak.

    FLOP-bound rows (``extra.flops`` or ``extra.gflop``; bf16/fp16 tensor-core peak, the
    FP32 peak when ``extra.tensor_core`` is False) report TFLOP/s; the others report GB/s
    from the bytes the op must touch (``extra.min_bytes`` of the roofline, else the row's
    own ``gbps``). ``lower_bound_ms`` (the roofline) gives time / lower bound."""
    extra = row.get("extra") or {}
    rf = extra.get("roofline") if isinstance(extra.get("roofline"), dict) else extra
    ms = _num(row.get("median_ms"))
    out = {"rate": None, "unit": "", "pct_peak": None, "x_lower_bound": None}
    if ms is None:
        return out
    flops = _num(rf.get("flops")) or (_num(extra.get("gflop")) or 0) * 1e9 or None
    min_bytes = _num(rf.get("min_bytes"))
    if flops and (rf.get("bound") == "compute" or min_bytes is None):
        rate = flops / (ms * 1e-3)
        out.update(rate=rate / 1e12, unit="TFLOP/s")
        if peaks:
            key = "bf16_flops_per_s" if extra.get("tensor_core", rf.get("tensor_core", True)) else "fp32_flops_per_s"
            out["pct_peak"] = 100 * rate / peaks[key]
    else:
        rate = min_bytes / (ms * 1e-3) if min_bytes else (_num(row.get("gbps")) or 0) * 1e9
        if rate:
            out.update(rate=rate / 1e9, unit="GB/s")
            if peaks:
                out["pct_peak"] = 100 * rate / peaks["hbm_bytes_per_s"]
    lb = _num(rf.get("lower_bound_ms"))
    if lb:
        out["x_lower_bound"] = ms / lb
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_table(rows: list[dict], *, device_name: str, peaks: dict | None, tests: dict | None = None,
                 notes: list[str] | None = None) -> str:
    """The GPU-CHECK.md text for the given bench rows (pure: no measurement, no I/O).

    Parameters
    ----------
    rows : harness rows (dicts with op, case, provider, device, median_ms, gbps, extra);
        rows whose device is not CUDA are left out.
    device_name : the GPU's name (torch.cuda.get_device_name).
    peaks : datasheet peaks (``hbm_bytes_per_s``, ``bf16_flops_per_s``, ``fp32_flops_per_s``),
        or None when the device is unknown (the % column stays empty).
    tests : pytest counts of the requires_cuda run (passed, failed, ...), if it ran.
    notes : extra lines (steps that timed out or failed, comparisons not measured).
    """
    gpu_rows = [r for r in rows if str(r.get("device", "")).startswith("cuda")]
    notes = list(notes or [])
    lines = [f"# GPU check: {device_name}", ""]
    if peaks:
        lines.append(f"Peaks used: {peaks['hbm_bytes_per_s'] / 1e12:.2f} TB/s HBM, "
                     f"{peaks['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s bf16 tensor-core, "
                     f"{peaks['fp32_flops_per_s'] / 1e12:.1f} TFLOP/s fp32 "
                     f"({peaks.get('name', device_name)} datasheet).")
    else:
        lines.append("Peaks: unknown for this device; the % of peak column is empty.")
    if tests is not None:
        summary = ", ".join(f"{n} {k}" for k, n in tests.items()) or "no summary line (see the log)"
        lines.append(f"requires_cuda tests: {summary}.")
    lines += ["", "| op | case | provider | median ms | achieved | % of peak | x roofline lower bound |",
              "|---|---|---|---:|---:|---:|---:|"]
    for r in sorted(gpu_rows, key=lambda r: (r["op"], r["case"], r["median_ms"])):
        m = row_metrics(r, peaks)
        achieved = "" if m["rate"] is None else f"{m['rate']:.1f} {m['unit']}"
        lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {r['median_ms']:.3f} | {achieved} | "
                     f"{_fmt(m['pct_peak'], '.1f')} | {_fmt(m['x_lower_bound'], '.2f')} |")
    if not gpu_rows:
        lines.append("| (no GPU rows) | | | | | | |")
    for op, wanted in EXPECTED_PROVIDERS.items():
        have = {r["provider"] for r in gpu_rows if r["op"] == op}
        for w in wanted:
            if not any(p == w or p.startswith(w) for p in have):
                notes.append(f"{op}: no `{w}` row on the GPU (not measured)")
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _copy_bandwidth_row(torch) -> dict:
    """Device-to-device copy of 1 GiB: the practical HBM ceiling (read + write bytes)."""
    n = 1 << 28
    src = torch.ones(n, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = sorted(times)[len(times) // 2]
    nbytes = 2 * n * 4
    return {"op": "memcpy", "case": "1 GiB fp32 copy", "provider": "torch copy_", "device": "cuda",
            "median_ms": ms, "gbps": nbytes / ms / 1e6, "extra": {}}


def main(out: str | os.PathLike | None = None, budget_s: float = BUDGET_S) -> int:
    """Run the check; returns the exit status (0 ok, 1 a step failed, 2 no GPU)."""
    why = no_gpu_reason()
    if why is not None:
        print(f"mtgrpo gpu-check: no NVIDIA GPU found: {why}. Nothing was measured and no table was written.",
              file=sys.stderr)
        return NO_GPU_EXIT
    import torch

    deadline = time.perf_counter() + budget_s
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    name = torch.cuda.get_device_name(0)
    peaks = device_peaks(name)
    out_path = Path(out) if out else ROOT / "bench" / "results" / "GPU-CHECK.md"
    env = dict(os.environ, MTGRPO_BENCH_DEVICE="cuda", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    print(f"# gpu-check on {name}, budget {budget_s:.0f} s", flush=True)
    rows = [_copy_bandwidth_row(torch)]
    notes: list[str] = []
    tests_dir = ROOT / "tests"
    tests = None
    failed = False
    if tests_dir.is_dir():
        st = run_step("pytest -m requires_cuda",
                      [sys.executable, "-m", "pytest", "-q", "-m", "requires_cuda", "-p", "no:cacheprovider",
                       str(tests_dir)], min(TESTS_LIMIT_S, left() - 60), env)
        tests = parse_pytest_summary(st.output)
        print(st.output[-3000:], flush=True)
        if st.rc not in (0, 5) or st.timed_out:  # 5: no test collected
            failed = True
            notes.append(f"pytest -m requires_cuda: exit {st.rc} in {st.seconds:.0f} s. {st.note}".strip())
    else:
        notes.append(f"{tests_dir} not found: requires_cuda tests not run (use a source checkout)")
    for script, argv, limit in BENCHES:
        path = ROOT / "bench" / script
        if not path.exists():
            notes.append(f"{script}: not present in this checkout")
            continue
        st = run_step(script, [sys.executable, str(path), *argv], min(limit, left() - 5), env)
        got = parse_bench_rows(st.output)
        rows += got
        print(f"# {script}: exit {st.rc}, {st.seconds:.0f} s, {len(got)} rows", flush=True)
        if st.rc != 0 or st.timed_out:
            failed = failed or not st.timed_out
            tail = " | ".join(st.output.strip().splitlines()[-3:])[-400:]
            notes.append(f"{script}: exit {st.rc} after {st.seconds:.0f} s. {st.note} {tail}".strip())
    text = format_table(rows, device_name=name, peaks=peaks, tests=tests, notes=notes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    print(text)
    print(f"# written: {out_path} ({budget_s - left():.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
