"""Fused LM-head + log-prob: token log-probs (and entropy) from hidden states, never
materialising the ``[M, V]`` logits.

What
----
For hidden states ``h[M, H]`` (or ``[N, T, H]``), the LM head ``W[V, H]`` (optional bias
``b[V]``), sampled tokens ``y[M]`` and a sampling temperature ``tau``::

    z       = (h @ W.T + b) / tau                   # never stored whole
    logp_i  = z[i, y_i] - lse_i,   lse_i = logsumexp_j z[i, j]
    ent_i   = -sum_j p_ij log p_ij = lse_i - sum_j p_ij z_ij

Why: in GRPO the ``[N, T, V]`` logits, not the model, dominate activation memory (V = 151,936
and 2 x 256 completion tokens: 310 MB of bf16 logits with a 902 MB peak, huggingface/trl#3678;
Liger-Kernel's chunked loss cut 37.5 GB to 7.8 GB at B = 16 on an A100). Here memory is
O(M + chunk): besides the inputs and the gradients only ``lse[M]`` and ``ent[M]`` are saved.

Algorithm
---------
Forward: tiles of tokens x vocabulary; each logits tile ``h_tile @ W_tile.T`` (fp32
accumulation) is folded into a running log-sum-exp across vocabulary tiles; the target logit is
picked from whichever tile holds ``y_i``; the entropy is accumulated in the same pass as
``t = sum exp(z - m) (z - m)`` relative to the running max ``m`` (rescaled when ``m`` moves), so
``ent = log s - t / s`` never subtracts two large numbers (peaked logits stay exact).

Backward, per vocabulary chunk ``[v0, v1)`` (and token chunk, for M > 16,384): recompute the
logits of the chunk and form ONCE
``g = dlogp * (onehot(y) - p) - dent * p * (log p + ent)`` (``d ent / d z_j = -p_j (log p_j + ent)``),
then two GEMMs: ``dh += (g @ W[v0:v1]) / tau`` and ``dW[v0:v1] = (g.T @ h) / tau``
(``db[v0:v1] = g.sum(0) / tau``). Each vocabulary chunk owns its ``dW`` rows (written once, in
the weight's dtype, no atomics: deterministic); ``dh`` is one fp32 ``[M, H]`` accumulator.

Backends (``backend=``; the names mean the same in every op of this library)
-----------------------------------------------------------------------------
- ``"triton"``: the Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).
  Forward: one kernel, programs over (token block, vocabulary split) with the online
  statistics merged on the device by torch (O(splits x M)). Backward: one Triton kernel per
  vocabulary chunk writes the ``g`` tile in the input dtype (fp32 logits, fp32 epilogue, one
  rounding) plus per-token-block column sums for ``db``; the two GEMMs run in cuBLAS through
  torch (tensor cores, fp32 accumulation). fp32 inputs use 3xTF32 dots in the kernels
  (``input_precision="tf32x3"``: ~fp32 accuracy on tensor cores; IEEE FMA dots needed 255
  registers and spilled), bf16/fp16 native tensor-core dots. ``chunk_tokens``/``chunk_vocab``
  are the tile sizes BLOCK_M/BLOCK_V (powers of two >= 16), clamped to what fits the
  registers and shared memory of sm_80 and sm_90 (see :func:`_triton_config`).
- ``"cpu"``: the C++ extension (``mtgrpo_core._C.linear_logprobs_fwd_tile`` /
  ``linear_logprobs_bwd_tile``) for the element-wise part, torch's BLAS for the GEMMs. The
  token x vocabulary loop (chunks of ``chunk_tokens`` x ``chunk_vocab``, defaults 1024 x up
  to 32,768) computes each raw logits tile with ``torch.mm``/``addmm`` (95% of the time at
  M=8192, H=512, V=32000 is these GEMMs: a hand-written GEMM would not beat MKL/OpenBLAS), and
  the C++ epilogue does the online log-sum-exp / target / entropy update (forward) or
  overwrites the tile with ``g / tau`` (backward) in one sweep per row, where torch needed
  4-7 element-wise passes over a 128 MB tile. CPU tensors only; bf16/fp16 are upcast to fp32.
- ``"torch"``: the naive reference :func:`mtgrpo_core.reference.linear_logprobs.linear_logprobs_ref`
  (full logits, log_softmax, gather): the oracle. Also what ``"auto"`` picks for meta tensors,
  and on CUDA for float64 (the Triton kernels take fp16/bf16/fp32).
- ``"auto"``: :func:`mtgrpo_core.ops._dispatch.resolve_backend` (CUDA -> triton; CPU -> cpu when
  the extension is built, else torch). ``MTGRPO_BACKEND`` replaces ``"auto"``.

One custom op ``mtgrpo::linear_logprobs`` (+ ``mtgrpo::linear_logprobs_backward``) with fake
implementations and ``register_autograd`` carries the cpu and triton backends, so meta/fake
tensors and ``torch.compile(fullgraph=True)`` trace through it without graph breaks. Value
checks (token ids in range) never synchronise with a CUDA device (``torch._assert_async``).

Precision: logits, log-sum-exp and entropy are fp32 (fp64 for fp64 inputs) whatever the input
dtype; outputs are float32 (float64 for float64 inputs); gradients have their input's dtype.

Cost (M tokens, H hidden, V vocabulary, e bytes per input element; :func:`cost_model`)
--------------------------------------------------------------------------------------
FLOPs: forward ``2 M V H``; backward ``6 M V H`` (recompute the logits + the two GEMMs).
Bytes, counting each GEMM's operands once per call (L2 tiling, as for cuBLAS):

- forward minimum ``(M + V) H e + 12 M`` (ids in, logp/lse out); the kernel re-reads ``h``
  once per vocabulary split and writes ``16 M`` bytes of partials per split.
- the backward's two GEMMs alone move ``2 M V e + 2 V H e + 2 M H e`` (read ``g`` twice, ``W``
  and ``h`` once, write ``dh`` and ``dW``); this backward moves, per vocabulary chunk of ``C``
  columns: g-kernel ``M H e + C H e + M C e``, dh GEMM
  ``M C e + C H e`` + ``2 M H e + 8 M H`` (its bf16 output is added to the fp32 accumulator),
  dW GEMM ``M C e + M H e + C H e``: in total ``3 M V e + 3 V H e + n_chunks (4 M H e + 8 M H)``.

At M=8192, H=4096, V=151,936 bf16 on an H200 (4.8 TB/s, 989 TFLOP/s dense bf16; the chunk is
``C = 32,768`` columns = a 512 MB ``g`` buffer, 5 chunks): forward 1.3 GB / 10.2 TFLOP ->
>= 10.3 ms (compute bound; 1.45 GB by construction, 1.10x the minimum); backward 14.2 GB =
1.87x the 7.6 GB of its two GEMMs / 30.6 TFLOP -> >= 30.9 ms (compute bound; memory alone 3.0 ms).
The previous backward re-read and re-wrote fp32 ``dh``/``dW`` tiles inside its K loop: ~956 GB, ~200 ms.

Source: the online log-sum-exp of Milakov & Gimelshein (2018), "Online normalizer calculation
for softmax"; the fused linear + cross-entropy idea as in Liger-Kernel's FusedLinearCrossEntropy
and Wijmans et al. (2024), "Cut Your Losses in Large-Vocabulary Language Models" (no code taken).
Double backward is not supported.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch

from .. import _native
from ..reference.linear_logprobs import linear_logprobs_ref
from ._dispatch import resolve_backend, register_op

__all__ = ["linear_logprobs", "fused_linear_grpo_loss", "LinearLogprobsConfig", "cost_model"]

register_op("linear_logprobs", triton=True, cpu="linear_logprobs_fwd_tile")

try:  # Triton is optional (pip install 'mtgrpo_core[triton]')
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is installed in the test environment
    HAS_TRITON = False

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# 1 / temperature must stay far inside float32 (3.4e38): logits of |z| ~ 1e3 times 1e30 are
# still finite; below 1e-30 the fp32 paths (and the reference) would overflow to inf / NaN.
_MIN_TEMPERATURE = 1e-30


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Hyperparameters: validated once, packed once
# ----------------------------------------------------------------------------------------------
def _check_chunk(name, c):
    if c is None:
        return
    if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
        raise ValueError(f"{name}: expected None or a positive int, got {c!r}")


@dataclass(frozen=True)
class LinearLogprobsConfig:
    """Hyperparameters of :func:`linear_logprobs` (validated at construction).

    ``chunk_tokens``/``chunk_vocab``: None picks the backend's default (see
    :func:`linear_logprobs`).
    """

    temperature: float = 1.0
    return_entropy: bool = False
    chunk_tokens: int | None = None
    chunk_vocab: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise TypeError(f"temperature: expected a real number > 0, got {type(t).__name__}")
        if not (math.isfinite(float(t)) and float(t) >= _MIN_TEMPERATURE):
            raise ValueError(f"temperature: expected a finite number >= {_MIN_TEMPERATURE} "
                             f"(1/temperature must fit float32 with room), got {t!r}")
        if not isinstance(self.return_entropy, bool):
            raise TypeError(f"return_entropy: expected a bool, got {type(self.return_entropy).__name__}")
        _check_chunk("chunk_tokens", self.chunk_tokens)
        _check_chunk("chunk_vocab", self.chunk_vocab)

    def pack(self) -> tuple[float, bool, int, int]:
        """The primitive arguments of the custom op: (inv_temp, with_entropy, chunk_tokens,
        chunk_vocab) with 0 meaning the backend's default."""
        return (1.0 / float(self.temperature), self.return_entropy, int(self.chunk_tokens or 0),
                int(self.chunk_vocab or 0))


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _mma(a, b, acc, DOT_MODE: tl.constexpr):
        """acc + a @ b with fp32 accumulation. DOT_MODE 0: native fp16/bf16 tensor-core dot;
        1: fp32 operands as 3xTF32 (tensor cores, ~fp32 accuracy; the IEEE FMA dot needed 255
        registers and spilled); 2: upcast to fp32 first (the Triton 3.9 interpreter's dot
        returns garbage for bfloat16 operands, so interpreted bf16 runs take this path)."""
        if DOT_MODE == 2:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif DOT_MODE == 1:
            return tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, mask_m, mask_v, K,
                     stride_hm, stride_wv, inv_temp,
                     HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr, ALIGN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """fp32 tile ``(h[offs_m] @ W[offs_v].T + b[offs_v]) * inv_temp``; out-of-range
        rows/columns hold finite junk (callers mask them). Row offsets are int64: M*H and V*H
        reach 2^31 at e.g. M = 524,288 or V = 524,288 with H = 4096."""
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        # Rows are contiguous along K (the launchers ensure it) and their strides are multiples
        # of ALIGN elements: the loads become 16-byte vectors, which Triton needs to pipeline
        # them with cp.async / TMA (with a runtime K stride the PTX had no cp.async at all).
        row_h = h_ptr + tl.multiple_of(offs_m.to(tl.int64)[:, None] * stride_hm, [ALIGN, 1])
        row_w = w_ptr + tl.multiple_of(offs_v.to(tl.int64)[None, :] * stride_wv, [1, ALIGN])
        for k0 in range(0, K, BLOCK_K):
            offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
            mask_k = offs_k < K
            a = tl.load(row_h + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(row_w + offs_k[:, None], mask=mask_v[None, :] & mask_k[:, None], other=0.0)
            acc = _mma(a, b, acc, DOT_MODE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        return acc * inv_temp

    @triton.jit
    def _linear_logprobs_fwd_kernel(
            h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, M, V, K, v_per_split,
            stride_hm, stride_wv, inv_temp,
            HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_MODE: tl.constexpr, ALIGN: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (token block, vocabulary split): online (max m, sum s = sum e^(z-m),
        t = sum e^(z-m) (z-m), target logit) over its vocabulary range, written to
        ``part[4, splits, M]`` and merged by torch on the device (O(splits x M))."""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        y = tl.load(y_ptr + offs_m, mask=mask_m, other=-1)
        v_start = pid_s * v_per_split
        v_end = tl.minimum(v_start + v_per_split, V)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        s_i = tl.zeros((BLOCK_M,), tl.float32)
        t_i = tl.zeros((BLOCK_M,), tl.float32)
        tgt = tl.zeros((BLOCK_M,), tl.float32)
        for v0 in range(v_start, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < v_end
            z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, mask_m, mask_v, K,
                             stride_hm, stride_wv, inv_temp,
                             HAS_BIAS, DOT_MODE, ALIGN, BLOCK_M, BLOCK_V, BLOCK_K)
            z = tl.where(mask_v[None, :], z, float("-inf"))
            tgt += tl.sum(tl.where((offs_v[None, :] == y[:, None]) & mask_v[None, :], z, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(z, axis=1))  # finite: every tile has a valid column
            alpha = tl.exp(m_i - m_new)                 # 0 on the first tile (m_i = -inf)
            e = tl.exp(z - m_new[:, None])              # 0 on masked columns
            if WITH_ENTROPY:
                # t is relative to the running max: when it moves by d = m_old - m_new (<= 0),
                # sum e_old (z - m_new) = alpha * (t_old + d * s_old); alpha = 0 kills a huge d.
                d = tl.where(s_i > 0, m_i - m_new, 0.0)
                zc = tl.where(mask_v[None, :], z - m_new[:, None], 0.0)
                t_i = tl.where(alpha > 0, alpha * (t_i + d * s_i), 0.0) + tl.sum(e * zc, axis=1)
            s_i = s_i * alpha + tl.sum(e, axis=1)
            m_i = m_new
        base = part_ptr + pid_s.to(tl.int64) * M + offs_m
        stride_q = tl.num_programs(1).to(tl.int64) * M
        tl.store(base, m_i, mask=mask_m)
        tl.store(base + stride_q, s_i, mask=mask_m)
        tl.store(base + 2 * stride_q, t_i, mask=mask_m)
        tl.store(base + 3 * stride_q, tgt, mask=mask_m)

    @triton.jit
    def _linear_logprobs_bwd_g_kernel(
            h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, g_ptr, dbp_ptr,
            M, v_lo, v_hi, K, stride_hm, stride_wv, stride_gm, inv_temp,
            HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_MODE: tl.constexpr, ALIGN: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """One program per (token block, vocabulary block) of the chunk ``[v_lo, v_hi)``:
        recompute the logits tile, write ``g = gl (onehot - p) - ge p (log p + ent)`` (the
        gradient wrt the scaled logits; 1/tau is applied by the GEMMs) in the input dtype to
        ``g[M, v_hi - v_lo]``, and (with a bias) the tile's column sums of the fp32 ``g`` to
        ``dbp[pid_m, :]``. Programs are visited in groups of GROUP_M token blocks so that
        neighbouring programs share W tiles in L2 (the usual grouped GEMM order)."""
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BLOCK_M)
        n_v = tl.cdiv(v_hi - v_lo, BLOCK_V)
        width = GROUP_M * n_v
        first_m = (pid // width) * GROUP_M
        gsize = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsize
        pid_v = (pid % width) // gsize
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)   # column within the chunk
        offs_v = v_lo + offs_c
        mask_v = offs_v < v_hi
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, mask_m, mask_v, K,
                         stride_hm, stride_wv, inv_temp,
                         HAS_BIAS, DOT_MODE, ALIGN, BLOCK_M, BLOCK_V, BLOCK_K)
        y = tl.load(y_ptr + offs_m, mask=mask_m, other=-1)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        gl = tl.load(gl_ptr + offs_m, mask=mask_m, other=0.0)
        mask = mask_m[:, None] & mask_v[None, :]
        # off the edge logp is set to 0 so exp cannot overflow there (lse of a padded row is 0
        # while its junk logit may be 1e4); p = 0 (underflow) contributes exactly 0 even when
        # log p + ent is ~1e30 (temperature 1e-30).
        logp = tl.where(mask, z - lse[:, None], 0.0)
        p = tl.where(mask, tl.exp(logp), 0.0)
        if WITH_ENTROPY:
            ent = tl.load(ent_ptr + offs_m, mask=mask_m, other=0.0)
            ge = tl.load(ge_ptr + offs_m, mask=mask_m, other=0.0)
            coef = gl[:, None] + ge[:, None] * (logp + ent[:, None])
        else:
            coef = gl[:, None]
        pc = tl.where(p > 0, p * coef, 0.0)
        g = tl.where(offs_v[None, :] == y[:, None], gl[:, None], 0.0) - pc
        if HAS_BIAS:
            tl.store(dbp_ptr + pid_m.to(tl.int64) * (v_hi - v_lo) + offs_c, tl.sum(g, axis=0), mask=mask_v)
        ptrs = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_c[None, :]
        tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Resource model of the two kernels (checked by tests/test_triton_compile.py for sm_80/sm_90,
# numbers from `python -m mtgrpo_core.ops._aot mtgrpo_core.ops.linear_logprobs`):
# - registers: the forward carries the fp32 logits tile, its exp, and four running row
#   statistics. Measured with a runtime K stride (before the loads became K-contiguous
#   vectors): 16-bit 64 x 128 with 8 warps 196-208 registers, 128 x 128 hit 255 and spilled
#   8-44 B; fp32 (3xTF32 keeps hi/lo halves of both operands) 64 x 128 x 32 spilled 224-328 B,
#   64 x 128 x 16 sat at 254-255, 64 x 64 x 16 took 191-204. With K-contiguous rows the same
#   tiles take 96-158 registers, no spills. Limits: 64 x 128 (16-bit) / 64 x 64 (fp32)
#   accumulators, which keeps a margin of ~100 registers.
# - shared memory: num_stages x (BLOCK_M + BLOCK_V) x BLOCK_K x e for the pipelined operands
#   must fit sm_80's 163 KB (the smaller of the two targets) with room for the epilogue's
#   reduction / layout-conversion scratch.
_MAX_ACC_TILE = {2: 64 * 128, 4: 64 * 64}
_BLOCK_K = {2: 64, 4: 16}
_MAX_BLOCK_M, _MAX_BLOCK_V = 128, 256
_SMEM_BUDGET = 160 * 1024 - 32 * 1024   # sm_80 opt-in 163 KB, minus 32 KB of epilogue scratch
_DEFAULT_SMS = 132                      # H200 / H100 SXM: used when no CUDA device is at hand (AOT)


@dataclass(frozen=True)
class _TritonConfig:
    block_m: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int


def _triton_config(M: int, K: int, dtype: torch.dtype, chunk_tokens: int, chunk_vocab: int) -> _TritonConfig:
    """Tile sizes for the kernels. User tiles (powers of two >= 16, validated by the public
    function) are clamped: BLOCK_M <= 128 and <= the next power of two of M (>= 16, the
    smallest tl.dot tile), BLOCK_V <= 256, BLOCK_M x BLOCK_V <= 64 x 128 (fp16/bf16) or 64 x 64
    (fp32) accumulators (registers, see above); the pipeline depth is the largest of 3 / 2 / 1
    that fits the shared-memory budget. Defaults: the largest tile, 64 x 128 / 64 x 64
    (conventional tensor-core tiles; not tuned on hardware: no GPU here)."""
    elt = torch.empty((), dtype=dtype).element_size()
    if _interpreting():  # numpy interpreter: small tiles, it is slow
        bm, bv = chunk_tokens or 16, chunk_vocab or 16
        return _TritonConfig(bm, bv, min(32, max(16, _next_pow2(K))), 4, 1)
    bm = min(chunk_tokens or 64, _MAX_BLOCK_M, max(16, _next_pow2(M)))
    bv = min(chunk_vocab or (128 if elt == 2 else 64), _MAX_BLOCK_V)
    while bm * bv > _MAX_ACC_TILE[elt]:   # 128 x 256 -> 64 x 128 (16-bit) / 64 x 64 (fp32)
        if bm > 64:
            bm //= 2
        else:
            bv //= 2
    bk = min(_BLOCK_K[elt], max(16, _next_pow2(K)))
    stages = 3
    while stages > 1 and stages * (bm + bv) * bk * elt > _SMEM_BUDGET:
        stages -= 1
    return _TritonConfig(bm, bv, bk, 8 if bm * bv >= 64 * 64 else 4, stages)


def _dot_mode(hidden: torch.Tensor) -> int:
    if hidden.dtype == torch.float32:
        return 1
    return 2 if (_interpreting() and hidden.dtype == torch.bfloat16) else 0


def _k_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Rows contiguous along K (stride 1), as the kernels assume; a copy only otherwise."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _row_align(hidden: torch.Tensor, weight: torch.Tensor) -> int:
    """Largest ALIGN (elements, 16 bytes at most) dividing both row strides and both base
    addresses: the kernels' loads are then ALIGN-element vectors. Meta tensors have address 0."""
    a = 16 // hidden.element_size()
    def ok(t, a):
        return t.stride(0) % a == 0 and (t.device.type == "meta" or t.data_ptr() % (a * t.element_size()) == 0)
    while a > 1 and not (ok(hidden, a) and ok(weight, a)):
        a //= 2
    return a


def _num_sms(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return _DEFAULT_SMS


def linear_logprobs_fwd(hidden, weight, bias, token_ids, inv_temp: float, with_entropy: bool,
                        chunk_tokens: int = 0, chunk_vocab: int = 0):
    """Triton forward launcher (no host synchronisation).

    Parameters
    ----------
    hidden : Tensor[M, K] fp16/bf16/fp32; weight : Tensor[V, K] same dtype; bias : Tensor[V] | None
    token_ids : int Tensor[M] in [0, V)

    Returns
    -------
    logp[M] fp32, lse[M] fp32, ent[M] fp32 (size 0 when not ``with_entropy``)
    """
    hidden, weight = _k_contiguous(hidden), _k_contiguous(weight)
    M, K = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if M == 0:
        z = torch.zeros(0, dtype=torch.float32, device=dev)
        return z, z.clone(), z.clone()
    cfg = _triton_config(M, K, hidden.dtype, chunk_tokens, chunk_vocab)
    bm, bv = cfg.block_m, cfg.block_v
    n_mblk = triton.cdiv(M, bm)
    n_vtiles = triton.cdiv(V, bv)
    # >= 2 programs per SM for small M; under the interpreter 2 splits exercise the merge
    want = 2 if _interpreting() else max(1, triton.cdiv(2 * _num_sms(dev), n_mblk))
    per = triton.cdiv(n_vtiles, min(want, n_vtiles)) * bv
    n_split = triton.cdiv(V, per)
    y = token_ids.to(torch.int32)  # V < 2^31 always (V * H elements would not fit otherwise)
    part = torch.empty((4, n_split, M), dtype=torch.float32, device=dev)
    b = bias if bias is not None else hidden  # dummy pointer, never read
    _linear_logprobs_fwd_kernel[(n_mblk, n_split)](
        hidden, weight, b, y, part, M, V, K, per,
        hidden.stride(0), weight.stride(0), float(inv_temp),
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, DOT_MODE=_dot_mode(hidden),
        ALIGN=_row_align(hidden, weight), BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    m, s, t, tgt = part.unbind(0)
    lse_s = m + torch.log(s)                     # [S, M] per-split log-sum-exp
    lse = torch.logsumexp(lse_s, dim=0)
    logp = tgt.sum(0) - lse                      # each target lies in exactly one split
    if not with_entropy:
        return logp, lse, logp.new_empty(0)
    # entropy of a mixture of disjoint parts: H = sum_s w_s (H_s - log w_s), w_s = e^(lse_s - lse)
    ent_s = torch.log(s) - t / s
    logw = lse_s - lse
    w = logw.exp()
    ent = torch.where(w > 0, w * (ent_s - logw), 0.0).sum(0)  # w = 0: 0 * inf is not a NaN here
    return logp, lse, ent


# The backward's g buffer holds [Mc, C] in the input dtype: Mc = min(M, 16,384) token rows by C
# vocabulary columns. 512 MB gives C = 32,768 at M = 8192 in bf16 (5 chunks for V = 151,936:
# 1.87x the two GEMMs' bytes, see the module docstring); the naive path holds 5 GB of fp32
# logits (+ grads) there. Token chunks bound C from below for large M: with all M = 2^19 rows in
# one chunk C would be 512 columns and h (4.3 GB) would be re-read twice per each of 297 chunks;
# with Mc = 16,384 rows C = 16,384 and W (1.2 GB) is re-read twice per token chunk instead.
_G_BUDGET_BYTES = 512 * 2**20
_G_MAX_TOKENS = 16384


def _bwd_chunk(M: int, V: int, elt: int, block_v: int) -> int:
    c = max(block_v, _G_BUDGET_BYTES // max(1, M * elt) // block_v * block_v)
    return min(c, triton.cdiv(V, block_v) * block_v)


def _gemm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """acc (fp32) += alpha * a @ b with a, b possibly bf16/fp16: cuBLAS accumulates in fp32
    internally; its bf16 output is added to the fp32 accumulator (one rounding per chunk, the
    extra bytes are counted in cost_model). torch 2.13's mm(out_dtype=) has no CPU kernel, and
    this path also runs under the interpreter on CPU."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
    else:
        acc.add_(torch.mm(a, b), alpha=alpha)


def linear_logprobs_bwd(hidden, weight, bias, token_ids, lse, ent, gl, ge, inv_temp: float,
                        needs: tuple[bool, bool, bool], chunk_tokens: int = 0, chunk_vocab: int = 0):
    """Triton backward launcher: (dhidden, dweight, dbias), each None when not in ``needs``.

    Vocabulary chunks (outer) x token chunks (inner): the g kernel writes ``g`` [Mc, C] in the
    input dtype, then ``dh32[rows] += g @ W_c / tau`` and ``dW_c (+)= g.T @ h[rows] / tau`` run as
    torch GEMMs (cuBLAS on CUDA, fp32 accumulation on tensor cores) and ``db_c`` sums the
    kernel's per-block column sums. With one token chunk (M <= 16,384) ``dW_c`` is written once
    in the weight's dtype; otherwise it accumulates in an fp32 [C, H] buffer.
    """
    hidden, weight = _k_contiguous(hidden), _k_contiguous(weight)
    M, K = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_dh, need_dw, need_db = needs
    dh32 = torch.zeros((M, K), dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_dw else None
    db = torch.zeros_like(bias) if need_db else None
    if M == 0:
        return (dh32.to(hidden.dtype) if need_dh else None), dw, db
    cfg = _triton_config(M, K, hidden.dtype, chunk_tokens, chunk_vocab)
    bm, bv = cfg.block_m, cfg.block_v
    with_entropy = ge is not None
    gl = gl.float().contiguous()
    ge = ge.float().contiguous() if with_entropy else gl
    ent = ent if with_entropy else gl
    lse = lse.contiguous()
    y = token_ids.to(torch.int32)
    b = bias if bias is not None else hidden
    align = _row_align(hidden, weight)
    Mc = min(M, max(bm, _G_MAX_TOKENS // bm * bm))
    C = _bwd_chunk(Mc, V, hidden.element_size(), bv)
    one_tok_chunk = Mc == M
    gbuf = torch.empty(Mc * C, dtype=hidden.dtype, device=dev)
    n_mc = triton.cdiv(Mc, bm)
    dbp = torch.empty(n_mc * C, dtype=torch.float32, device=dev) if bias is not None else gbuf
    dw32 = (torch.empty((C, K), dtype=torch.float32, device=dev)
            if need_dw and not one_tok_chunk else None)
    for v_lo in range(0, V, C):
        v_hi = min(V, v_lo + C)
        c = v_hi - v_lo
        w_c = weight[v_lo:v_hi]
        db_c = torch.zeros(c, dtype=torch.float32, device=dev) if need_db else None
        for t_lo in range(0, M, Mc):
            t_hi = min(M, t_lo + Mc)
            m = t_hi - t_lo
            n_m = triton.cdiv(m, bm)
            g = gbuf[: m * c].view(m, c)
            h_t = hidden[t_lo:t_hi]
            _linear_logprobs_bwd_g_kernel[(n_m * triton.cdiv(c, bv),)](
                h_t, weight, b, y[t_lo:t_hi], lse[t_lo:t_hi], ent[t_lo:t_hi] if with_entropy else ent,
                gl[t_lo:t_hi], ge[t_lo:t_hi] if with_entropy else ge, g, dbp, m, v_lo, v_hi, K,
                hidden.stride(0), weight.stride(0), g.stride(0), float(inv_temp),
                HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, DOT_MODE=_dot_mode(hidden),
                ALIGN=align, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=cfg.block_k, GROUP_M=8,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if need_dh:
                _gemm_acc(dh32[t_lo:t_hi], g, w_c, inv_temp)
            if need_dw:
                if one_tok_chunk:
                    torch.mm(g.T, h_t, out=dw[v_lo:v_hi])
                    if inv_temp != 1.0:
                        dw[v_lo:v_hi].mul_(inv_temp)
                elif t_lo == 0:
                    dw32[:c] = torch.mm(g.T, h_t)
                else:
                    _gemm_acc(dw32[:c], g.T, h_t, 1.0)
            if need_db:
                db_c += dbp[: n_m * c].view(n_m, c).sum(0)
        if need_dw and not one_tok_chunk:
            dw[v_lo:v_hi] = (dw32[:c] * inv_temp).to(dw.dtype)
        if need_db:
            db[v_lo:v_hi] = (db_c * inv_temp).to(db.dtype)
    return (dh32.to(hidden.dtype) if need_dh else None), dw, db


# ----------------------------------------------------------------------------------------------
# CPU path (backend="cpu"): torch BLAS GEMMs + the C++ epilogues
# ----------------------------------------------------------------------------------------------
# Chunk sizes, from `python bench/bench_linear_logprobs.py --sweep` (M=8192, H=512, V=32000,
# fp32, fwd+bwd, interleaved with the reference, best of 3, 2 cores shared with other jobs):
# time / reference = 1.28 (256 x 32000), 1.09 (512 x 32000), 0.98 (1024 x 32000),
# 1.09 (1024 x 8192), 0.97 (2048 x 4096), 1.02 (4096 x 2048) for the torch epilogue this path
# had before; the default is 1024 tokens x up to 32,768 vocabulary entries (a 128 MB fp32 tile;
# the vocabulary chunk follows from the token chunk through _TILE_BUDGET).
_TILE_BUDGET = 32 * 2**20   # elements of one fp32 tile (128 MB)
_DEFAULT_CHUNK_TOKENS = 1024


def _chunked_sizes(M: int, V: int, chunk_tokens: int, chunk_vocab: int) -> tuple[int, int]:
    ct = chunk_tokens or min(max(M, 1), _DEFAULT_CHUNK_TOKENS)
    cv = chunk_vocab or min(V, max(1024, _TILE_BUDGET // ct))
    return max(1, min(ct, max(M, 1))), max(1, min(cv, V))


def _tile(buf: torch.Tensor, h_t, w_v, b_v) -> torch.Tensor:
    """Raw logits h_t @ w_v.T (+ b_v) into the head of the reusable buffer ``buf`` (the C++
    epilogue applies 1/temperature while reading, so no extra pass here)."""
    z = buf[: h_t.shape[0] * w_v.shape[0]].view(h_t.shape[0], w_v.shape[0])
    if b_v is not None:
        torch.addmm(b_v, h_t, w_v.T, out=z)
    else:
        torch.mm(h_t, w_v.T, out=z)
    return z


def _local_ids(y: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
    """Column of each target inside the chunk [v0, v1), -1 outside (int64, contiguous)."""
    return torch.where((y >= v0) & (y < v1), y - v0, -1).contiguous()


def _np(t: torch.Tensor):
    return t.detach().numpy()


def _cpu_fwd(hidden, weight, bias, y, inv_temp, with_entropy, chunk_tokens, chunk_vocab):
    """logp[M], lse[M], ent[M] (size 0 without entropy) in the accumulation dtype."""
    ext = _native.native()
    M, _ = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    ct, cv = _chunked_sizes(M, V, chunk_tokens, chunk_vocab)
    h = hidden.to(acc)
    y = y.long()
    m = torch.full((M,), float("-inf"), dtype=acc)
    s = torch.zeros(M, dtype=acc)
    t = torch.zeros(M, dtype=acc) if with_entropy else None
    tgt = torch.zeros(M, dtype=acc)
    buf = torch.empty(min(ct, M) * cv, dtype=acc)
    for v0 in range(0, V, cv):
        v1 = min(V, v0 + cv)
        w_v = weight[v0:v1].to(acc)
        b_v = bias[v0:v1].to(acc) if bias is not None else None
        local = _local_ids(y, v0, v1)
        for t0 in range(0, M, ct):
            t1 = min(M, t0 + ct)
            z = _tile(buf, h[t0:t1], w_v, b_v)
            ext.linear_logprobs_fwd_tile(_np(z), _np(local[t0:t1]), inv_temp, _np(m[t0:t1]), _np(s[t0:t1]),
                                         None if t is None else _np(t[t0:t1]), _np(tgt[t0:t1]))
    log_s = torch.log(s)
    lse = m + log_s
    ent = log_s - t / s if with_entropy else lse.new_empty(0)
    return tgt - lse, lse, ent


def _cpu_bwd(hidden, weight, bias, y, lse, ent, gl, ge, inv_temp, needs, chunk_tokens, chunk_vocab):
    ext = _native.native()
    M, H = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    ct, cv = _chunked_sizes(M, V, chunk_tokens, chunk_vocab)
    h = hidden.to(acc)
    y = y.long()
    need_dh, need_dw, need_db = needs
    gl = gl.to(acc).contiguous()
    ge = ge.to(acc).contiguous() if ge is not None else None
    ent = ent.to(acc).contiguous() if ge is not None else None
    lse = lse.to(acc).contiguous()
    # zeros, not empty: with M = 0 no tile runs and the gradients are exactly 0 (issue 16 item 3)
    dh = torch.zeros((M, H), dtype=acc) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=weight.dtype) if need_dw else None
    db = torch.zeros(bias.shape, dtype=bias.dtype) if need_db else None
    direct_dw = need_dw and weight.dtype == acc     # accumulate straight into dw's rows
    buf = torch.empty(min(ct, M) * cv, dtype=acc)
    for v0 in range(0, V, cv):
        v1 = min(V, v0 + cv)
        w_v = weight[v0:v1].to(acc)
        b_v = bias[v0:v1].to(acc) if bias is not None else None
        dw_v = (dw[v0:v1] if direct_dw else torch.zeros((v1 - v0, H), dtype=acc)) if need_dw else None
        db_v = torch.zeros(v1 - v0, dtype=acc) if need_db else None
        local = _local_ids(y, v0, v1)
        for t0 in range(0, M, ct):
            t1 = min(M, t0 + ct)
            z = _tile(buf, h[t0:t1], w_v, b_v)
            ext.linear_logprobs_bwd_tile(_np(z), _np(local[t0:t1]), inv_temp, _np(lse[t0:t1]),
                                         None if ge is None else _np(ent[t0:t1]), _np(gl[t0:t1]),
                                         None if ge is None else _np(ge[t0:t1]))
            # z now holds dL/d(raw logits) of the tile
            if need_dh:
                dh[t0:t1].addmm_(z, w_v)
            if need_dw:
                dw_v.addmm_(z.T, h[t0:t1])
            if need_db:
                db_v += z.sum(0)
        if need_dw and not direct_dw:
            dw[v0:v1] = dw_v
        if need_db:
            db[v0:v1] = db_v
    return (dh.to(hidden.dtype) if need_dh else None), dw, db


# ----------------------------------------------------------------------------------------------
# The custom op (+ backward op), fake implementations, autograd
# ----------------------------------------------------------------------------------------------
def _check_ids_range(token_ids: torch.Tensor, V: int) -> None:
    """Token ids in [0, V): eager ValueError on CPU, a device-side assert on CUDA (no host
    synchronisation), nothing for meta tensors."""
    if token_ids.numel() == 0 or token_ids.device.type == "meta":
        return
    if token_ids.device.type == "cuda":
        torch._assert_async(((token_ids >= 0) & (token_ids < V)).all(),
                            "token_ids: expected values in [0, V) (V = weight.shape[0])")
        return
    lo, hi = int(token_ids.min()), int(token_ids.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"token_ids: expected values in [0, {V}) (V = weight.shape[0]), got min {lo}, max {hi}")


_EMPTY = (0,)


@torch.library.custom_op("mtgrpo::linear_logprobs", mutates_args=())
def _linear_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        token_ids: torch.Tensor, inv_temp: float, with_entropy: bool, chunk_tokens: int,
                        chunk_vocab: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp[M], ent[M] or [0], lse[M]) in the accumulation dtype for hidden [M, H]."""
    _check_ids_range(token_ids, weight.shape[0])
    if backend == "triton":
        logp, lse, ent = linear_logprobs_fwd(hidden, weight, bias, token_ids, inv_temp, with_entropy,
                                             chunk_tokens, chunk_vocab)
    elif backend == "cpu":
        logp, lse, ent = _cpu_fwd(hidden, weight, bias, token_ids, inv_temp, with_entropy, chunk_tokens, chunk_vocab)
    else:
        raise ValueError(f"backend: mtgrpo::linear_logprobs runs 'triton' or 'cpu', got {backend!r}")
    return logp, ent, lse


@_linear_logprobs_op.register_fake
def _linear_logprobs_fake(hidden, weight, bias, token_ids, inv_temp, with_entropy, chunk_tokens, chunk_vocab,
                          backend):
    M = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    logp = hidden.new_empty((M,), dtype=acc)
    ent = hidden.new_empty((M,) if with_entropy else _EMPTY, dtype=acc)
    return logp, ent, hidden.new_empty((M,), dtype=acc)


@torch.library.custom_op("mtgrpo::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 token_ids: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
                                 grad_logp: torch.Tensor, grad_ent: torch.Tensor | None, inv_temp: float,
                                 need_dh: bool, need_dw: bool, need_db: bool, chunk_tokens: int,
                                 chunk_vocab: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dhidden, dweight, dbias), each of size 0 when not needed. ``grad_ent`` None: no entropy
    term (the forward ran without entropy, or the entropy is unused)."""
    needs = (need_dh, need_dw, need_db and bias is not None)
    if backend == "triton":
        dh, dw, db = linear_logprobs_bwd(hidden, weight, bias, token_ids, lse, ent, grad_logp, grad_ent, inv_temp,
                                         needs, chunk_tokens, chunk_vocab)
    elif backend == "cpu":
        dh, dw, db = _cpu_bwd(hidden, weight, bias, token_ids, lse, ent, grad_logp, grad_ent, inv_temp, needs,
                              chunk_tokens, chunk_vocab)
    else:
        raise ValueError(f"backend: mtgrpo::linear_logprobs_backward runs 'triton' or 'cpu', got {backend!r}")
    e = hidden.new_empty(_EMPTY)
    return (e if dh is None else dh), (e.clone() if dw is None else dw), (e.clone() if db is None else db)


@_linear_logprobs_backward_op.register_fake
def _linear_logprobs_backward_fake(hidden, weight, bias, token_ids, lse, ent, grad_logp, grad_ent, inv_temp,
                                   need_dh, need_dw, need_db, chunk_tokens, chunk_vocab, backend):
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(_EMPTY)
    dw = torch.empty_like(weight) if need_dw else hidden.new_empty(_EMPTY)
    db = torch.empty_like(bias) if (need_db and bias is not None) else hidden.new_empty(_EMPTY)
    return dh, dw, db


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, token_ids, inv_temp, with_entropy, chunk_tokens, chunk_vocab, backend = inputs
    logp, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, token_ids, lse, ent)
    ctx.cfg = (inv_temp, with_entropy, chunk_tokens, chunk_vocab, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_ent, grad_lse):
    hidden, weight, bias, token_ids, lse, ent = ctx.saved_tensors
    inv_temp, with_entropy, chunk_tokens, chunk_vocab, backend = ctx.cfg
    need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    none = (None,) * 6
    if not (need_dh or need_dw or need_db):
        return (None, None, None) + none
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    ge = grad_ent if with_entropy else None
    dh, dw, db = torch.ops.mtgrpo.linear_logprobs_backward(
        hidden, weight, bias, token_ids, lse, ent, grad_logp, ge, inv_temp, need_dh, need_dw, need_db,
        chunk_tokens, chunk_vocab, backend)
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None) + none


_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _resolve(backend, hidden: torch.Tensor) -> str:
    """The dispatcher's choice, adjusted for what the kernels take: the Triton kernels run
    fp16/bf16/fp32 (an implicit choice falls back to the reference for float64)."""
    be = resolve_backend("linear_logprobs", backend, hidden.device)
    if be == "triton" and hidden.dtype not in _TRITON_DTYPES:
        explicit = backend == "triton" or os.environ.get("MTGRPO_BACKEND", "auto") == "triton"
        if explicit:
            raise TypeError(f"hidden: the triton backend takes float16/bfloat16/float32, got {hidden.dtype}")
        be = "torch"
    return be


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _validate(hidden, weight, token_ids, bias):
    """Shapes, dtypes and devices (eager, no data access)."""
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    _check_tensor("token_ids", token_ids)
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden: expected a float16/bfloat16/float32/float64 tensor, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected shape [M, H] or [N, T, H], got {tuple(hidden.shape)}")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden: the hidden size H (last dim) must be >= 1, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"weight: expected shape [V, H] with V >= 1 and H = {hidden.shape[-1]} "
                         f"(hidden's last dim), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (hidden's dtype), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight: expected device {hidden.device} (hidden's), got {weight.device}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids: expected an integer tensor, got {token_ids.dtype}")
    if tuple(token_ids.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"token_ids: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
                         f"got {tuple(token_ids.shape)}")
    if token_ids.device != hidden.device:
        raise ValueError(f"token_ids: expected device {hidden.device} (hidden's), got {token_ids.device}")
    V = weight.shape[0]
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected shape ({V},) (weight.shape[0]), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: expected dtype {weight.dtype} (weight's dtype), got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias: expected device {hidden.device} (hidden's), got {bias.device}")


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0,
                    return_entropy: bool = False, chunk_tokens: int | None = None,
                    chunk_vocab: int | None = None, backend: str = "auto"):
    """Token log-probs (and entropy) of ``softmax((hidden @ weight.T + bias) / temperature)``
    without materialising the logits.

    Parameters
    ----------
    hidden : Tensor[M, H] or [N, T, H], float16/bfloat16/float32/float64
        Final hidden states (after the last norm), e.g. of the completion tokens' positions.
    weight : Tensor[V, H], same dtype and device as ``hidden``
        The LM head (``lm_head.weight``).
    token_ids : integer Tensor[M] or [N, T] (``hidden``'s leading shape), values in [0, V)
        The tokens whose log-probs are wanted (the sampled completion tokens). Padding positions
        need any valid id (mask them in the loss). On CUDA the range check is a device-side
        assert (no host synchronisation).
    bias : Tensor[V] or None, same dtype as ``weight``
    temperature : float >= 1e-30
        Logits are divided by it (use the sampling temperature, as vLLM/TRL do).
    return_entropy : bool
        Also return the entropy of each token's distribution (differentiable).
    chunk_tokens, chunk_vocab : int or None
        Tile sizes (tokens x vocabulary). "cpu": rows and columns of one BLAS tile (defaults
        1024 tokens x up to 32,768 vocabulary entries). "triton": BLOCK_M / BLOCK_V, powers of
        two >= 16 (defaults 64 x 128 for fp16/bf16, 64 x 64 for fp32), clamped to
        BLOCK_M <= 128, BLOCK_V <= 256 and BLOCK_M x BLOCK_V <= the default's area so that the
        kernels fit sm_80/sm_90 registers and shared memory without spills.
    backend : "auto" | "triton" | "cpu" | "torch"
        "cpu" is the C++ extension (+ torch BLAS), "torch" the naive reference; see the module
        docstring.

    Returns
    -------
    logprobs : Tensor[M] or [N, T], float32 (float64 for float64 inputs)
    entropy : Tensor like ``logprobs``, only when ``return_entropy``

    Raises
    ------
    TypeError, ValueError
        Bad input, naming the argument. RuntimeError: an explicit backend cannot run here.
    """
    cfg = LinearLogprobsConfig(temperature, return_entropy, chunk_tokens, chunk_vocab)
    _validate(hidden, weight, token_ids, bias)
    be = _resolve(backend, hidden)
    if be == "triton":
        for name, c in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
            if c is not None and (c < 16 or c & (c - 1)):
                raise ValueError(f"{name}: the triton backend needs a power of two >= 16, got {c}")
    if be == "torch":
        if not torch.compiler.is_compiling():
            _check_ids_range(token_ids, weight.shape[0])
        return linear_logprobs_ref(hidden, weight, token_ids, bias=bias, temperature=float(temperature),
                                   return_entropy=return_entropy)
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = token_ids.reshape(-1)
    logp, ent, _ = _linear_logprobs_op(h2, weight, bias, y, *cfg.pack(), be)
    logp = logp.view(lead)
    if return_entropy:
        return logp, ent.view(lead)
    return logp


def fused_linear_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor,
                           old_logprobs: torch.Tensor | None, mask: torch.Tensor,
                           advantages: torch.Tensor | None = None, *, bias: torch.Tensor | None = None,
                           temperature: float = 1.0, chunk_tokens: int | None = None,
                           chunk_vocab: int | None = None, backend: str = "auto", **grpo_kwargs):
    """GRPO loss straight from hidden states: :func:`linear_logprobs` feeding
    :func:`mtgrpo_core.ops.grpo_loss.grpo_loss`, so the ``[N, T, V]`` logits never exist.

    Parameters
    ----------
    hidden : Tensor[N, T, H]; weight : Tensor[V, H]; token_ids : integer Tensor[N, T]
        As in :func:`linear_logprobs` (the completion positions' hidden states and tokens).
    old_logprobs, mask, advantages, **grpo_kwargs
        As in ``grpo_loss`` (``old_logprobs`` must come from the same ``temperature``).
    bias, temperature, chunk_tokens, chunk_vocab
        As in :func:`linear_logprobs`.
    backend : str
        Passed to both ops (each resolves it through the one dispatcher).

    Returns
    -------
    loss : 0-d Tensor, differentiable wrt hidden, weight (and bias); stats : GRPOStats
    """
    from .grpo_loss import grpo_loss  # lazy: the loss module is optional for this op

    _check_tensor("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected shape [N, T, H], got {tuple(hidden.shape)}")
    logp = linear_logprobs(hidden, weight, token_ids, bias=bias, temperature=temperature,
                           chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab, backend=backend)
    return grpo_loss(logp, old_logprobs, mask, advantages, backend=backend, **grpo_kwargs)


# ----------------------------------------------------------------------------------------------
# Cost model (module docstring, bench/bench_linear_logprobs.py)
# ----------------------------------------------------------------------------------------------
def cost_model(M: int, H: int, V: int, elt: int, *, sms: int = _DEFAULT_SMS) -> dict:
    """Bytes and FLOPs of the Triton path by construction, with entropy, and the minimum bytes.

    Each GEMM-like pass counts its operands once per launch (L2 tiling, as for cuBLAS; the g
    kernel visits token blocks in groups of 8 for that reason); element-wise torch glue on
    O(M) vectors is included, O(1) launches are not.

    Returns a dict: fwd_min_bytes, fwd_kernel_bytes, fwd_flops, bwd_gemm_bytes (the backward's
    two GEMMs alone: read g twice, W and h once, write dh and dW), bwd_kernel_bytes, bwd_flops,
    bwd_chunk (C, columns of one g buffer) and bwd_chunks.
    """
    bm, bv = 64, (128 if elt == 2 else 64)            # _triton_config's defaults
    n_mblk = -(-M // bm)
    n_vt = -(-V // bv)
    want = max(1, -(-2 * sms // n_mblk))
    per = -(-n_vt // min(want, n_vt)) * bv
    n_split = -(-V // per)
    # forward: h, W, int32 ids in; logp, lse, ent out (fp32)
    fwd_min = (M + V) * H * elt + 4 * M + 3 * 4 * M
    fwd_kernel = (n_split * M * H * elt + V * H * elt + 4 * M   # h once per vocabulary split
                  + 2 * 16 * n_split * M                        # partials (m, s, t, tgt) written + read
                  + 3 * 4 * M)                                  # merged outputs
    Mc = min(M, max(bm, _G_MAX_TOKENS // bm * bm))           # linear_logprobs_bwd's chunking
    C = min(max(bv, _G_BUDGET_BYTES // max(1, Mc * elt) // bv * bv), -(-V // bv) * bv)
    n_chunks, n_tok = -(-V // C), -(-M // Mc)
    gemm = 2 * M * V * elt + 2 * V * H * elt + 2 * M * H * elt
    low = 2 * elt if elt != 4 else 0                          # a 16-bit GEMM output written + read back
    bwd = (3 * M * V * elt                                    # g: written once, read by both GEMMs
           + 2 * n_tok * V * H * elt + V * H * elt            # W by the g kernel and the dh GEMM; dW written
           + n_chunks * (2 * M * H * elt + 5 * 4 * M)         # h by the g kernel and the dW GEMM; row vectors
           + n_chunks * M * H * (low + 8)                     # dh: GEMM output added to the fp32 accumulator
           + (n_tok > 1) * n_tok * V * H * (low + 8)          # dW accumulated in fp32 over token chunks
           + 4 * M * H + (4 + elt) * M * H)                   # zero the fp32 dh, final cast
    return {"fwd_min_bytes": fwd_min, "fwd_kernel_bytes": fwd_kernel, "fwd_flops": 2 * M * V * H,
            "bwd_gemm_bytes": gemm, "bwd_kernel_bytes": bwd, "bwd_flops": 6 * M * V * H,
            "bwd_chunk": C, "bwd_chunks": n_chunks, "bwd_token_chunks": n_tok}


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile configurations (mtgrpo_core/ops/_aot.py, tests/test_triton_compile.py)
# ----------------------------------------------------------------------------------------------
def aot_launches():
    """(config, thunk) pairs: each thunk runs the real forward and backward launchers on meta
    tensors (no memory, no math: the kernel launches are captured, the torch glue is shape-only)
    at the shapes that select distinct specialisations: each dtype, with/without bias and
    entropy, M = 1, M not a multiple of 16 with M*H > 2^31 (int64 offsets), V = 151,936,
    H = 4096, and user tiles that must be clamped (128 x 256)."""
    H, V = 4096, 151936
    cases = [
        # name, dtype, M, bias, entropy, chunk_tokens, chunk_vocab
        ("bf16 M=524291 H=4096 V=151936 bias+entropy", torch.bfloat16, 2**19 + 3, True, True, 0, 0),
        ("fp16 M=1 H=4096 V=151936", torch.float16, 1, False, False, 0, 0),
        ("fp32 M=1000 tiles 128x256 (clamped to 64x64) bias+entropy", torch.float32, 1000, True, True, 128, 256),
        ("bf16 M=8192 tiles 128x256 (clamped to 64x128)", torch.bfloat16, 8192, False, False, 128, 256),
    ]

    def thunk(dtype, M, has_bias, ent, ct, cv):
        def run():
            dev = torch.device("meta")
            h = torch.empty((M, H), dtype=dtype, device=dev)
            w = torch.empty((V, H), dtype=dtype, device=dev)
            b = torch.empty((V,), dtype=dtype, device=dev) if has_bias else None
            y = torch.empty((M,), dtype=torch.int64, device=dev)
            logp, lse, e = linear_logprobs_fwd(h, w, b, y, 1.0 / 0.7, ent, ct, cv)
            g = torch.empty((M,), dtype=torch.float32, device=dev)
            linear_logprobs_bwd(h, w, b, y, lse, e, g, g if ent else None, 1.0 / 0.7, (True, True, has_bias), ct, cv)
        return run

    return [(name, thunk(*args)) for name, *args in cases]
