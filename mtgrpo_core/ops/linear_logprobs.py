"""Fused LM-head + log-prob: token log-probs (and entropy) from hidden states, never
materialising the ``[M, V]`` logits.

What
----
For hidden states ``h[M, H]`` (or ``[N, T, H]``), the LM head ``W[V, H]`` (optional bias
``b[V]``), sampled tokens ``y[M]`` and a sampling temperature ``tau``::

    z       = (h @ W.T + b) / tau                   # never stored
    logp_i  = z[i, y_i] - lse_i,   lse_i = logsumexp_j z[i, j]
    ent_i   = -sum_j p_ij log p_ij = lse_i - sum_j p_ij z_ij

Why: in GRPO the ``[N, T, V]`` logits, not the model, dominate activation memory (V = 151,936
and 2 x 256 completion tokens: 310 MB of bf16 logits with a 902 MB peak, huggingface/trl#3678;
Liger-Kernel's chunked loss cut 37.5 GB to 7.8 GB at B = 16 on an A100). Here memory is
O(M + tile): besides the inputs and the gradients only ``lse[M]`` and ``ent[M]`` are saved.

Algorithm
---------
Forward: tiles of tokens x vocabulary; each logits tile is ``h_tile @ W_tile.T`` (fp32
accumulation), folded into a running log-sum-exp across vocabulary tiles; the target logit is
picked from whichever tile holds ``y_i``; the entropy is accumulated in the same pass as
``sum exp(z - m) (z - m)`` relative to the running max ``m`` (rescaled when ``m`` moves), so
``ent = log s - t / s`` never subtracts two large numbers (peaked logits stay exact).
Backward recomputes each tile and forms ``dz = dlogp * (onehot(y) - p) - dent * p * (log p + ent)``
(the second term is d ent / d z_j = -p_j (z_j - sum_k p_k z_k) and z_j - sum p z = log p_j + ent),
scaled by ``1 / tau``, then accumulates ``dh += dz @ W_tile``, ``dW_tile += dz.T @ h_tile`` and
``db_tile += dz.sum(0)``.

Backends (``backend=``)
-----------------------
- ``"triton"``: three kernels (forward; backward dh with one program per token block; backward
  dW/db with one program per vocabulary block). Each program owns its output rows, so the
  backward is deterministic (no atomics) at the price of recomputing the logits twice.
  ``tl.dot`` tiles with fp32 accumulation; fp32 inputs use IEEE fp32 dots (no TF32), bf16/fp16
  inputs use tensor-core dots with the backward ``dz`` rounded to the input dtype (as cuBLAS
  would see it in the naive path). ``chunk_tokens``/``chunk_vocab`` are the tile sizes
  BLOCK_M/BLOCK_V (powers of two >= 16). Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1``.
- ``"cpu"``: the chunked PyTorch path: a ``torch.autograd.Function`` that loops over vocabulary
  chunks (outer) and token chunks (inner) with BLAS matmuls into reused buffers and recomputes
  each tile in backward. Without entropy the backward keeps ``p`` in the tile and applies the
  per-token factor ``-dlogp`` to the ``[chunk, H]`` operands of the matmuls, adding the one-hot
  part by row gathers/scatters, so a tile sees two element-wise passes (``- lse``, ``exp``).
  This is the CPU production path, and not C++: profiled at M=8192, H=512, V=32000 it spends
  95% of its time in the four BLAS calls (``mm``/``addmm_``), so a hand-written kernel has
  nothing left to win. It is device-agnostic, so ``"auto"`` also uses it on CUDA when Triton
  cannot run (or for float64). It has no C++ symbol for the dispatcher, hence resolved here.
- ``"torch"``: the naive reference :func:`mtgrpo_core.reference.linear_logprobs.linear_logprobs_ref`
  (full logits, log_softmax, gather): the oracle.
- ``"auto"``: CUDA -> triton (chunked for float64 or without Triton); CPU -> cpu (chunked).
  ``MTGRPO_BACKEND`` replaces ``"auto"``.

Precision: logits, log-sum-exp and entropy are fp32 (fp64 for fp64 inputs) whatever the input
dtype; outputs are float32 (float64 for float64 inputs); gradients have their input's dtype.

Cost
----
FLOPs: forward ``2 M V H``; backward ``6 M V H`` on the chunked path (recompute + dh + dW) and
``8 M V H`` on Triton (the logits are recomputed by both backward kernels); the naive reference
does ``6 M V H`` in all but writes and reads ~6 ``M x V`` fp32 tensors (logits, log-softmax, their
grads) through memory. Bytes: inputs once per tile sweep (``W`` is re-read once per token chunk,
``h`` once per vocabulary chunk), outputs ``M`` floats; extra memory: one or two
``chunk_tokens x chunk_vocab`` fp32 tiles, fp32 ``dh[M, H]`` and ``dW`` accumulators (and fp32
copies of bf16/fp16 inputs on the chunked path). Measured (``bench/bench_linear_logprobs.py``,
M=8192, H=512, V=32000, fp32, fwd+bwd, 2 shared cores): peak 0.22 GB above inputs vs 2.93 GB for
the reference (0.98 GB for ``torch.compile`` of it); time about the reference's (0.8-1.2x).

Source: the online log-sum-exp of Milakov & Gimelshein (2018), "Online normalizer calculation
for softmax"; the fused linear + cross-entropy idea as in Liger-Kernel's FusedLinearCrossEntropy
and Wijmans et al. (2024), "Cut Your Losses in Large-Vocabulary Language Models" (no code taken).
Double backward is not supported.
"""
from __future__ import annotations

