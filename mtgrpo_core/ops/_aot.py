"""Ahead-of-time compilation of the Triton kernels for real GPU targets, without a GPU.

Why: ``TRITON_INTERPRET=1`` runs a kernel's Python body in numpy and accepts code that the
Triton compiler rejects (module-level ``tl.constexpr`` globals, loop-carried variables that
change type, ...). Only ``triton.compile`` for a ``GPUTarget`` proves that a kernel builds
for sm_80 / sm_90, and the cubin it produces tells the registers, spills and shared memory.

How: :func:`capture_launches` replaces a kernel's ``run`` while the library's real launcher
is called on CPU tensors, so the recorded launch has exactly the block sizes, warps and
dtypes the launcher picks; :func:`compile_launch` turns one recorded launch into an
``ASTSource`` and compiles it for ``GPUTarget("cuda", cc, 32)``; :func:`resource_usage`
reads the cubin's registers / stack / spill / shared-memory figures with the ``cuobjdump``
that ships inside the triton wheel.

Cache: the figures read from a cubin or a PTX text are kept in :func:`aot_cache_dir` under the
SHA-256 of those bytes, the tool and the triton version (like ccache: the same bytes through
the same tool give the same figures), so a run whose Triton cache already holds the kernels
starts no ``cuobjdump`` / ``ptxas`` process. ``MTGRPO_CACHE_DIR=off`` turns it off.

Must run with ``TRITON_INTERPRET`` unset (under the interpreter ``@triton.jit`` builds
interpreter objects, not compilable ones): the tests call it in a subprocess.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any
from collections.abc import Iterator

import torch

from .._cache import cache_dir

# Shared memory a block may use (opt-in maximum per block): H100/H200 227 KB, A100 163 KB
# (CUDA C Programming Guide, "Compute capabilities", table of technical specifications).
SMEM_LIMIT_BYTES = {90: 227 * 1024, 80: 163 * 1024}
REG_LIMIT = 255  # registers per thread on sm_80 / sm_90

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1",
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: positional + keyword arguments and the grid."""

    kernel: Any
    args: tuple
    kwargs: dict
    grid: Any


@dataclasses.dataclass
class CompileResult:
    """Outcome of compiling one launch for one architecture."""

    kernel: str
    cc: int
    config: str
    ok: bool
    error: str = ""
    registers: int = -1
    spill_bytes: int = -1  # bytes of spill stores (0 = none)
    stack_bytes: int = -1
    shared_bytes: int = -1  # static + the dynamic shared memory triton requests
    num_warps: int = -1

    def problems(self) -> list[str]:
        """What is wrong with this kernel on this target (empty when it is fine)."""
        out = []
        if not self.ok:
            out.append(f"does not compile: {self.error}")
            return out
        if self.shared_bytes > SMEM_LIMIT_BYTES[self.cc]:
            out.append(f"needs {self.shared_bytes} B of shared memory > {SMEM_LIMIT_BYTES[self.cc]} B on sm_{self.cc}")
        return out


@contextlib.contextmanager
def capture_launches(*kernels) -> Iterator[list[Launch]]:
    """Record every launch of ``kernels`` (``@triton.jit`` functions) instead of running it."""
    records: list[Launch] = []
    saved = []
    for k in kernels:
        if not hasattr(k, "params"):
            raise TypeError(
                f"capture_launches needs compilable @triton.jit kernels, got {type(k).__name__}: "
                "is TRITON_INTERPRET=1 set? AOT compilation must run without the interpreter")

        def fake_run(*args, grid, warmup, _k=k, **kwargs):
            records.append(Launch(_k, args, dict(kwargs), grid))
            return None

        saved.append((k, k.__dict__.get("run")))
        k.run = fake_run
    try:
        yield records
    finally:
        for k, old in saved:
            if old is None:
                del k.run
            else:
                k.run = old


def _sig_type(value) -> str:
    if isinstance(value, torch.Tensor):
        try:
            return "*" + _TORCH_TO_TRITON[value.dtype]
        except KeyError:
            raise TypeError(f"no triton type for tensor dtype {value.dtype}") from None
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot derive a triton signature type for {type(value).__name__}")


