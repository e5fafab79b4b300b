"""Fused GRPO loss: group advantages + clipped importance ratio, forward and backward in one pass.

What it computes
----------------
ALGORITHMS.md section 1: for completions i (rows) of ragged groups and tokens t,
``l_it = max(-A_i r_it, -A_i clip(r_it, 1 - eps_low, 1 + eps_high))`` (optional dual clip,
ratio cap, GSPO sequence ratio and KL penalty), aggregated by ``loss_agg``. When
``advantages`` is None the kernel also computes ``A_i`` from ``rewards`` and
``group_ids`` (group mean / std over labels in any order). It matches verl's
``compute_policy_loss_vanilla`` + ``agg_loss`` and TRL's GRPO losses on the same inputs
(see :mod:`mtgrpo_core.reference.grpo_loss`, the oracle).

Algorithm
---------
The gradient of the aggregated loss is linear in the upstream scalar gradient, so the
forward pass writes ``dL/dlogp`` (already scaled by each row's aggregation weight) next to
the loss, and backward only rescales it: one pass over the tokens instead of the ~10
materialised [N, T] intermediates of an eager implementation. A first, 1-byte-per-token
pass counts each row's tokens (the weights of the token-mean and seq-mean modes need
them). One program (Triton) or one loop iteration (C++) handles a row, looping over
tiles of tokens, so any T works (no grid-dimension limit). In the fused path each row's
program scans the ``N`` rewards and labels to get its group's statistics: O(N^2 / BLOCK)
label comparisons per launch, negligible next to the tokens for N up to tens of thousands.

Cost
----
Bytes: reads logprobs + old_logprobs (+ ref_logprobs) + mask, writes one fp32 gradient:
``N*T*(2*s + 1 + 4)`` bytes for inputs of s bytes (13 B/token for fp32, no KL). FLOPs:
about 40 per token and one exp (two with k3). Memory above the inputs: the [N, T] fp32
gradient and O(N) statistics.

Backends: "triton" (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), "cpu" (the
C++ extension: OpenMP over rows, rows longer than 8192 tokens split into spans; the float
kernel is explicitly vectorised and built for AVX-512, AVX2+FMA and baseline x86-64, the best
picked at load time, see ``_C.grpo_loss_cpu_isa()``; ``MTGRPO_CPU_ISA=avx2|baseline`` caps
it), "torch" (the reference). All registered through ``torch.library.custom_op`` so ``torch.compile`` traces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

from .. import _native
from ..config import GRPOConfig
from ..reference.grpo_loss import grpo_loss_ref
from ._dispatch import register_op, resolve_backend

register_op("grpo_loss", triton=True, cpu="grpo_loss_fwd_bwd_cpu")
register_op("group_advantages", triton=False, cpu="group_advantages_cpu")

# Columns of the per-row statistics (mirror csrc/include/mtgrpo/grpo_loss.h RowStat).
PG_SUM, KL_SUM, RATIO_SUM, NEG_LOGR_SUM, CLIP_LOW, CLIP_HIGH, DUAL, LOSS_CONTRIB, TOKENS = range(9)
NUM_ROW_STATS = 9

_AGG_CODE = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3}
_KL_CODE = {"k1": 1, "k2": 2, "k3": 3}
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DTYPE_NAME = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class GRPOStats:
    """Statistics of one :func:`grpo_loss` call (all detached tensors).

    Attributes
    ----------
    advantages : Tensor[N] (or [N, T] when token advantages were given)
        The advantages used, after ``seq_weights``.
    per_sequence_loss : Tensor[N]
        Token-mean clipped surrogate of each response (no KL term); 0 for empty rows.
    clip_frac_low, clip_frac_high : 0-d
        Share of tokens whose ratio is clipped on the low side (A < 0) / high side (A > 0).
    dual_clip_frac : 0-d
        Share of tokens where the dual clip bounds the loss.
    ratio_mean : 0-d
        Mean importance ratio over tokens.
    approx_kl : 0-d
        Mean of ``old_logp - logp`` over tokens (verl's ``ppo_kl``).
    ref_kl_mean : 0-d
        Mean KL estimate to the reference policy (0 without ``ref_logprobs``).
    zero_adv_group_frac : 0-d
        Share of groups whose rewards are all equal (share of sequences with A = 0 when
        advantages were given instead of rewards).
    num_tokens : 0-d
        Tokens counted by the mask.
    task_loss_sum, task_tokens, task_zero_adv_frac, task_num_sequences : Tensor[K] or None
        Per task (``task_ids`` given): sum of ``per_sequence_loss``, tokens, share of
        zero-advantage groups, number of sequences.
    """

    advantages: torch.Tensor
    per_sequence_loss: torch.Tensor
    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    dual_clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    approx_kl: torch.Tensor
    ref_kl_mean: torch.Tensor
    zero_adv_group_frac: torch.Tensor
    num_tokens: torch.Tensor
    task_loss_sum: Optional[torch.Tensor] = None
    task_tokens: Optional[torch.Tensor] = None
    task_zero_adv_frac: Optional[torch.Tensor] = None
    task_num_sequences: Optional[torch.Tensor] = None

    def scalars(self) -> dict[str, float]:
        """The scalar statistics as Python floats (one device sync)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                out[f.name] = float(v)
        return out


# ---------------------------------------------------------------------------------------
# Validation (the public boundary)
# ---------------------------------------------------------------------------------------
def _check_tensor(name: str, t, *, ndim=None, shape=None, float_=False, integer=False, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name}: expected {ndim}-d tensor, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if float_ and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32/float64/bfloat16/float16 tensor, got {t.dtype}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like logprobs), got {t.device}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}: contains a non-finite value ({t[tuple(idx)].item()}) at index {idx}")