import math
import numbers
import os

import torch
from torch.autograd.function import once_differentiable

from ..reference.linear_logprobs import linear_logprobs_ref
from ._dispatch import BACKENDS, register_op, resolve_backend

__all__ = ["linear_logprobs", "fused_linear_grpo_loss", "LinearLogprobsFunction"]

register_op("linear_logprobs", triton=True, cpu=None)

try:  # Triton is optional (pip install 'mtgrpo_core[triton]')
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is installed in the test environment
    HAS_TRITON = False

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _mma(a, b, acc, DOT_MODE: tl.constexpr):
        """acc + a @ b with fp32 accumulation. DOT_MODE 0: native low-precision dot (tensor
        cores); 1: IEEE fp32 (no TF32); 2: upcast to fp32 first (the Triton 3.9 interpreter's
        dot returns garbage for bfloat16 operands, so interpreted bf16 runs take this path)."""
        if DOT_MODE == 2:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif DOT_MODE == 1:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, mask_m, mask_v, K,
                     stride_hm, stride_hk, stride_wv, stride_wk, inv_temp,
                     HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """fp32 tile ``(h[offs_m] @ W[offs_v].T + b[offs_v]) * inv_temp``; out-of-range
        rows/columns hold finite junk (callers mask them)."""
        acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(w_ptr + offs_v[None, :] * stride_wv + offs_k[:, None] * stride_wk,
                        mask=mask_v[None, :] & mask_k[:, None], other=0.0)
            acc = _mma(a, b, acc, DOT_MODE)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
        return acc * inv_temp

    @triton.jit
    def _dlogits_tile(z, offs_v, mask, y, lse, ent, gl, ge, inv_temp,
                      WITH_ENTROPY: tl.constexpr):
        """d(loss)/d(raw logits) of one tile: ``(gl (onehot - p) - ge p (log p + ent)) / tau``."""
        # ``mask``: [BLOCK_M, BLOCK_V] in-range entries; off the edge logp is set to 0 so exp
        # cannot overflow there (lse of a padded row is 0 while its junk logit may be 1e4).
        logp = tl.where(mask, z - lse[:, None], 0.0)
        p = tl.where(mask, tl.exp(logp), 0.0)
        if WITH_ENTROPY:
            coef = gl[:, None] + ge[:, None] * (logp + ent[:, None])
        else:
            coef = gl[:, None]
        dz = tl.where(offs_v[None, :] == y[:, None], gl[:, None], 0.0) - p * coef
        return dz * inv_temp

    @triton.jit
    def _linear_logprobs_fwd_kernel(
            h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, M, V, K, v_per_split,
            stride_hm, stride_hk, stride_wv, stride_wk, inv_temp,
            HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_MODE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (token block, vocabulary split): online (max m, sum s = sum e^(z-m),
        t = sum e^(z-m) (z-m), target logit) over its vocabulary range, written to
        ``part[4, splits, M]`` and merged on the host (O(splits x M))."""
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
                             stride_hm, stride_hk, stride_wv, stride_wk, inv_temp,
                             HAS_BIAS, DOT_MODE, BLOCK_M, BLOCK_V, BLOCK_K)
            z = tl.where(mask_v[None, :], z, float("-inf"))
            tgt += tl.sum(tl.where((offs_v[None, :] == y[:, None]) & mask_v[None, :], z, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(z, axis=1))  # finite: every tile has a valid column
            alpha = tl.exp(m_i - m_new)                 # 0 on the first tile (m_i = -inf)
            e = tl.exp(z - m_new[:, None])              # 0 on masked columns
            if WITH_ENTROPY:
                # t is relative to the running max: when it moves by d = m_old - m_new (<= 0),
                # sum e_old (z - m_new) = alpha * (t_old + d * s_old).
                d = tl.where(s_i > 0, m_i - m_new, 0.0)
                zc = tl.where(mask_v[None, :], z - m_new[:, None], 0.0)
                t_i = alpha * (t_i + d * s_i) + tl.sum(e * zc, axis=1)
            s_i = s_i * alpha + tl.sum(e, axis=1)
            m_i = m_new
        base = part_ptr + pid_s * M + offs_m
        stride_q = tl.num_programs(1) * M
        tl.store(base, m_i, mask=mask_m)
        tl.store(base + stride_q, s_i, mask=mask_m)
        tl.store(base + 2 * stride_q, t_i, mask=mask_m)
        tl.store(base + 3 * stride_q, tgt, mask=mask_m)

    @triton.jit
    def _row_saved(y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, offs_m, mask_m, WITH_ENTROPY: tl.constexpr):
        """Per-token values saved by the forward pass and the upstream gradients of a row block:
        (target ids, log-sum-exp, entropy, d loss / d logprob, d loss / d entropy)."""
        y = tl.load(y_ptr + offs_m, mask=mask_m, other=-1)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        gl = tl.load(gl_ptr + offs_m, mask=mask_m, other=0.0)
        if WITH_ENTROPY:
            ent = tl.load(ent_ptr + offs_m, mask=mask_m, other=0.0)
            ge = tl.load(ge_ptr + offs_m, mask=mask_m, other=0.0)
        else:
            ent = gl
            ge = gl
        return y, lse, ent, gl, ge

    @triton.jit
    def _linear_logprobs_bwd_dh_kernel(
            h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, dh_ptr, M, V, K,
            stride_hm, stride_hk, stride_wv, stride_wk, inv_temp,
            HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_MODE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """One program per token block: dh[rows] (fp32, contiguous [M, K]) += dz @ W_tile over
        all vocabulary tiles. The program owns its rows: no atomics, deterministic."""
        pid_m = tl.program_id(0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        y, lse, ent, gl, ge = _row_saved(y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, offs_m, mask_m, WITH_ENTROPY)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < V
            z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, mask_m, mask_v, K,
                             stride_hm, stride_hk, stride_wv, stride_wk, inv_temp,
                             HAS_BIAS, DOT_MODE, BLOCK_M, BLOCK_V, BLOCK_K)
            dz = _dlogits_tile(z, offs_v, mask_m[:, None] & mask_v[None, :], y, lse, ent, gl, ge, inv_temp, WITH_ENTROPY)
            dz = dz.to(w_ptr.dtype.element_ty)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wk,
                            mask=mask_v[:, None] & mask_k[None, :], other=0.0)
                ptrs = dh_ptr + offs_m[:, None] * K + offs_k[None, :]
                io_mask = mask_m[:, None] & mask_k[None, :]
                cur = tl.load(ptrs, mask=io_mask, other=0.0)
                cur = _mma(dz, w, cur, DOT_MODE)
                tl.store(ptrs, cur, mask=io_mask)

    @triton.jit
    def _linear_logprobs_bwd_dw_kernel(
            h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, dw_ptr, db_ptr, M, V, K,
            stride_hm, stride_hk, stride_wv, stride_wk, inv_temp,
            HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, DOT_MODE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """One program per vocabulary block: dW[rows] (fp32, contiguous [V, K]) += dz.T @ h_tile
        and db[rows] += dz.sum(0) over all token tiles. Owns its rows: deterministic."""
        pid_v = tl.program_id(0)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        db = tl.zeros((BLOCK_V,), tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            y, lse, ent, gl, ge = _row_saved(y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, offs_m, mask_m, WITH_ENTROPY)
            z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_m, offs_v, mask_m, mask_v, K,
                             stride_hm, stride_hk, stride_wv, stride_wk, inv_temp,
                             HAS_BIAS, DOT_MODE, BLOCK_M, BLOCK_V, BLOCK_K)
            dz = _dlogits_tile(z, offs_v, mask_m[:, None] & mask_v[None, :], y, lse, ent, gl, ge, inv_temp, WITH_ENTROPY)
            db += tl.sum(dz, axis=0)
            dzt = tl.trans(dz.to(h_ptr.dtype.element_ty))
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :] * stride_hk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                ptrs = dw_ptr + offs_v[:, None] * K + offs_k[None, :]
                io_mask = mask_v[:, None] & mask_k[None, :]
                cur = tl.load(ptrs, mask=io_mask, other=0.0)
                cur = _mma(dzt, h, cur, DOT_MODE)
                tl.store(ptrs, cur, mask=io_mask)
        if HAS_BIAS:
            tl.store(db_ptr + offs_v, db, mask=mask_v)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _triton_blocks(M: int, V: int, K: int, chunk_tokens, chunk_vocab, device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps). GPU defaults are conventional tensor-core tiles
    (not tuned on hardware: this project's machine has no GPU)."""
    interp = device.type != "cuda"
    bm = chunk_tokens or (16 if interp else 64)
    bv = chunk_vocab or (16 if interp else 128)
    bk = min(64 if not interp else 32, max(16, _next_pow2(K)))
    return bm, bv, bk, 8 if bm * bv >= 64 * 128 else 4


def _dot_mode(hidden: torch.Tensor) -> int:
    if hidden.dtype == torch.float32:
        return 1
    return 2 if (hidden.device.type != "cuda" and hidden.dtype == torch.bfloat16) else 0


def linear_logprobs_fwd(hidden, weight, bias, token_ids, inv_temp: float, with_entropy: bool,
                        chunk_tokens=None, chunk_vocab=None):
    """Triton forward launcher.

    Parameters
    ----------
    hidden : Tensor[M, K] fp16/bf16/fp32; weight : Tensor[V, K] same dtype; bias : Tensor[V] | None
    token_ids : int Tensor[M] in [0, V)

    Returns
    -------
    logp[M] fp32, lse[M] fp32, ent[M] fp32 (empty when not ``with_entropy``)
    """
    M, K = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    bm, bv, bk, nw = _triton_blocks(M, V, K, chunk_tokens, chunk_vocab, dev)
    n_mblk = triton.cdiv(M, bm)
    n_vtiles = triton.cdiv(V, bv)
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        want = max(1, triton.cdiv(2 * sms, n_mblk))  # >= 2 programs per SM for small M
    else:
        want = 2  # exercise the split merge under the interpreter
    per = triton.cdiv(n_vtiles, min(want, n_vtiles)) * bv
    n_split = triton.cdiv(V, per)
    y = token_ids.to(torch.int32) if V < 2**31 else token_ids
    part = torch.empty((4, n_split, M), dtype=torch.float32, device=dev)
    b = bias if bias is not None else hidden  # dummy pointer, never read
    _linear_logprobs_fwd_kernel[(n_mblk, n_split)](
        hidden, weight, b, y, part, M, V, K, per,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), float(inv_temp),
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, DOT_MODE=_dot_mode(hidden),
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=nw)
    m, s, t, tgt = part.unbind(0)
    lse_s = m + torch.log(s)                     # [S, M] per-split log-sum-exp
    lse = torch.logsumexp(lse_s, dim=0)
    logp = tgt.sum(0) - lse                      # each target lies in exactly one split
    if not with_entropy:
        return logp, lse, logp.new_empty(0)
    # entropy of a mixture of disjoint parts: H = sum_s w_s (H_s - log w_s), w_s = e^(lse_s - lse)
    ent_s = torch.log(s) - t / s
    logw = lse_s - lse
    ent = (logw.exp() * (ent_s - logw)).sum(0)
    return logp, lse, ent