def launch_signature(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, options, attrs) of a recorded launch, as triton.compile takes them."""
    params = launch.kernel.params
    bound: dict[str, Any] = {}
    for p, v in zip(params, launch.args):
        bound[p.name] = v
    options = {}
    for name, v in launch.kwargs.items():
        if name in _LAUNCH_OPTIONS:
            options[name] = v
        else:
            bound[name] = v
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        if p.name not in bound:
            if p.has_default:
                bound[p.name] = p.default
            else:
                raise TypeError(f"launch of {launch.kernel.__name__} did not bind argument {p.name!r}")
        v = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
        elif v is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = None
        elif isinstance(v, int) and not isinstance(v, bool) and v == 1 and not p.do_not_specialize:
            # triton's launcher turns an integer argument equal to 1 into a constant
            signature[p.name] = "constexpr"
            constexprs[p.name] = 1
        else:
            signature[p.name] = _sig_type(v)
            # what triton's launcher specialises on: 16-byte aligned pointers (torch allocations
            # are) and integers divisible by 16; with them the compiler may vectorise loads and
            # pipeline them with cp.async, as the kernel would be compiled at run time
            if isinstance(v, torch.Tensor) and v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif (isinstance(v, int) and not isinstance(v, bool) and v % 16 == 0
                  and not p.do_not_specialize):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, options, attrs


def aot_cache_dir() -> str | None:
    """Folder of the AOT caches: ``<cache_dir()>/triton-aot`` (None when the disk cache is off).
    ``triton/`` under it is a Triton cache (``TRITON_CACHE_DIR``) for the test that compiles
    every kernel; ``res/`` holds the figures read from each cubin / PTX."""
    base = cache_dir()
    return None if base is None else os.path.join(base, "triton-aot")


def _figures(kind: str, data: bytes, tool: str, compute) -> dict:
    """``compute()`` (a JSON-able dict read from ``data`` with ``tool``), cached on disk under the
    SHA-256 of (kind, tool, triton version, data); written atomically (temp file + rename)."""
    import triton

    folder = aot_cache_dir()
    if folder is None:
        return compute()
    h = hashlib.sha256(f"{kind}\0{tool}\0{triton.__version__}\0".encode())
    h.update(data)
    path = os.path.join(folder, "res", f"{kind}-{h.hexdigest()}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # absent or a torn file: compute it again
        pass
    value = compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)
    return value


def _cuobjdump() -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump") or ""
    if not tool:
        raise RuntimeError("cuobjdump not found (it ships in the triton wheel under backends/nvidia/bin)")
    return tool


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack, local (spill) and shared bytes of a cubin, read with cuobjdump."""
    tool = _cuobjdump()

    def run() -> dict:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
        if m is None:
            raise RuntimeError(f"could not parse cuobjdump output: {out!r}")
        reg, stack, shared, local = (int(x) for x in m.groups())
        return {"registers": reg, "stack": stack, "shared": shared, "local": local}

    return _figures("res-usage", cubin, tool, run)


def _spill_bytes(ptx: str, cc: int) -> int:
    """Spill-store bytes reported by ptxas -v for the PTX (0 when none)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(cc).path  # the ptxas triton itself uses for this architecture
    arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"

    def run() -> dict:
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            res = subprocess.run([tool, f"-arch={arch}", "-v", src, "-o", os.path.join(d, "k.cubin")],
                                 capture_output=True, text=True)
        text = res.stdout + res.stderr
        stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
        if not stores:
            raise RuntimeError(f"ptxas -v printed no spill figures: {text[-500:]!r}")
        return {"spill_bytes": max(stores)}

    return _figures("spills", ptx.encode(), f"{tool} -arch={arch}", run)["spill_bytes"]


def compile_launch(launch: Launch, cc: int, config: str = "") -> CompileResult:
    """Compile one recorded launch for ``GPUTarget("cuda", cc, 32)`` and measure its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = launch.kernel.__name__
    try:
        signature, constexprs, options, attrs = launch_signature(launch)
        src = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as e:  # noqa: BLE001 - the message is the result
        # triton's CompilationError quotes the source first; the cause is its last line(s)
        causes = []
        while e is not None and len(causes) < 4:
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            causes.append(f"{type(e).__name__}: {lines[-1] if lines else ''}")
            e = e.__cause__
        return CompileResult(name, cc, config, False, error=" <- ".join(causes)[:2000])
    usage = resource_usage(compiled.asm["cubin"])
    spills = _spill_bytes(compiled.asm["ptx"], cc)
    shared = max(int(compiled.metadata.shared), usage["shared"])
    return CompileResult(name, cc, config, True, registers=usage["registers"], spill_bytes=spills,
                         stack_bytes=usage["stack"], shared_bytes=shared,
                         num_warps=int(compiled.metadata.num_warps))


# ---------------------------------------------------------------------------------------
# Driving every op's launchers
# ---------------------------------------------------------------------------------------
# Each module listed here defines ``aot_launches()``: an iterable of ``(config, thunk)``
# where ``thunk()`` calls the module's real launcher on CPU tensors of a representative
# shape. Every ``@triton.jit`` kernel of the module is captured while the thunk runs.
AOT_MODULES = ("mtgrpo_core.ops.grpo_loss", "mtgrpo_core.ops.linear_logprobs")
TARGETS = (90, 80)


def module_kernels(module) -> list:
    """The compilable ``@triton.jit`` kernels defined at the top level of ``module``."""
    from triton.runtime.jit import JITFunction

    return [v for v in vars(module).values() if isinstance(v, JITFunction) and v.__module__ == module.__name__]


def check_module(module, ccs=TARGETS) -> list[CompileResult]:
    """Compile every launch that ``module.aot_launches()`` makes, for every target in ``ccs``."""
    kernels = module_kernels(module)
    if not kernels:
        raise RuntimeError(f"{module.__name__} defines no compilable @triton.jit kernel")
    results = []
    for config, thunk in module.aot_launches():
        with capture_launches(*kernels) as launches:
            thunk()
        if not launches:
            raise RuntimeError(f"{module.__name__}: config {config!r} launched no triton kernel")
        seen = set()
        for launch in launches:
            key = (launch.kernel.__name__, repr(launch_signature(launch)[:3]))
            if key in seen:  # the same specialisation launched twice (e.g. per chunk)
                continue
            seen.add(key)
            for cc in ccs:
                results.append(compile_launch(launch, cc, config))
    return results


def main(argv=None) -> int:
    """``python -m mtgrpo_core.ops._aot [module ...]``: one JSON line per (kernel, config, arch)."""
    import importlib
    import json
    import sys

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs the real triton compiler", file=sys.stderr)
        return 2
    names = (argv if argv is not None else sys.argv[1:]) or list(AOT_MODULES)
    bad = 0
    for name in names:
        for r in check_module(importlib.import_module(name)):
            print(json.dumps(dataclasses.asdict(r)), flush=True)
            bad += bool(r.problems())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