def _validate(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
              task_ids, num_tasks, cfg: GRPOConfig):
    _check_tensor("logprobs", logprobs, ndim=2, float_=True)
    n, t = logprobs.shape
    if n == 0 or t == 0:
        raise ValueError(f"logprobs: expected a non-empty [N, T] tensor, got shape {tuple(logprobs.shape)}")
    dev = logprobs.device
    if old_logprobs is not None:
        _check_tensor("old_logprobs", old_logprobs, shape=(n, t), float_=True, device=dev)
    _check_tensor("mask", mask, shape=(n, t), device=dev)
    if advantages is not None:
        if rewards is not None:
            raise ValueError("advantages: give either advantages or rewards + group_ids, not both")
        _check_tensor("advantages", advantages, float_=True, device=dev)
        if tuple(advantages.shape) not in ((n,), (n, t)):
            raise ValueError(f"advantages: expected shape ({n},) or ({n}, {t}), got {tuple(advantages.shape)}")
        _check_finite("advantages", advantages)
    else:
        if rewards is None or group_ids is None:
            raise ValueError("rewards: with advantages=None, pass rewards[N] and group_ids[N] (the fused advantage path)")
    if rewards is not None:
        _check_tensor("rewards", rewards, shape=(n,), device=dev)
        if rewards.dtype == torch.bool or rewards.dtype.is_complex:
            raise TypeError(f"rewards: expected a real tensor, got {rewards.dtype}")
        if group_ids is None:
            raise ValueError("group_ids: required with rewards (the group label of each completion)")
        _check_tensor("group_ids", group_ids, shape=(n,), integer=True, device=dev)
        _check_finite("rewards", rewards.double())
    if seq_weights is not None:
        _check_tensor("seq_weights", seq_weights, shape=(n,), float_=True, device=dev)
        _check_finite("seq_weights", seq_weights)
    if ref_logprobs is not None:
        _check_tensor("ref_logprobs", ref_logprobs, shape=(n, t), float_=True, device=dev)
    elif cfg.kl_coef != 0.0:
        raise ValueError(f"ref_logprobs: required when kl_coef != 0 (got kl_coef={cfg.kl_coef})")
    if task_ids is not None:
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks <= 0:
            raise ValueError(f"num_tasks: expected a positive int with task_ids, got {num_tasks!r}")
        _check_tensor("task_ids", task_ids, shape=(n,), integer=True, device=dev)
        if n and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
            raise ValueError(f"task_ids: expected values in [0, {num_tasks}), got range "
                             f"[{int(task_ids.min())}, {int(task_ids.max())}]")
    elif num_tasks is not None:
        raise ValueError("num_tasks: given without task_ids")