def linear_logprobs_bwd(hidden, weight, bias, token_ids, lse, ent, gl, ge, inv_temp: float,
                        needs: tuple[bool, bool, bool], chunk_tokens=None, chunk_vocab=None):
    """Triton backward launcher: (dhidden, dweight, dbias), each None when not in ``needs``."""
    M, K = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    bm, bv, bk, nw = _triton_blocks(M, V, K, chunk_tokens, chunk_vocab, dev)
    with_entropy = ge is not None
    gl = torch.zeros(M, dtype=torch.float32, device=dev) if gl is None else gl.float().contiguous()
    ge = gl if ge is None else ge.float().contiguous()
    ent = gl if not with_entropy else ent
    y = token_ids.to(torch.int32) if V < 2**31 else token_ids
    b = bias if bias is not None else hidden
    common = dict(HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy,
                  DOT_MODE=_dot_mode(hidden), BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, num_warps=nw)
    strides = (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), float(inv_temp))
    dh = dw = db = None
    if needs[0]:
        dh32 = torch.zeros((M, K), dtype=torch.float32, device=dev)
        _linear_logprobs_bwd_dh_kernel[(triton.cdiv(M, bm),)](
            hidden, weight, b, y, lse, ent, gl, ge, dh32, M, V, K, *strides, **common)
        dh = dh32.to(hidden.dtype)
    if needs[1] or needs[2]:
        dw32 = torch.zeros((V, K), dtype=torch.float32, device=dev)
        db32 = torch.zeros(V, dtype=torch.float32, device=dev) if bias is not None else dw32
        _linear_logprobs_bwd_dw_kernel[(triton.cdiv(V, bv),)](
            hidden, weight, b, y, lse, ent, gl, ge, dw32, db32, M, V, K, *strides, **common)
        dw = dw32.to(weight.dtype) if needs[1] else None
        db = db32.to(bias.dtype) if needs[2] else None
    return dh, dw, db


