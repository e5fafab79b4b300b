"""Every Triton kernel compiles for real GPUs (sm_90 and sm_80), with no GPU present.

The interpreter (``TRITON_INTERPRET=1``, used by the numerics tests) accepts kernels that
the Triton compiler rejects, so this test compiles each kernel ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` through the op's real
launcher (``aot_launches()`` in each op module: the block sizes, warps and dtypes the
launcher picks), in a subprocess without the interpreter, and checks the cubin's resources.
Compiled kernels and their figures are cached on disk, keyed by what they are compiled from
(see ``_compile_all``); ``MTGRPO_CACHE_DIR=off`` compiles everything afresh.
"""
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile

import pytest

from mtgrpo_core.ops._aot import AOT_MODULES, REG_LIMIT, SMEM_LIMIT_BYTES, aot_cache_dir


@functools.cache  # one compile per module, shared by the fixtures below
def _compile_all(module: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's warning; fusion stays on
    # Triton's cache in the project's disk cache (aot_cache_dir()/triton), like ccache for the
    # CUDA objects: a kernel whose source, signature, options and compiler are unchanged is
    # loaded from there (its cubin came from a real compile for that target) instead of compiled
    # again: 54 s of the suite cold, ~5 s warm. MTGRPO_CACHE_DIR=off compiles every kernel in
    # this run, into an empty cache.
    folder = aot_cache_dir()
    with contextlib.ExitStack() as stack:
        if folder is None:
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="mtgrpo-triton-aot-"))
        else:
            cache = os.path.join(folder, "triton")
            os.makedirs(cache, exist_ok=True)
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run([sys.executable, "-m", "mtgrpo_core.ops._aot", module], capture_output=True,
                              text=True, env=env, timeout=900)
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not rows:
        raise AssertionError(f"no compile results from {module} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return rows


@pytest.fixture(scope="module", params=AOT_MODULES)
def results(request):
    return request.param, _compile_all(request.param)


def test_every_kernel_compiles_for_sm90_and_sm80(results):
    module, rows = results
    failed = [f"{r['kernel']} [{r['config']}] sm_{r['cc']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, f"{module}: kernels that do not compile:\n" + "\n".join(failed)
    assert {r["cc"] for r in rows} == {90, 80}


def test_resources_fit_the_device(results):
    module, rows = results
    for r in rows:
        assert r["ok"], r
        assert 0 < r["registers"] <= REG_LIMIT, r
        # shared memory must fit the per-block opt-in maximum (227 KB sm_90, 163 KB sm_80)
        assert r["shared_bytes"] <= SMEM_LIMIT_BYTES[r["cc"]], r


def test_low_precision_configs_do_not_spill(results):
    """bf16 / fp16 configurations are the production path: zero register spills."""
    module, rows = results
    low = [r for r in rows if ("bf16" in r["config"] or "fp16" in r["config"])]
    assert low, f"{module}: aot_launches() has no bf16/fp16 configuration"
    spilling = [f"{r['kernel']} [{r['config']}] sm_{r['cc']}: {r['spill_bytes']} B" for r in low if r["spill_bytes"]]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_linear_logprobs_fp32_does_not_spill():
    """linear_logprobs' fp32 path (3xTF32 dots, 64 x 64 x 16 tiles) is spill-free too (issue 11:
    the IEEE FMA dots used 255 registers and spilled in 5 of 6 kernel/arch pairs)."""
    rows = _compile_all("mtgrpo_core.ops.linear_logprobs")
    fp32 = [r for r in rows if "fp32" in r["config"]]
    assert {r["kernel"] for r in fp32} == {"_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_g_kernel"}
    assert {r["cc"] for r in fp32} == {90, 80}
    spilling = [f"{r['kernel']} [{r['config']}] sm_{r['cc']}: {r['spill_bytes']} B" for r in fp32 if r["spill_bytes"]]
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_figures_cache_keys_on_the_bytes_and_survives_a_torn_file(tmp_path, monkeypatch):
    """The on-disk cache of cubin / PTX figures: computed once per (kind, tool, bytes), computed
    again for other bytes or another tool, and a torn entry is recomputed, not trusted."""
    from mtgrpo_core.ops import _aot

    monkeypatch.setenv("MTGRPO_CACHE_DIR", str(tmp_path))
    calls = []

    def compute(v):
        return lambda: calls.append(v) or {"v": v}

    assert _aot._figures("spills", b"ptx-a", "ptxas", compute(1)) == {"v": 1}
    assert _aot._figures("spills", b"ptx-a", "ptxas", compute(2)) == {"v": 1}  # from the cache
    assert _aot._figures("spills", b"ptx-b", "ptxas", compute(3)) == {"v": 3}
    assert _aot._figures("spills", b"ptx-a", "other-ptxas", compute(4)) == {"v": 4}
    (entry,) = [p for p in (tmp_path / "triton-aot" / "res").iterdir() if '"v": 3' in p.read_text()]
    entry.write_text('{"v": ')  # torn
    assert _aot._figures("spills", b"ptx-b", "ptxas", compute(5)) == {"v": 5}
    assert calls == [1, 3, 4, 5]
    monkeypatch.setenv("MTGRPO_CACHE_DIR", "off")
    assert _aot.aot_cache_dir() is None
    assert _aot._figures("spills", b"ptx-a", "ptxas", compute(6)) == {"v": 6}
