"""Every Triton kernel compiles for real GPUs (sm_90 and sm_80), with no GPU present.

The interpreter (``TRITON_INTERPRET=1``, used by the numerics tests) accepts kernels that
the Triton compiler rejects, so this test compiles each kernel ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` through the op's real
launcher (``aot_launches()`` in each op module: the block sizes, warps and dtypes the
launcher picks), in a subprocess without the interpreter, and checks the cubin's resources.
"""
import functools
import json
import os
import subprocess
import sys
import tempfile

import pytest

from mtgrpo_core.ops._aot import AOT_MODULES, REG_LIMIT, SMEM_LIMIT_BYTES


@functools.cache  # one compile per module, shared by the fixtures below
def _compile_all(module: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's warning; fusion stays on
    # an empty Triton cache: every kernel is compiled in this run, never loaded from ~/.triton
    # (the same CPU time either way here: 27 s cold, 30 s with ~/.triton warm, under load)
    with tempfile.TemporaryDirectory(prefix="mtgrpo-triton-aot-") as cache:
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
