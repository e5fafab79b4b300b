"""Per-token cost model of the C++ GRPO loss kernel (issue 25): instruction mix -> cycles.

``python bench/cost_model.py`` (also ``mtgrpo bench cost-model``) compiles
``bench/cost_model/grpo_loss_probe.cpp`` -- the extension's per-ISA translation units
(``csrc/grpo_loss_avx512.cpp``, ``_avx2.cpp``) with its flags, one out-of-line function per
mode -- disassembles the token loop of each mode, counts its instructions by the execution
ports they need, and turns the counts into a lower bound on cycles per token (the busiest
port). It then times the same loop on one thread and prints both, so the gap between the
kernel and its compute bound is a measured figure, and compares it with a copy of the same
bytes timed in the same run.

Port model (Intel Golden Cove / Sapphire and Emerald Rapids server cores, from the uops.info
tables and Intel's optimisation manual): 512-bit vector arithmetic issues on ports 0 and 5
(p0 is p0+p1 fused for zmm); comparisons into a mask register (vcmpps, vpcmpd, vptestnmd),
shuffles and byte widening (vpmovzxbd, vpermd, vpinsrd, vinserti*) only on port 5; float <->
int conversions, vector shifts and mask-register logic only on port 0; up to 3 loads and 2
stores a cycle; 6 uops a cycle from the front end. With 256-bit vectors (AVX2) ports 0, 1 and 5
all take arithmetic. Scalar instructions go to the 5 integer ports (p0, p1, p5, p6, p10).
The bound is the largest of these per-port times: a throughput bound that ignores latency and
is reached only when the loop has enough independent work in flight (16 tokens per block of
independent lanes, so it usually has).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROBE_SRC = ROOT / "bench" / "cost_model" / "grpo_loss_probe.cpp"
HEADERS = [ROOT / "csrc" / "include" / "mtgrpo" / f for f in ("grpo_loss.h", "grpo_forms.h")] + [
    ROOT / "csrc" / f for f in ("grpo_loss_isa.h", "grpo_loss_avx512.cpp", "grpo_loss_avx2.cpp")]
# The flags of the extension's C++ (CMakeLists.txt: -O3 -fno-math-errno) plus what a shared object needs.
CXXFLAGS = ["-O3", "-fno-math-errno", "-std=c++17", "-fPIC", "-shared"]
BLOCK = 16  # tokens per block of the kernel (one zmm, two ymm)

# mode id of probe_time -> (label, probe function suffix)
MODES = {0: ("plain clip", "plain"), 1: ("dual clip", "plain"), 2: ("KL k3", "k3"), 3: ("GSPO", "gspo"),
         4: ("token IS truncate", "is")}

_P5_ONLY = re.compile(r"^(vcmp|vpcmp|vptestn?m|vpmov[zs]x|vperm|vpinsr|vinsert|vextract|vpunpck|vpshuf|vshuf|"
                      r"vpbroadcast[bwdq]?$|vpalignr|vpack|kmov[bwdq]\b.*k, *[re])")
_P0_ONLY = re.compile(r"^(vcvt|vpsll|vpsrl|vpsra|vrndscale|kand|kor|kxor|knot|kshift|kortest|ktest)")
_LOAD = re.compile(r"(ZMMWORD|YMMWORD|XMMWORD|QWORD|DWORD|WORD|BYTE) PTR \[")


def build_probe(out_dir: Path | None = None) -> Path:
    """Compile the probe and return the .so path. Cached by the hash of its sources, the flags
    and the compiler's version, in ``<cache_dir()>/cost-model`` (the library's disk cache, shared
    by every checkout; ``build/cost_model`` when ``MTGRPO_CACHE_DIR=off``)."""
    from mtgrpo_core._cache import cache_dir

    version = subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256((" ".join(CXXFLAGS) + "\n" + version).encode())
    for p in [PROBE_SRC, *HEADERS]:
        h.update(p.read_bytes())
    if out_dir is None:
        base = cache_dir()
        out_dir = Path(base) / "cost-model" if base is not None else ROOT / "build" / "cost_model"
    out_dir.mkdir(parents=True, exist_ok=True)
    so = out_dir / f"grpo_loss_probe_{h.hexdigest()[:16]}.so"
    if not so.exists():
        tmp = so.with_suffix(f".{os.getpid()}.tmp.so")  # concurrent builds each write their own, then rename
        subprocess.run(["g++", *CXXFLAGS, f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", str(PROBE_SRC), "-o",
                        str(tmp)],
                       check=True)
        tmp.replace(so)
    return so


def _disasm(so: Path, func: str) -> list[tuple[int, str]]:
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-M", "intel", f"--disassemble={func}", str(so)],
                         check=True, capture_output=True, text=True).stdout
    ins = []
    for line in out.splitlines():
        m = re.match(r"\s+([0-9a-f]+):\s+(.*)$", line)
        if m and m.group(2).strip():
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    if not ins:
        raise RuntimeError(f"cost model: no code for {func} in {so} (objdump too old for --disassemble=?)")
    return ins


def token_loop(so: Path, func: str) -> list[str]:
    """Instructions of the kernel's 16-token block loop in ``func``: the innermost backward-jump
    loop with the most vector instructions (the main loop over blocks; tails are not loops)."""
    ins = _disasm(so, func)
    addr_idx = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (_a, text) in enumerate(ins):
        m = re.match(r"j(?!mp)\w+\s+([0-9a-f]+)\b", text)  # conditional jumps: a loop's back edge
        if not m:
            continue
        tgt = int(m.group(1), 16)
        if tgt in addr_idx and addr_idx[tgt] <= i:
            loops.append((addr_idx[tgt], i))
    best, best_vec = None, -1
    for lo, hi in loops:
        body = [t for _, t in ins[lo: hi + 1]]
        vec = sum(1 for t in body if t.startswith("v") or t.startswith("k"))
        inner = any(lo < lo2 and hi2 < hi for lo2, hi2 in loops)
        if not inner and vec > best_vec:
            best, best_vec = body, vec
    if best is None:
        raise RuntimeError(f"cost model: no loop found in {func}")
    return best


def classify(body: list[str], zmm: bool) -> dict[str, int]:
    """Counts of the loop's instructions by the resource each needs (see the module docstring)."""
    c = {"total": 0, "vec": 0, "p5": 0, "p0": 0, "load": 0, "store": 0, "scalar": 0}
    for t in body:
        op = t.split()[0]
        if op in ("nop", "xchg") or op.startswith("nop"):
            continue
        c["total"] += 1
        operands = t[len(op):]
        mem = _LOAD.search(operands)
        is_store = bool(mem) and operands.strip().split(",")[0].find("PTR") >= 0 and not op.startswith(("cmp", "test"))
        if is_store:
            c["store"] += 1
        elif mem or (op == "pop"):
            c["load"] += 1
        if op.startswith(("v", "k")):
            if op.startswith(("vmovups", "vmovaps", "vmovdqu", "vmovdqa")) and mem and "{" not in t:
                continue  # a plain vector load or store: load / store ports only
            c["vec"] += 1
            if _P5_ONLY.match(op + operands):
                c["p5"] += 1
            elif _P0_ONLY.match(op):
                c["p0"] += 1
        else:
            c["scalar"] += 1
    return c