# ---------------------------------------------------------------------------------------
# Backend kernels behind torch.library custom ops
# ---------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_numpy(t: torch.Tensor):
    """Zero-copy numpy view of a contiguous CPU tensor (bf16 as raw 16-bit words)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy()
    return t.numpy()


def _opt(t: Optional[torch.Tensor]):
    return None if t is None else _as_numpy(t)


@torch.library.custom_op("mtgrpo::grpo_loss_fwd_bwd", mutates_args=())
def _grpo_loss_fwd_bwd_op(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor,
    advantages: Optional[torch.Tensor], rewards: Optional[torch.Tensor], group_ids: Optional[torch.Tensor],
    seq_weights: Optional[torch.Tensor], ref_logprobs: Optional[torch.Tensor], backend: str,
    adv_scale: str, adv_eps: float, adv_unbiased: bool, adv_singleton_raw: bool, adv_clip: float,
    eps_low: float, eps_high: float, dual_clip: float, ratio_cap: float, kl_coef: float, kl_estimator: int,
    seq_level: bool, loss_agg: int, num_tokens: float, norm_length: float, seq_count_all: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad[N, T] compute dtype, rowstats[N, 9] float64, adv[N] float64,
    row_flat[N] uint8, row_leader[N] uint8)."""
    n, t = logprobs.shape
    cdt = _compute_dtype(logprobs.dtype)
    grad = torch.empty((n, t), dtype=cdt, device=logprobs.device)
    adv_out = torch.empty(n, dtype=torch.float64, device=logprobs.device)
    flat = torch.empty(n, dtype=torch.uint8, device=logprobs.device)
    leader = torch.empty(n, dtype=torch.uint8, device=logprobs.device)
    kw = dict(adv_scale=adv_scale, adv_eps=adv_eps, adv_unbiased=adv_unbiased, adv_singleton_raw=adv_singleton_raw,
              adv_clip=adv_clip, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, ratio_cap=ratio_cap,
              kl_coef=kl_coef, kl_estimator=kl_estimator, seq_level=seq_level, loss_agg=loss_agg,
              num_tokens=num_tokens, norm_length=norm_length, seq_count_all=seq_count_all)
    if backend == "cpu":
        rowstats = torch.empty((n, NUM_ROW_STATS), dtype=torch.float64)
        _native.native().grpo_loss_fwd_bwd_cpu(
            _as_numpy(logprobs), _as_numpy(old_logprobs), mask.numpy(), _opt(advantages), _opt(rewards),
            _opt(group_ids), _opt(seq_weights), _opt(ref_logprobs), _DTYPE_NAME[logprobs.dtype],
            grad.numpy(), rowstats.numpy(), adv_out.numpy(), flat.numpy(), leader.numpy(), **kw)
    elif backend == "triton":
        rowstats = grpo_loss_fwd(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights,
                                 ref_logprobs, grad, adv_out, flat, leader, **kw)
    else:
        raise ValueError(f"backend: the fused op runs 'cpu' or 'triton', got {backend!r}")
    return grad, rowstats, adv_out, flat, leader


