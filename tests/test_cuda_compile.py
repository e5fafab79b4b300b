"""Compile proof of the CUDA C++ kernels (csrc/task_accumulate.cu) for sm_80 and sm_90, no GPU needed.

nvcc compiles the .cu file's device code (``-cubin``, the flags of CMakeLists.txt) once per
architecture with ``-Xptxas -v`` and the test reads ptxas' resource report: every kernel
compiles for both, none spills (0 bytes spill stores / loads, 0 bytes stack frame), each
reports its registers, and the shared memory it can ask for (static + the partial
kernel's dynamic bins at K = 4096 in fp64) fits the device (163 KB sm_80, 227 KB sm_90).
It also checks that the built extension was configured for both architectures and that the
CMake build recorded the same ptxas report (build/<tag>/ptxas-task_accumulate-sm_XX.txt).

The two compiles run in parallel, ~15-25 s on 2 loaded cores, or a fraction of a second
through ccache when the source, flags and nvcc are unchanged (``compile_arch``). Without nvcc the tests are
skipped with the reason "requires_nvcc: ..." (pytest -ra prints it); this project's CI
machine has nvcc, and ``test_cuda_kernels_built_when_nvcc_exists`` in
test_task_accumulate.py fails if a CUDA build lost its kernels.

Print the table (kernel, arch, registers, spills, stack, shared memory), one row per kernel
template (``--all``: one per instantiation):

    .venv/bin/python tests/test_cuda_compile.py [--all]
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "task_accumulate.cu"
ARCHS = ("sm_80", "sm_90")
# Opt-in shared memory per block (CUDA C Programming Guide, compute capability tables).
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
# The kernels the .cu instantiates: 4 value types x 7 mask kinds partial sums, 2 combine
# kernels (float, double), 3 element sizes x 7 mask kinds backward scatters.
EXPECTED = {"task_masked_sum_partial_kernel": 28, "task_masked_sum_combine_kernel": 2,
            "task_weighted_grad_kernel": 21}
MAX_TASKS, WARPS_PER_BLOCK = 4096, 8  # csrc/include/mtgrpo/task_accumulate.cuh


def find_nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = find_nvcc()
requires_nvcc = pytest.mark.skipif(
    NVCC is None, reason="requires_nvcc: nvcc (CUDA toolkit) not found on PATH or in /usr/local/cuda/bin; "
                         "the CUDA kernels' compile proof did not run")


def partial_kernel_max_dynamic_smem() -> int:
    """partial_kernel_smem_bytes(4096, 8) of task_accumulate.cuh: fp64 bins + counts for
    K = 4096, aligned to 16, then two tiles of 8 (sum, count) pairs."""
    head = MAX_TASKS * (8 + 4)
    head = (head + 15) & ~15
    return head + 2 * WARPS_PER_BLOCK * (8 + 4)


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if NVCC and not tool:
        cand = Path(NVCC).parent / "cu++filt"
        tool = str(cand) if cand.exists() else None
    if not tool:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short_name(demangled: str) -> str:
    """'void mtgrpo::task_acc::task_masked_sum_partial_kernel<1, 6>(...)' -> 'task_masked_sum_partial_kernel<1, 6>'."""
    head = demangled.split("(")[0]
    head = re.sub(r"^void\s+", "", head)
    return head.replace("mtgrpo::task_acc::", "")


def compile_arch(arch: str) -> dict:
    """nvcc for one architecture with ``-Xptxas -v``; returns rc, stderr and the parsed ptxas
    records. An object (``-c``), through ccache where it is installed: ccache keeps the compiler's
    report with the object and replays it when the source, flags and nvcc are unchanged (the
    CMake build compiles with the same flags, so its compile usually fills the cache). ``-c``
    gives the same ptxas report as ``-cubin``, which ccache does not cache (9 s per architecture)."""
    import tempfile

    launcher = [] if os.environ.get("CCACHE_DISABLE") else [c for c in [shutil.which("ccache")] if c]
    with tempfile.TemporaryDirectory() as d:
        cmd = [*launcher, NVCC, "-std=c++17", "-O3", "--expt-relaxed-constexpr", f"-I{ROOT / 'csrc' / 'include'}",
               f"-I{ROOT / 'csrc'}", f"-arch={arch}", "-Xptxas", "-v", "-c", str(SOURCE), "-o",
               os.path.join(d, f"task_accumulate-{arch}.o")]
        # keyed on paths relative to the checkout (run from its root), as the build's: a
        # fresh clone elsewhere finds the entries
        env = dict(os.environ, CCACHE_BASEDIR=str(ROOT), CCACHE_NOHASHDIR="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    return {"arch": arch, "rc": proc.returncode, "log": proc.stderr, "cmd": " ".join(cmd),
            "kernels": parse_ptxas(proc.stderr, arch)}


def parse_ptxas(log: str, arch: str) -> list[dict]:
    """One record per 'Compiling entry function' block of ptxas -v output."""
    recs: list[dict] = []
    cur: dict | None = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": None,
                   "spill_loads": None, "stack": None, "smem": 0}
            recs.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    names = demangle([r["mangled"] for r in recs])
    for r, n in zip(recs, names):
        r["kernel"] = short_name(n)
        r["family"] = r["kernel"].split("<")[0]
    return recs


_RESULTS: dict[str, dict] | None = None


def results() -> dict[str, dict]:
    """Both architectures compiled once per session, in parallel (one nvcc each)."""
    global _RESULTS
    if _RESULTS is None:
        with ThreadPoolExecutor(max_workers=len(ARCHS)) as ex:
            _RESULTS = {r["arch"]: r for r in ex.map(compile_arch, ARCHS)}
    return _RESULTS


@requires_nvcc
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_kernels_compile_without_spills(arch):
    r = results()[arch]
    assert r["rc"] == 0, f"nvcc failed for {arch}:\n{r['cmd']}\n{r['log'][-4000:]}"
    kernels = r["kernels"]
    counts = {fam: sum(k["family"] == fam for k in kernels) for fam in EXPECTED}
    assert counts == EXPECTED, f"{arch}: expected kernel instantiations {EXPECTED}, ptxas reported {counts}"
    assert all(k["arch"] == arch for k in kernels)
    for k in kernels:
        where = f"{k['kernel']} on {arch}"
        assert k["registers"] is not None and 1 <= k["registers"] <= 255, f"{where}: no register count reported"
        assert k["spill_stores"] == 0 and k["spill_loads"] == 0, (
            f"{where}: spills {k['spill_stores']} B stores / {k['spill_loads']} B loads")
        assert k["stack"] == 0, f"{where}: {k['stack']} B stack frame (local memory)"
        dyn = partial_kernel_max_dynamic_smem() if k["family"] == "task_masked_sum_partial_kernel" else 0
        assert k["smem"] + dyn <= SMEM_LIMIT[arch], f"{where}: {k['smem'] + dyn} B shared memory"


def test_parse_ptxas_reads_spills_and_registers():
    # ptxas' own wording (CUDA 12/13), with a spilling kernel: the parser must see the spill.
    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 360 bytes cmem[0]\n")
    (rec,) = parse_ptxas(log, "sm_90")
    assert (rec["registers"], rec["spill_stores"], rec["spill_loads"], rec["stack"], rec["smem"]) == (255, 12, 8, 16,
                                                                                                        1024)


@requires_nvcc
def test_built_extension_targets_sm80_and_sm90():
    import mtgrpo_core as mc
    from mtgrpo_core import _native

    info = mc.build_info()
    assert info["cuda_kernels_compiled"], "nvcc is installed but the extension was built without CUDA"
    assert {"80", "90"} <= set(str(info["cuda_archs"]).split(",")), info["cuda_archs"]
    cuobjdump = shutil.which("cuobjdump") or str(Path(NVCC).resolve().parent / "cuobjdump")
    if os.path.exists(cuobjdump):  # not shipped with every toolkit install (absent here)
        so = _native.native().__file__
        out = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        for arch in ARCHS:
            assert f".{arch}." in out.stdout, f"{so} has no {arch} cubin:\n{out.stdout}"


def build_reports() -> dict[str, Path]:
    """ptxas reports the CMake build recorded (build/<wheel tag>/ptxas-task_accumulate-sm_XX.txt)."""
    return {p.stem.rsplit("-", 1)[1]: p for p in sorted(ROOT.glob("build/*/ptxas-task_accumulate-sm_*.txt"))}


@requires_nvcc
def test_build_recorded_ptxas_report_without_spills():
    # `make build` (CMakeLists.txt, target mtgrpo_ptxas_report) writes ptxas' report per
    # architecture next to the objects; every in-tree CUDA build dir must have both, clean.
    cuda_builds = [c.parent for c in ROOT.glob("build/*/CMakeCache.txt")
                   if re.search(r"^CMAKE_CUDA_COMPILER:\w+=\S", c.read_text(errors="replace"), re.M)]
    assert cuda_builds, f"no CUDA build folder under {ROOT / 'build'} (run `make build`)"
    for b in cuda_builds:
        for arch in ARCHS:
            report = b / f"ptxas-task_accumulate-{arch}.txt"
            assert report.exists(), f"{report} missing: the build did not record ptxas' resource usage"
            kernels = parse_ptxas(report.read_text(), arch)
            counts = {fam: sum(k["family"] == fam for k in kernels) for fam in EXPECTED}
            assert counts == EXPECTED, f"{report}: {counts}"
            bad = [k["kernel"] for k in kernels if k["spill_stores"] or k["spill_loads"] or k["stack"]]
            assert not bad, f"{report}: spills or stack in {bad}"


def table() -> str:
    lines = ["| kernel | arch | registers | spill stores / loads (B) | stack (B) | shared static + max dynamic (B) |",
             "|---|---|---:|---:|---:|---:|"]
    for arch in ARCHS:
        r = results()[arch]
        if r["rc"] != 0:
            lines.append(f"| (nvcc failed) | {arch} | | | | |")
            continue
        for k in sorted(r["kernels"], key=lambda k: k["kernel"]):
            dyn = partial_kernel_max_dynamic_smem() if k["family"] == "task_masked_sum_partial_kernel" else 0
            lines.append(f"| {k['kernel']} | {arch} | {k['registers']} | {k['spill_stores']} / {k['spill_loads']} "
                         f"| {k['stack']} | {k['smem']} + {dyn} |")
    return "\n".join(lines)


def summary() -> str:
    """One row per kernel template and arch: instantiations, register range, spills, shared."""
    lines = ["| kernel (all instantiations) | arch | count | registers | spill stores / loads (B) | stack (B) "
             "| shared static + max dynamic (B) |", "|---|---|---:|---:|---:|---:|---:|"]
    for arch in ARCHS:
        r = results()[arch]
        for fam in EXPECTED:
            ks = [k for k in r["kernels"] if k["family"] == fam]
            if not ks:
                lines.append(f"| {fam} | {arch} | 0 (nvcc rc={r['rc']}) | | | | |")
                continue
            regs = sorted(k["registers"] for k in ks)
            dyn = partial_kernel_max_dynamic_smem() if fam == "task_masked_sum_partial_kernel" else 0
            lines.append(f"| {fam} | {arch} | {len(ks)} | {regs[0]}-{regs[-1]} | "
                         f"{max(k['spill_stores'] for k in ks)} / "
                         f"{max(k['spill_loads'] for k in ks)} | {max(k['stack'] for k in ks)} | "
                         f"{max(k['smem'] for k in ks)} + {dyn} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if NVCC is None:
        print("requires_nvcc: nvcc not found; nothing compiled", file=sys.stderr)
        sys.exit(2)
    print(table() if "--all" in sys.argv else summary())
    bad = [a for a, r in results().items() if r["rc"] != 0]
    sys.exit(1 if bad else 0)