# ----------------------------------------------------------------------------------------------
# Chunked PyTorch path (backend="cpu")
# ----------------------------------------------------------------------------------------------
# Chunk sizes, from `python bench/bench_linear_logprobs.py --sweep` (M=8192, H=512, V=32000,
# fp32, fwd+bwd, interleaved with the reference, best of 3, 2 cores shared with other jobs):
# time / reference = 1.28 (256 x 32000), 1.09 (512 x 32000), 0.98 (1024 x 32000),
# 1.09 (1024 x 8192), 0.97 (2048 x 4096), 1.02 (4096 x 2048). A second interleaved run under
# heavier load (load average 4.5) gave 1.17 for 1024 x 32000 but 1.45 for 2048 x 4096, so the
# default is 1024 tokens x up to 32,768 vocabulary entries (a 128 MB fp32 tile; the vocabulary
# chunk follows from the token chunk through _TILE_BUDGET).
_TILE_BUDGET = 32 * 2**20   # elements of one fp32 tile (128 MB)
_DEFAULT_CHUNK_TOKENS = 1024


def _chunked_sizes(M: int, V: int, chunk_tokens, chunk_vocab) -> tuple[int, int]:
    ct = chunk_tokens or min(max(M, 1), _DEFAULT_CHUNK_TOKENS)
    cv = chunk_vocab or min(V, max(1024, _TILE_BUDGET // ct))
    return max(1, min(ct, max(M, 1))), max(1, min(cv, V))


def _chunk_ids(y: torch.Tensor, v0: int, v1: int):
    local = y - v0
    inside = (local >= 0) & (local < v1 - v0)
    return local.clamp(0, v1 - v0 - 1), inside


def _tile(buf: torch.Tensor, h_t, w_v, b_v, inv_temp: float) -> torch.Tensor:
    """z = (h_t @ w_v.T + b_v) * inv_temp into the head of the reusable buffer ``buf``."""
    z = buf[: h_t.shape[0] * w_v.shape[0]].view(h_t.shape[0], w_v.shape[0])
    if b_v is not None:
        torch.addmm(b_v, h_t, w_v.T, beta=inv_temp, alpha=inv_temp, out=z)
    else:
        torch.mm(h_t, w_v.T, out=z)
        if inv_temp != 1.0:
            z.mul_(inv_temp)
    return z


def _chunked_fwd(hidden, weight, bias, y, inv_temp, with_entropy, chunk_tokens, chunk_vocab):
    """Returns logp[M], lse[M], ent[M] (empty without entropy) in the accumulation dtype."""
    M, _ = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    ct, cv = _chunked_sizes(M, V, chunk_tokens, chunk_vocab)
    h = hidden.to(acc)
    lse = torch.empty(M, dtype=acc, device=dev)
    tgt = torch.empty(M, dtype=acc, device=dev)
    ent = torch.empty(M if with_entropy else 0, dtype=acc, device=dev)
    buf = torch.empty(min(ct, M) * cv, dtype=acc, device=dev)
    pbuf = torch.empty_like(buf) if with_entropy else None
    for v0 in range(0, V, cv):
        v1 = min(V, v0 + cv)
        w_v = weight[v0:v1].to(acc)
        b_v = bias[v0:v1].to(acc) if bias is not None else None
        local_all, inside_all = _chunk_ids(y, v0, v1)
        for t0 in range(0, M, ct):
            t1 = min(M, t0 + ct)
            z = _tile(buf, h[t0:t1], w_v, b_v, inv_temp)
            tg = z.gather(1, local_all[t0:t1, None]).squeeze(1)
            # log-sum-exp in place (torch.logsumexp would allocate a second tile)
            m = z.amax(dim=1)
            z.sub_(m[:, None])                                # z - m <= 0
            if with_entropy:
                e = pbuf[: z.numel()].view_as(z)
                torch.exp(z, out=e)
                s_c = e.sum(dim=1)
                t_c = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # sum e (z - m)
                ent_c = torch.log(s_c) - t_c / s_c            # entropy within the chunk
            else:
                s_c = z.exp_().sum(dim=1)
            lse_c = m + torch.log(s_c)
            if v0 == 0:
                lse[t0:t1] = lse_c
                tgt[t0:t1] = tg                               # replaced by the owning chunk
                if with_entropy:
                    ent[t0:t1] = ent_c
                continue
            tgt[t0:t1] = torch.where(inside_all[t0:t1], tg, tgt[t0:t1])
            old = lse[t0:t1]
            new = torch.logaddexp(old, lse_c)
            if with_entropy:
                # mixture of two disjoint parts: H = sum_k w_k (H_k - log w_k)
                la, lb = old - new, lse_c - new
                ent[t0:t1] = la.exp() * (ent[t0:t1] - la) + lb.exp() * (ent_c - lb)
            lse[t0:t1] = new
    return tgt - lse, lse, ent


def _chunked_bwd(hidden, weight, bias, y, lse, ent, gl, ge, inv_temp, needs, chunk_tokens, chunk_vocab):
    M, H = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    dev = hidden.device
    ct, cv = _chunked_sizes(M, V, chunk_tokens, chunk_vocab)
    h = hidden.to(acc)
    gl_s = (torch.zeros(M, dtype=acc, device=dev) if gl is None else gl.to(acc)) * inv_temp
    ge_s = ge.to(acc) * inv_temp if ge is not None else None
    need_dh, need_dw, need_db = needs
    dh = torch.empty((M, H), dtype=acc, device=dev) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    direct_dw = need_dw and weight.dtype == acc     # accumulate straight into dw's rows
    buf = torch.empty(min(ct, M) * cv, dtype=acc, device=dev)
    pbuf = torch.empty_like(buf) if ge_s is not None else None
    hbuf = torch.empty((min(ct, M), H), dtype=acc, device=dev) if ge_s is None and need_dh else None
    rows = torch.arange(min(ct, M), device=dev)
    for v0 in range(0, V, cv):
        v1 = min(V, v0 + cv)
        w_v = weight[v0:v1].to(acc)
        b_v = bias[v0:v1].to(acc) if bias is not None else None
        if need_dw:
            dw_v = dw[v0:v1] if direct_dw else torch.empty((v1 - v0, H), dtype=acc, device=dev)
        db_v = torch.zeros(v1 - v0, dtype=acc, device=dev) if need_db else None
        local_all, inside_all = _chunk_ids(y, v0, v1)
        for t0 in range(0, M, ct):
            t1 = min(M, t0 + ct)
            z = _tile(buf, h[t0:t1], w_v, b_v, inv_temp)
            z.sub_(lse[t0:t1, None])                           # log p
            inside = inside_all[t0:t1]
            r = rows[: t1 - t0][inside]
            loc = local_all[t0:t1][inside]
            h_t = h[t0:t1]
            if ge_s is None:
                # dz = diag(-gl) P + onehot * gl: keep P in the tile and apply the row scale to
                # the [ct, H] sides of the matmuls (V / H times fewer elements than the tile)
                # and the one-hot part as row gathers / scatters.
                p = z.exp_()
                gneg = gl_s[t0:t1].neg()
                if need_dh:
                    dh_t = dh[t0:t1]
                    torch.mm(p, w_v, out=hbuf[: t1 - t0])
                    if v0 == 0:
                        torch.mul(hbuf[: t1 - t0], gneg[:, None], out=dh_t)
                    else:
                        dh_t.addcmul_(hbuf[: t1 - t0], gneg[:, None])
                    # (index_add_ with a few hundred rows takes ~80 ms here: a slow path)
                    dh_t.index_put_((r,), w_v[loc] * gl_s[t0:t1][inside, None], accumulate=True)
                if need_dw:
                    if t0 == 0:
                        torch.mm(p.T, h_t * gneg[:, None], out=dw_v)
                    else:
                        dw_v.addmm_(p.T, h_t * gneg[:, None])
                if need_db:
                    db_v.addmv_(p.T, gneg)
                continue
            p = pbuf[: z.numel()].view_as(z)
            torch.exp(z, out=p)
            # dz = -p (gl + ge (log p + ent)) + onehot * gl
            dz = z.add_(ent[t0:t1, None]).mul_(ge_s[t0:t1, None]).add_(gl_s[t0:t1, None]).mul_(p).neg_()
            dz.index_put_((r, loc), gl_s[t0:t1][inside], accumulate=True)
            if need_dh:  # first vocabulary chunk writes, later ones accumulate
                if v0 == 0:
                    torch.mm(dz, w_v, out=dh[t0:t1])
                else:
                    dh[t0:t1].addmm_(dz, w_v)
            if need_dw:
                if t0 == 0:
                    torch.mm(dz.T, h_t, out=dw_v)
                else:
                    dw_v.addmm_(dz.T, h_t)
            if need_db:
                db_v += dz.sum(0)
        if ge_s is None and (need_dw or need_db):
            # one-hot part of dz for the whole vocabulary chunk at once: dW[y_i] += gl_i h_i
            loc_all = local_all[inside_all]
            if need_dw and loc_all.numel():
                dw_v.index_put_((loc_all,), h[inside_all] * gl_s[inside_all, None], accumulate=True)
            if need_db:
                db_v.index_put_((loc_all,), gl_s[inside_all], accumulate=True)
        if need_dw and not direct_dw:
            dw[v0:v1] = dw_v
        if need_db:
            db[v0:v1] = db_v
    return (dh.to(hidden.dtype) if need_dh else None), dw, db


# ----------------------------------------------------------------------------------------------
# autograd + public API
# ----------------------------------------------------------------------------------------------
class LinearLogprobsFunction(torch.autograd.Function):
    """autograd for the fused path; ``backend`` is "triton" or "cpu" (chunked torch)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, inv_temp, with_entropy, chunk_tokens,
                chunk_vocab, backend):
        if backend == "triton":
            logp, lse, ent = linear_logprobs_fwd(hidden, weight, bias, token_ids, inv_temp,
                                                 with_entropy, chunk_tokens, chunk_vocab)
        else:
            logp, lse, ent = _chunked_fwd(hidden, weight, bias, token_ids, inv_temp, with_entropy,
                                          chunk_tokens, chunk_vocab)
        ctx.save_for_backward(hidden, weight, bias, token_ids, lse, ent)
        ctx.cfg = (inv_temp, with_entropy, chunk_tokens, chunk_vocab, backend)
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, gl, ge):
        hidden, weight, bias, token_ids, lse, ent = ctx.saved_tensors
        inv_temp, with_entropy, chunk_tokens, chunk_vocab, backend = ctx.cfg
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[2])
        if (gl is None and ge is None) or not any(needs):
            return (None,) * 9
        if not with_entropy:
            ge = None
        if backend == "triton":
            dh, dw, db = linear_logprobs_bwd(hidden, weight, bias, token_ids, lse, ent, gl, ge,
                                             inv_temp, needs, chunk_tokens, chunk_vocab)
        else:
            dh, dw, db = _chunked_bwd(hidden, weight, bias, token_ids, lse, ent, gl, ge, inv_temp,
                                      needs, chunk_tokens, chunk_vocab)
        return dh, dw, db, None, None, None, None, None, None


def _resolve(backend, device: torch.device, dtype: torch.dtype) -> str:
    """"triton" | "cpu" (chunked torch) | "torch" (naive reference); see the module docstring."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    b = backend
    if b == "auto":
        b = os.environ.get("MTGRPO_BACKEND", "auto")
        if b not in BACKENDS:
            raise ValueError(f"MTGRPO_BACKEND: expected one of {BACKENDS}, got {b!r}")
    if b == "auto":
        if device.type == "cuda" and dtype in _TRITON_DTYPES:
            try:
                return resolve_backend("linear_logprobs", "triton", device)
            except RuntimeError:
                pass
        return "cpu"
    if b in ("cpu", "torch"):
        return b
    if b == "triton" and dtype not in _TRITON_DTYPES:
        raise TypeError(f"hidden: the triton backend takes float16/bfloat16/float32, got {dtype}")
    return resolve_backend("linear_logprobs", b, device)  # raises for cuda / unusable triton


def _check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _check_chunk(name, c):
    if c is None:
        return
    if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
        raise ValueError(f"{name}: expected None or a positive int, got {c!r}")


def _validate(hidden, weight, token_ids, bias, temperature, return_entropy, chunk_tokens, chunk_vocab):
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    _check_tensor("token_ids", token_ids)
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden: expected a float16/bfloat16/float32/float64 tensor, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden: expected shape [M, H] or [N, T, H], got {tuple(hidden.shape)}")
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
    if token_ids.numel():
        lo, hi = int(token_ids.min()), int(token_ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"token_ids: expected values in [0, {V}) (V = weight.shape[0]), got min {lo}, max {hi}")
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected shape ({V},) (weight.shape[0]), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias: expected dtype {weight.dtype} (weight's dtype), got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias: expected device {hidden.device} (hidden's), got {bias.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a real number > 0, got {type(temperature).__name__}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy: expected a bool, got {type(return_entropy).__name__}")
    _check_chunk("chunk_tokens", chunk_tokens)
    _check_chunk("chunk_vocab", chunk_vocab)


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
        need any valid id (mask them in the loss).
    bias : Tensor[V] or None, same dtype as ``weight``
    temperature : float > 0
        Logits are divided by it (use the sampling temperature, as vLLM/TRL do).
    return_entropy : bool
        Also return the entropy of each token's distribution (differentiable).
    chunk_tokens, chunk_vocab : int or None
        Tile sizes (tokens x vocabulary). Chunked path: rows and columns of one tile (defaults
        measured on CPU: 1024 tokens x up to 32,768 vocabulary entries). Triton:
        BLOCK_M / BLOCK_V, powers of two >= 16 (defaults 64 x 128 on GPU).
    backend : "auto" | "triton" | "cpu" | "torch"
        "cpu" is the chunked PyTorch path (device-agnostic), "torch" the naive reference.

    Returns
    -------
    logprobs : Tensor[M] or [N, T], float32 (float64 for float64 inputs)
    entropy : Tensor like ``logprobs``, only when ``return_entropy``

    Raises
    ------
    TypeError, ValueError
        Bad input, naming the argument. RuntimeError: an explicit backend cannot run here.
    """
    _validate(hidden, weight, token_ids, bias, temperature, return_entropy, chunk_tokens, chunk_vocab)
    be = _resolve(backend, hidden.device, hidden.dtype)
    temperature = float(temperature)
    if be == "torch":
        return linear_logprobs_ref(hidden, weight, token_ids, bias=bias, temperature=temperature,
                                   return_entropy=return_entropy)
    if be == "triton":
        for name, c in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
            if c is not None and (c < 16 or c & (c - 1)):
                raise ValueError(f"{name}: the triton backend needs a power of two >= 16, got {c}")
    lead = hidden.shape[:-1]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y = token_ids.reshape(-1)
    if be == "triton":
        h2, weight = h2.contiguous(), weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        y = y.contiguous()
    else:
        y = y.long()
    logp, ent = LinearLogprobsFunction.apply(h2, weight, bias, y, 1.0 / temperature, return_entropy,
                                             chunk_tokens, chunk_vocab, be)
    if hidden.dtype != torch.float64:
        logp = logp.float()
        ent = ent.float()
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
        Passed to both ops.

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