@_grpo_loss_fwd_bwd_op.register_fake
def _(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs, backend, *args):
    n, t = logprobs.shape
    cdt = _compute_dtype(logprobs.dtype)
    return (logprobs.new_empty((n, t), dtype=cdt), logprobs.new_empty((n, NUM_ROW_STATS), dtype=torch.float64),
            logprobs.new_empty(n, dtype=torch.float64), logprobs.new_empty(n, dtype=torch.uint8),
            logprobs.new_empty(n, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------
# Triton kernel + launcher
# ---------------------------------------------------------------------------------------
try:  # triton is optional: the C++ and torch backends work without it
    import triton
    import triton.language as tl

    from ._triton_helpers import (LOG_RATIO_CLAMP, clipped_surrogate, kl_estimate, load_token_tile, segment_sq_dev,
                                  segment_stats)

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without triton
    _HAS_TRITON = False


if _HAS_TRITON:

    @triton.jit
    def _grpo_loss_fwd_kernel(
        LP, OLD, MASK, REF, ADV, REWARDS, GIDS, SEQW, GRAD, ROWSTATS, ADV_OUT, FLAT_OUT, LEADER_OUT, ROW_TOK, SCAL,
        N, T, eps_low, eps_high, dual_clip, ratio_cap, kl_coef, adv_eps, adv_clip, norm_length, num_tokens,
        FUSED_ADV: tl.constexpr, ADV_SCALE: tl.constexpr, UNBIASED: tl.constexpr, SINGLETON_RAW: tl.constexpr,
        HAS_ADV_CLIP: tl.constexpr, HAS_DUAL: tl.constexpr, TOK_ADV: tl.constexpr, HAS_SEQW: tl.constexpr, KL: tl.constexpr,
        SEQ: tl.constexpr, AGG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """One program per row: its advantage (fused path), then the tokens in BLOCK_T tiles."""
        row = tl.program_id(0).to(tl.int64)
        base = row * T
        ddof = 1.0 if UNBIASED else 0.0
        # ---- advantage of this row ---------------------------------------------------
        if FUSED_ADV:
            g = tl.load(GIDS + row)
            r_i = tl.load(REWARDS + row).to(tl.float32)
            s, cnt, lo_r, hi_r, first = segment_stats(REWARDS, GIDS, N, g, BLOCK_N)
            mean = s / cnt
            sd = tl.sqrt(segment_sq_dev(REWARDS, GIDS, N, g, mean, False, BLOCK_N) / tl.maximum(cnt - ddof, 1.0))
            single = cnt == 1.0
            if SINGLETON_RAW:
                mean = tl.where(single, 0.0, mean)
                sd = tl.where(single, 1.0, sd)
                flat = (lo_r == hi_r) & (cnt > 1.0)
            else:
                flat = lo_r == hi_r
            if ADV_SCALE == 0:
                a_row = (r_i - mean) / (sd + adv_eps)
            elif ADV_SCALE == 1:
                bacc = tl.zeros([BLOCK_N], tl.float32)
                for start in range(0, N, BLOCK_N):
                    offs = start + tl.arange(0, BLOCK_N)
                    bacc += tl.load(REWARDS + offs, mask=offs < N, other=0.0).to(tl.float32)
                bsum = tl.sum(bacc, 0)
                bmean = bsum / N
                bss = segment_sq_dev(REWARDS, GIDS, N, g, bmean, True, BLOCK_N)
                bstd = tl.where(N > ddof, tl.sqrt(bss / tl.maximum(N - ddof, 1.0)), 0.0)
                a_row = (r_i - mean) / (bstd + adv_eps)
            else:
                a_row = r_i - mean
            a_row = tl.where(flat, 0.0, a_row)
            if HAS_ADV_CLIP:
                a_row = tl.minimum(tl.maximum(a_row, -adv_clip), adv_clip)
            tl.store(FLAT_OUT + row, flat.to(tl.uint8))
            tl.store(LEADER_OUT + row, (first == row).to(tl.uint8))
        elif TOK_ADV:
            a_row = 1.0
        else:
            a_row = tl.load(ADV + row).to(tl.float32)
        if HAS_SEQW:
            a_row = a_row * tl.load(SEQW + row).to(tl.float32)
        tl.store(ADV_OUT + row, a_row.to(tl.float64))
        # ---- aggregation weight of this row --------------------------------------------
        row_tok = tl.load(ROW_TOK + row).to(tl.float32)
        total_tok = tl.load(SCAL + 0)
        n_seq = tl.maximum(tl.load(SCAL + 1), 1.0)
        if AGG == 0:
            w = 1.0 / tl.where(num_tokens > 0, num_tokens, tl.maximum(total_tok, 1.0))
        elif AGG == 1:
            w = tl.where(row_tok > 0, 1.0 / (n_seq * tl.maximum(row_tok, 1.0)), 0.0)
        elif AGG == 2:
            w = 1.0 / n_seq
        else:
            w = 1.0 / (n_seq * norm_length)
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        # ---- GSPO: the row's mean log-ratio --------------------------------------------
        r_seq = 1.0
        if SEQ:
            acc = tl.zeros([BLOCK_T], tl.float32)
            for start in range(0, T, BLOCK_T):
                offs, inb, m, x, d, dc = load_token_tile(LP, OLD, MASK, base, start, T, BLOCK_T)
                acc += tl.where(m, dc, 0.0)
            r_seq = tl.exp(tl.sum(acc, 0) / tl.maximum(row_tok, 1.0))
        # ---- the tokens ----------------------------------------------------------------
        s_pg = tl.zeros([BLOCK_T], tl.float32)
        s_kl = tl.zeros([BLOCK_T], tl.float32)
        s_r = tl.zeros([BLOCK_T], tl.float32)
        s_nd = tl.zeros([BLOCK_T], tl.float32)
        s_lo = tl.zeros([BLOCK_T], tl.float32)
        s_hi = tl.zeros([BLOCK_T], tl.float32)
        s_du = tl.zeros([BLOCK_T], tl.float32)
        s_loss = tl.zeros([BLOCK_T], tl.float32)
        s_m = tl.zeros([BLOCK_T], tl.float32)
        for start in range(0, T, BLOCK_T):
            offs, inb, m, x, d, dc = load_token_tile(LP, OLD, MASK, base, start, T, BLOCK_T)
            din = tl.where((d >= -LOG_RATIO_CLAMP) & (d <= LOG_RATIO_CLAMP), 1.0, 0.0)
            if TOK_ADV:
                a = tl.load(ADV + base + offs, mask=inb, other=0.0).to(tl.float32) * a_row
            else:
                a = tl.zeros([BLOCK_T], tl.float32) + a_row
            if SEQ:
                r = tl.zeros([BLOCK_T], tl.float32) + r_seq
            else:
                r = tl.exp(dc)
            cap_grad = tl.where(r <= ratio_cap, 1.0, 0.0)
            r = tl.minimum(r, ratio_cap)
            loss, dldr, dual = clipped_surrogate(a, r, lo, hi, dual_clip, HAS_DUAL)
            g = dldr * r * cap_grad * din
            kl = tl.zeros([BLOCK_T], tl.float32)
            if KL > 0:
                ref = tl.load(REF + base + offs, mask=inb, other=0.0).to(tl.float32)
                kl, dkl = kl_estimate(x, ref, KL)
                g += kl_coef * dkl
            lt = loss + kl_coef * kl
            tl.store(GRAD + base + offs, tl.where(m, w * g, 0.0).to(GRAD.dtype.element_ty), mask=inb)
            s_pg += tl.where(m, loss, 0.0)
            s_kl += tl.where(m, kl, 0.0)
            s_r += tl.where(m, r, 0.0)
            s_nd += tl.where(m, -dc, 0.0)
            s_lo += tl.where(m & (r < lo) & (a < 0), 1.0, 0.0)
            s_hi += tl.where(m & (r > hi) & (a > 0), 1.0, 0.0)
            s_du += tl.where(m & dual, 1.0, 0.0)
            s_loss += tl.where(m, lt, 0.0)
            s_m += tl.where(m, 1.0, 0.0)
        out = ROWSTATS + row * 9
        tl.store(out + 0, tl.sum(s_pg, 0).to(tl.float64))
        tl.store(out + 1, tl.sum(s_kl, 0).to(tl.float64))
        tl.store(out + 2, tl.sum(s_r, 0).to(tl.float64))
        tl.store(out + 3, tl.sum(s_nd, 0).to(tl.float64))
        tl.store(out + 4, tl.sum(s_lo, 0).to(tl.float64))
        tl.store(out + 5, tl.sum(s_hi, 0).to(tl.float64))
        tl.store(out + 6, tl.sum(s_du, 0).to(tl.float64))
        tl.store(out + 7, (w * tl.sum(s_loss, 0)).to(tl.float64))
        tl.store(out + 8, tl.sum(s_m, 0).to(tl.float64))


def grpo_loss_fwd(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
                  grad, adv_out, flat, leader, *, adv_scale, adv_eps, adv_unbiased, adv_singleton_raw, adv_clip,
                  eps_low, eps_high, dual_clip, ratio_cap, kl_coef, kl_estimator, seq_level, loss_agg, num_tokens,
                  norm_length, seq_count_all) -> torch.Tensor:
    """Launch the Triton kernel (inputs contiguous, validated); returns rowstats[N, 9] float64."""
    if not _HAS_TRITON:
        raise RuntimeError("triton is not installed (pip install 'mtgrpo_core[triton]')")
    n, t = logprobs.shape
    dev = logprobs.device
    rowstats = torch.empty((n, NUM_ROW_STATS), dtype=torch.float64, device=dev)
    row_tok = mask.sum(1, dtype=torch.int32)
    n_seq = torch.full((), float(n), device=dev) if seq_count_all else (row_tok > 0).sum().float()
    scal = torch.stack([row_tok.sum().float(), n_seq.float()])
    fused = advantages is None
    tok_adv = advantages is not None and advantages.dim() == 2
    dummy = grad  # any valid pointer for unused arguments (never read)
    flat.zero_()  # written by the kernel only in the fused path
    leader.zero_()
    block_t = max(16, min(1024, triton.next_power_of_2(t)))
    block_n = max(16, min(1024, triton.next_power_of_2(n)))
    _grpo_loss_fwd_kernel[(n,)](
        logprobs, old_logprobs, mask, ref_logprobs if ref_logprobs is not None else dummy,
        advantages if advantages is not None else dummy, rewards if rewards is not None else dummy,
        group_ids if group_ids is not None else adv_out, seq_weights if seq_weights is not None else dummy,
        grad, rowstats, adv_out, flat, leader, row_tok, scal,
        n, t, float(eps_low), float(eps_high), float(dual_clip), float(ratio_cap), float(kl_coef), float(adv_eps),
        float(adv_clip), float(norm_length if norm_length > 0 else t), float(num_tokens),
        FUSED_ADV=fused, ADV_SCALE={"group": 0, "batch": 1, "none": 2}[adv_scale], UNBIASED=bool(adv_unbiased),
        SINGLETON_RAW=bool(adv_singleton_raw), HAS_ADV_CLIP=adv_clip > 0, HAS_DUAL=math.isfinite(dual_clip),
        TOK_ADV=tok_adv,
        HAS_SEQW=seq_weights is not None, KL=int(kl_estimator), SEQ=bool(seq_level), AGG=int(loss_agg),
        BLOCK_T=block_t, BLOCK_N=block_n,
    )
    return rowstats


# ---------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------
class GRPOLossFunction(torch.autograd.Function):
    """Forward runs the fused kernel (loss + dL/dlogp); backward rescales the saved gradient."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
                backend, kw):
        grad, rowstats, adv, flat, leader = torch.ops.mtgrpo.grpo_loss_fwd_bwd(
            logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs, backend, **kw)
        loss = rowstats[:, LOSS_CONTRIB].sum().to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.in_dtype = logprobs.dtype
        ctx.mark_non_differentiable(rowstats, adv, flat, leader)
        return loss, rowstats, adv, flat, leader

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (grad,) = ctx.saved_tensors
        if (not torch.compiler.is_compiling() and grad.device.type == "cpu" and grad.dtype == ctx.in_dtype
                and float(grad_loss) == 1.0):
            g = grad  # the common case: no extra [N, T] pass or allocation
        else:
            g = (grad * grad_loss.to(grad.dtype)).to(ctx.in_dtype)
        return g, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------
def _kernel_kwargs(cfg: GRPOConfig, ref_given: bool) -> dict:
    return dict(
        adv_scale=cfg.adv_scale, adv_eps=float(cfg.adv_eps), adv_unbiased=cfg.adv_std == "unbiased",
        adv_singleton_raw=cfg.adv_singleton == "raw", adv_clip=float(cfg.adv_clip or 0.0),
        eps_low=float(cfg.clip_eps_low), eps_high=float(cfg.clip_eps_high),
        dual_clip=float(cfg.dual_clip) if cfg.dual_clip is not None else math.inf,
        ratio_cap=float(cfg.ratio_cap) if cfg.ratio_cap is not None else math.inf,
        kl_coef=float(cfg.kl_coef), kl_estimator=_KL_CODE[cfg.kl_estimator] if ref_given else 0,
        seq_level=cfg.importance_level == "sequence", loss_agg=_AGG_CODE[cfg.loss_agg],
        num_tokens=float(cfg.num_tokens or 0), norm_length=float(cfg.norm_length or 0.0),
        seq_count_all=cfg.seq_count == "all",
    )


def _task_stats(per_seq, row_tokens, task_ids, num_tasks, flat, leader, adv_zero):
    """Per-task sums of the per-row statistics (through the task accumulation op)."""
    from .task_accumulate import task_masked_sum  # one implementation of per-task sums

    n = task_ids.numel()
    ones = torch.ones((n, 1), dtype=torch.bool, device=task_ids.device)
    loss_sum, nseq = task_masked_sum(per_seq[:, None], ones, task_ids, num_tasks)
    tokens, _ = task_masked_sum(row_tokens[:, None], ones, task_ids, num_tasks)
    if flat is not None:
        lead = leader.bool()[:, None]
        zero, ngroups = task_masked_sum(flat.to(loss_sum.dtype)[:, None], lead, task_ids, num_tasks)
    else:
        zero, ngroups = task_masked_sum(adv_zero.to(loss_sum.dtype)[:, None], ones, task_ids, num_tasks)
    zero_frac = torch.where(ngroups > 0, zero / ngroups.clamp(min=1).to(zero.dtype), torch.zeros_like(zero))
    return {"task_loss_sum": loss_sum, "task_tokens": tokens.round().long(), "task_zero_adv_frac": zero_frac,
            "task_num_sequences": nseq}


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    mask: torch.Tensor,
    advantages: Optional[torch.Tensor] = None,
    *,
    rewards: Optional[torch.Tensor] = None,
    group_ids: Optional[torch.Tensor] = None,
    adv_scale: str = "group",
    adv_eps: float = 1e-6,
    adv_std: str = "unbiased",
    adv_singleton: str = "zero",
    adv_clip: Optional[float] = None,
    seq_weights: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: Optional[float] = None,
    ratio_cap: Optional[float] = None,
    importance_level: str = "token",
    loss_agg: str = "token-mean",
    num_tokens: Optional[int] = None,
    norm_length: Optional[float] = None,
    seq_count: str = "nonempty",
    task_ids: Optional[torch.Tensor] = None,
    num_tasks: Optional[int] = None,
    backend: str = "auto",
    config: Optional[GRPOConfig] = None,
) -> tuple[torch.Tensor, GRPOStats]:
    """GRPO clipped-surrogate loss, optionally with the group advantages fused in.

    Parameters
    ----------
    logprobs : Tensor[N, T], float32/float64/bfloat16/float16, requires grad
        Log-probabilities of the sampled tokens under the current policy.
    old_logprobs : Tensor[N, T] or None
        Under the behaviour policy; None means on-policy (``logprobs.detach()``).
    mask : Tensor[N, T], bool or 0/1
        Completion tokens. Masked positions take no part (they may hold any value).
    advantages : Tensor[N] or Tensor[N, T] or None
        Precomputed advantages; None computes them in the kernel from ``rewards[N]`` and
        ``group_ids[N]`` (ragged groups, labels in any order).
    adv_scale, adv_eps, adv_std, adv_singleton, adv_clip
        Advantage options (see :func:`group_advantages`).
    seq_weights : Tensor[N] or None
        Multiplies each sequence's advantage (GDRO bin weights, task weights).
    ref_logprobs, kl_coef, kl_estimator
        KL penalty ``+ kl_coef * kl`` per token with estimator "k1" | "k2" | "k3".
    clip_eps_low, clip_eps_high, dual_clip, ratio_cap, importance_level
        Clip range ``[1 - eps_low, 1 + eps_high]``, verl's dual clip ``c > 1``, TRL's ratio
        cap ``delta``, "token" or "sequence" (GSPO) importance ratio.
    loss_agg, num_tokens, norm_length, seq_count
        Aggregation: "token-mean" (divide by ``num_tokens`` when given, else the mask's
        count), "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
        (divide by ``norm_length``, default T). ``seq_count`` "nonempty" (verl) or "all"
        (TRL) rows in the seq-mean modes.
    task_ids : Tensor[N] int, num_tasks : int
        Per-task statistics in the returned stats.
    backend : "auto" | "triton" | "cpu" | "torch"
    config : GRPOConfig, optional
        Replaces every keyword option above at once.

    Returns
    -------
    loss : 0-d Tensor (float64 for float64 inputs, else float32)
    stats : GRPOStats
    """
    cfg = config if config is not None else GRPOConfig(
        adv_scale=adv_scale, adv_eps=adv_eps, adv_std=adv_std, adv_singleton=adv_singleton, adv_clip=adv_clip,
        kl_coef=kl_coef, kl_estimator=kl_estimator, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
        dual_clip=dual_clip, ratio_cap=ratio_cap, importance_level=importance_level, loss_agg=loss_agg,
        num_tokens=num_tokens, norm_length=norm_length, seq_count=seq_count)
    if not isinstance(cfg, GRPOConfig):
        raise TypeError(f"config: expected a GRPOConfig, got {type(cfg).__name__}")
    _validate(logprobs, old_logprobs, mask, advantages, rewards, group_ids, seq_weights, ref_logprobs,
              task_ids, num_tasks, cfg)
    be = resolve_backend("grpo_loss", backend, logprobs.device)
    if be == "torch":
        loss, s = grpo_loss_ref(logprobs, old_logprobs, mask, advantages, rewards=rewards, group_ids=group_ids,
                                seq_weights=seq_weights, ref_logprobs=ref_logprobs, task_ids=task_ids,
                                num_tasks=num_tasks, config=cfg)
        return loss, GRPOStats(**s)

    cdt = _compute_dtype(logprobs.dtype)
    lp = logprobs.contiguous()
    old = lp.detach() if old_logprobs is None else old_logprobs.detach().to(lp.dtype).contiguous()
    m = mask.contiguous() if mask.dtype in (torch.bool, torch.uint8) else (mask != 0)
    m = m.view(torch.uint8) if m.dtype == torch.bool else m
    adv = None if advantages is None else advantages.detach().to(cdt).contiguous()
    rw = None
    if rewards is not None:
        rw = rewards.detach().to(torch.float64 if be == "cpu" else torch.float32).contiguous()
    gid = None if group_ids is None else group_ids.detach().to(torch.int64).contiguous()
    sw = None if seq_weights is None else seq_weights.detach().to(cdt).contiguous()
    ref = None if ref_logprobs is None else ref_logprobs.detach().to(lp.dtype).contiguous()
    kw = _kernel_kwargs(cfg, ref is not None)
    if advantages is not None:
        rw = gid = None
    loss, rowstats, adv_rows, flat, leader = GRPOLossFunction.apply(lp, old, m, adv, rw, gid, sw, ref, be, kw)
    if be == "cpu" and not math.isfinite(float(loss.detach())):
        raise ValueError("logprobs/old_logprobs: non-finite values at unmasked positions made the loss "
                         f"{float(loss)}; check the policy's log-probabilities (masked positions may hold anything)")
    return loss, _stats_from_rows(rowstats, adv_rows, flat, leader, advantages, seq_weights, rewards is not None and
                                  advantages is None, ref is not None, task_ids, num_tasks, cdt)


def _stats_from_rows(rowstats, adv_rows, flat, leader, advantages, seq_weights, fused, ref_given, task_ids,
                     num_tasks, cdt) -> GRPOStats:
    rs = rowstats.to(cdt)
    tot = rs.sum(0)  # every column's batch sum in one reduction (the scalars below are views)
    tok = tot[TOKENS]
    frac = tot / tok.clamp(min=1.0)
    row_tokens = rs[:, TOKENS]
    per_seq = rs[:, PG_SUM] / row_tokens.clamp(min=1.0)
    if advantages is not None and advantages.dim() == 2:
        a = advantages.detach().to(cdt)
        adv_out = a * seq_weights.detach().to(cdt)[:, None] if seq_weights is not None else a
        adv_zero = adv_out.abs().amax(1) == 0
    else:
        adv_out = adv_rows.to(cdt)
        adv_zero = adv_out == 0
    if fused:
        lead = leader.bool()
        zero_frac = (flat.bool() & lead).sum().to(cdt) / lead.sum().clamp(min=1).to(cdt)
    else:
        zero_frac = adv_zero.to(cdt).mean()
    stats = GRPOStats(
        advantages=adv_out,
        per_sequence_loss=per_seq,
        clip_frac_low=frac[CLIP_LOW],
        clip_frac_high=frac[CLIP_HIGH],
        dual_clip_frac=frac[DUAL],
        ratio_mean=frac[RATIO_SUM],
        approx_kl=frac[NEG_LOGR_SUM],
        ref_kl_mean=frac[KL_SUM] if ref_given else torch.zeros((), dtype=cdt, device=rs.device),
        zero_adv_group_frac=zero_frac,
        num_tokens=tok,
    )
    if task_ids is not None:
        t = _task_stats(per_seq, row_tokens, task_ids.long(), num_tasks, flat if fused else None, leader, adv_zero)
        for k, v in t.items():
            setattr(stats, k, v)
    return stats


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    std: str = "unbiased",
    singleton: str = "zero",
    clip: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Group-relative advantages over ragged groups (ALGORITHMS.md section 1).

    Parameters
    ----------
    rewards : Tensor[N], real
    group_ids : Tensor[N], integer labels (any values, any order)
    scale : "group" | "batch" | "none";  std : "unbiased" | "population"
    singleton : "zero" (a group of one has A = 0) | "raw" (verl: mean 0, std 1)
    clip : clamp to [-clip, clip] after normalisation
    backend : "auto" | "cpu" | "torch"

    Returns
    -------
    Tensor[N], float64 for float64 rewards, else float32; exactly 0 for groups whose
    rewards are all equal.
    """
    cfg = GRPOConfig(adv_scale=scale, adv_eps=eps, adv_std=std, adv_singleton=singleton, adv_clip=clip)
    _check_tensor("rewards", rewards, ndim=1)
    if rewards.dtype == torch.bool or rewards.dtype.is_complex:
        raise TypeError(f"rewards: expected a real tensor, got {rewards.dtype}")
    n = rewards.shape[0]
    if n == 0:
        raise ValueError("rewards: expected at least one reward, got an empty tensor")
    _check_tensor("group_ids", group_ids, shape=(n,), integer=True, device=rewards.device)
    _check_finite("rewards", rewards.double())
    be = resolve_backend("group_advantages", backend, rewards.device)
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    if be == "torch":
        from ..reference.grpo_loss import group_advantages_ref

        return group_advantages_ref(rewards, group_ids, scale=scale, eps=eps, std=std, singleton=singleton, clip=clip)
    adv = torch.empty(n, dtype=torch.float64)
    flat = torch.empty(n, dtype=torch.uint8)
    leader = torch.empty(n, dtype=torch.uint8)
    _native.native().group_advantages_cpu(
        rewards.detach().to(torch.float64).contiguous().numpy(), group_ids.detach().to(torch.int64).contiguous().numpy(),
        adv.numpy(), flat.numpy(), leader.numpy(), scale=cfg.adv_scale, eps=float(cfg.adv_eps),
        unbiased=cfg.adv_std == "unbiased", singleton_raw=cfg.adv_singleton == "raw", clip=float(cfg.adv_clip or 0.0))
    return adv.to(out_dtype)


class GRPOLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`grpo_loss`; the keyword configuration is fixed at construction.

    Example
    -------
    >>> crit = GRPOLoss(clip_eps_high=0.28, loss_agg="token-mean")
    >>> loss, stats = crit(logprobs, old_logprobs, mask, rewards=r, group_ids=g)
    """

    def __init__(self, *, backend: str = "auto", **config):
        super().__init__()
        self.config = GRPOConfig(**config)
        self.backend = backend

    def forward(self, logprobs, old_logprobs, mask, advantages=None, **tensors):
        return grpo_loss(logprobs, old_logprobs, mask, advantages, config=self.config, backend=self.backend, **tensors)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, {self.config}"