def bound_cycles(c: dict[str, int], zmm: bool) -> tuple[float, str]:
    """Cycles per loop iteration: the busiest resource (ports, loads, stores, front end)."""
    vec_ports = 2.0 if zmm else 3.0
    cands = {
        "vector ports": c["vec"] / vec_ports,
        "port 5": float(c["p5"]),
        "port 0": float(c["p0"]),
        "loads": c["load"] / 3.0,
        "stores": c["store"] / 2.0,
        "front end": c["total"] / 6.0,
        "integer ports": c["scalar"] / 5.0,
    }
    # p5-only and p0-only work also occupies the shared vector ports
    name = max(cands, key=cands.get)
    return cands[name], name


def _ptr(a: np.ndarray, ct):
    return a.ctypes.data_as(ctypes.POINTER(ct))


def measure(so: Path, isa: int, mode: int, n: int, t: int, reps: int = 15) -> float:
    """Seconds per pass of the probe's kernel over [n, t] fp32 tokens on one thread (median)."""
    lib = ctypes.CDLL(str(so))
    f = lib.probe_time
    f.restype = ctypes.c_double
    rng = np.random.default_rng(0)
    lp = (-rng.random((n, t), dtype=np.float32) * 2).astype(np.float32)
    old = (lp + 0.1 * rng.standard_normal((n, t), dtype=np.float32)).astype(np.float32)
    ref = (lp + 0.1 * rng.standard_normal((n, t), dtype=np.float32)).astype(np.float32)
    roll = (old + 0.1 * rng.standard_normal((n, t), dtype=np.float32)).astype(np.float32)
    lengths = rng.integers(t // 4, t + 1, n)
    mk = (np.arange(t)[None, :] < lengths[:, None]).astype(np.uint8)
    grad = np.empty((n, t), np.float32)
    part = np.empty((n, 11), np.float64)
    fp = ctypes.POINTER(ctypes.c_float)
    f.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, fp, fp, fp, fp,
                  ctypes.POINTER(ctypes.c_uint8), fp, ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    return f(isa, mode, n, t, _ptr(lp, ctypes.c_float), _ptr(old, ctypes.c_float), _ptr(ref, ctypes.c_float),
             _ptr(roll, ctypes.c_float), _ptr(mk, ctypes.c_uint8), _ptr(grad, ctypes.c_float),
             _ptr(part, ctypes.c_double), reps)


def clock_ghz(so: Path) -> float:
    lib = ctypes.CDLL(str(so))
    lib.probe_clock_ghz.restype = ctypes.c_double
    lib.probe_clock_ghz.argtypes = [ctypes.c_int64, ctypes.c_int]
    return lib.probe_clock_ghz(500_000, 200)  # 2M cycles (about 0.6 ms) a run, the best of 200


def copy_seconds(nbytes: int, reps: int = 15) -> float:
    """Median seconds of copying ``nbytes`` into a preallocated buffer (numpy, one thread)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def cpu_has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512dq", "avx512vl"))


def model_rows(n: int = 64, t: int = 2048, modes=(0, 1, 2, 3, 4)) -> list[dict]:
    """One row per (ISA, mode): instructions per 16 tokens, bound and measured cycles per token,
    and the same pass against a copy of its bytes (9 B read + 4 B written per token, fp32)."""
    so = build_probe()
    ghz = clock_ghz(so)
    isas = [(0, "avx512", True), (1, "avx2", False)] if cpu_has_avx512() else [(1, "avx2", False)]
    rows = []
    extra = {2: 4, 4: 4}  # KL k3 reads ref, token IS reads the rollout log-probs
    for isa, name, zmm in isas:
        for mode in modes:
            label, fn = MODES[mode]
            body = token_loop(so, f"probe_isa_{name}_{fn}")
            c = classify(body, zmm)
            per_iter_tokens = BLOCK  # one loop iteration = one 16-token block (1 zmm or 2 ymm per operation)
            cyc, limiter = bound_cycles(c, zmm)
            sec = measure(so, isa, mode, n, t)
            toks = n * t
            meas_cpt = sec * ghz * 1e9 / toks
            bytes_tok = 13 + extra.get(mode, 0)
            cp = copy_seconds(toks * bytes_tok)
            rows.append({"isa": name, "mode": label, "loop_instructions": c["total"], "vector": c["vec"],
                         "port5": c["p5"], "port0": c["p0"], "loads": c["load"], "stores": c["store"],
                         "scalar": c["scalar"], "tokens_per_iter": per_iter_tokens,
                         "bound_cycles_per_token": cyc / per_iter_tokens, "limiter": limiter,
                         "measured_cycles_per_token": meas_cpt, "of_bound": (cyc / per_iter_tokens) / meas_cpt,
                         "ns_per_token": sec * 1e9 / toks, "copy_ns_per_token": cp * 1e9 / toks,
                         "of_copy": cp / sec, "ghz": ghz})
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Per-token cost model of the C++ GRPO loss kernel: instruction mix of "
                                 "each mode's token loop, the port-bound cycles it implies, and the measured cycles "
                                 "(1 thread) and a copy of the same bytes in the same run. Prints a table; writes "
                                 "nothing.")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--t", type=int, default=2048)
    a = ap.parse_args(argv)
    why = unavailable()
    if why:
        print(f"# cost model skipped: {why}")
        return 0
    rows = model_rows(a.n, a.t)
    print(f"clock {rows[0]['ghz']:.2f} GHz (dependent-add probe); [{a.n}, {a.t}] fp32 tokens, 1 thread")
    hdr = ("isa", "mode", "instr/iter", "vec", "p5", "p0", "ld", "st", "scal", "tok/iter", "bound c/tok", "limiter",
           "meas c/tok", "of bound", "ns/tok", "copy ns/tok", "of copy")
    print(" | ".join(hdr))
    for r in rows:
        print(" | ".join(str(x) for x in (
            r["isa"], r["mode"], r["loop_instructions"], r["vector"], r["port5"], r["port0"], r["loads"], r["stores"],
            r["scalar"], r["tokens_per_iter"], f"{r['bound_cycles_per_token']:.2f}", r["limiter"],
            f"{r['measured_cycles_per_token']:.2f}", f"{100 * r['of_bound']:.0f}%", f"{r['ns_per_token']:.3f}",
            f"{r['copy_ns_per_token']:.3f}", f"{100 * r['of_copy']:.0f}%")))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def unavailable() -> str | None:
    """Why the model cannot run here (None: it can): it disassembles x86-64 code built by g++."""
    import platform
    import shutil

    if platform.machine() not in ("x86_64", "AMD64"):
        return f"the cost model counts x86-64 instructions; this machine is {platform.machine()}"
    missing = [t for t in ("g++", "objdump") if shutil.which(t) is None]
    return f"the cost model needs {' and '.join(missing)} on PATH" if missing else None


def best_isa() -> tuple[str, bool]:
    """The ISA version the extension picks on this CPU (its loop is the one the model counts)."""
    return ("avx512", True) if cpu_has_avx512() else ("avx2", False)


def op_bound(n: int, t: int, threads: int, fn: str = "plain") -> dict:
    """Compute bound of one fused forward + backward over [n, t] tokens on ``threads`` threads:
    the main pass's port-bound cycles per token (this CPU's ISA version of the mode's loop) at the
    measured clock, tokens split evenly. The mask-count pre-pass (1 byte per token) and the
    per-row work are not in it."""
    so = build_probe()
    name, zmm = best_isa()
    c = classify(token_loop(so, f"probe_isa_{name}_{fn}"), zmm)
    cyc, limiter = bound_cycles(c, zmm)
    ghz = clock_ghz(so)
    cpt = cyc / BLOCK
    return {"isa": name, "bound_cycles_per_token": cpt, "limiter": limiter, "ghz": ghz,
            "bound_ms": cpt * n * t / (ghz * 1e9) / max(threads, 1) * 1e3}
