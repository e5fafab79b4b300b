"""Shared ``@triton.jit`` pieces of the GRPO kernels: the clipped ratio surrogate, the KL
estimators and the segment (group) statistics over a ragged label array.

Imported only when triton is installed; every kernel file takes its helpers from here.
"""
from __future__ import annotations

import triton
import triton.language as tl

# ``tl.constexpr(...)`` objects (not ``NAME: tl.constexpr = 20.0`` annotations): the compiler
# resolves a global used inside a kernel only when it is a constexpr instance; the annotated
# form is a plain float that the interpreter accepts and ``triton.compile`` rejects (NameError).
LOG_RATIO_CLAMP = tl.constexpr(20.0)  # verl clamps log(pi / pi_old) to [-20, 20] before exp
KL_LOG_CLAMP = tl.constexpr(20.0)  # k3: (ref - logp) clamped to [-20, 20]
KL_VALUE_CLAMP = tl.constexpr(10.0)  # k3: value clamped to [-10, 10]


@triton.jit
def load_token_tile(LP, OLD, MASK, base, start, T, BLOCK_T: tl.constexpr):
    """One tile of a row: (offsets, in-bounds, mask, logp, old logp, clamped log-ratio)."""
    offs = start + tl.arange(0, BLOCK_T)
    inb = offs < T
    m = (tl.load(MASK + base + offs, mask=inb, other=0) != 0) & inb
    x = tl.load(LP + base + offs, mask=inb, other=0.0).to(tl.float32)
    o = tl.load(OLD + base + offs, mask=inb, other=0.0).to(tl.float32)
    d = x - o
    dc = tl.minimum(tl.maximum(d, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
    return offs, inb, m, x, d, dc


@triton.jit
def clipped_surrogate(a, r, lo, hi, dual_clip, HAS_DUAL: tl.constexpr):
    """Per element: (loss, d loss / d ratio, dual clip active) of
    max(-a r, -a clip(r, lo, hi)), then min(., -a c) where a < 0 when HAS_DUAL."""
    rc = tl.minimum(tl.maximum(r, lo), hi)
    l1 = -a * r
    l2 = -a * rc
    use1 = l1 >= l2
    loss = tl.where(use1, l1, l2)
    dldr = tl.where(use1, -a, 0.0)
    if HAS_DUAL:
        l3 = -a * dual_clip
        dual = (a < 0) & (l3 < loss)
        loss = tl.where(dual, l3, loss)
        dldr = tl.where(dual, 0.0, dldr)
    else:
        dual = a != a  # all False, with the right shape
    return loss, dldr, dual


@triton.jit
def kl_estimate(x, ref, KL: tl.constexpr):
    """(kl, d kl / d logp) per token; KL = 1 (k1), 2 (k2), 3 (k3 with verl's clamps)."""
    if KL == 1:
        kl = x - ref
        dkl = tl.full(x.shape, 1.0, tl.float32)
    elif KL == 2:
        v = x - ref
        kl = 0.5 * v * v
        dkl = v
    else:
        u = ref - x
        uc = tl.minimum(tl.maximum(u, -KL_LOG_CLAMP), KL_LOG_CLAMP)
        e = tl.exp(uc)
        k3 = e - uc - 1.0
        inside = (u >= -KL_LOG_CLAMP) & (u <= KL_LOG_CLAMP) & (k3 <= KL_VALUE_CLAMP) & (k3 >= -KL_VALUE_CLAMP)
        kl = tl.minimum(tl.maximum(k3, -KL_VALUE_CLAMP), KL_VALUE_CLAMP)
        dkl = tl.where(inside, 1.0 - e, 0.0)
    return kl, dkl


@triton.jit
def segment_stats(REWARDS, GIDS, N, g, BLOCK_N: tl.constexpr):
    """Over every i with GIDS[i] == g: (sum, count, min, max, lowest index) of REWARDS, in
    float64 (rewards near the float32 limit must not overflow; the same on every backend).
    O(N) per call: a program computing its own row's group statistics scans the labels."""
    s = tl.zeros([BLOCK_N], tl.float64)
    c = tl.zeros([BLOCK_N], tl.float64)
    lo = tl.full([BLOCK_N], float("inf"), tl.float64)
    hi = tl.full([BLOCK_N], float("-inf"), tl.float64)
    first = tl.full([BLOCK_N], 2147483647, tl.int64)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        inb = offs < N
        gg = tl.load(GIDS + offs, mask=inb, other=0)
        rr = tl.load(REWARDS + offs, mask=inb, other=0.0).to(tl.float64)
        same = inb & (gg == g)
        s += tl.where(same, rr, 0.0)
        c += tl.where(same, 1.0, 0.0)
        lo = tl.minimum(lo, tl.where(same, rr, float("inf")))
        hi = tl.maximum(hi, tl.where(same, rr, float("-inf")))
        first = tl.minimum(first, tl.where(same, offs.to(tl.int64), 2147483647))
    return tl.sum(s, 0), tl.sum(c, 0), tl.min(lo, 0), tl.max(hi, 0), tl.min(first, 0)


@triton.jit
def segment_sq_dev(REWARDS, GIDS, N, g, mean, ALL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum of squared deviations from ``mean`` over the group g (or every element if ALL), float64."""
    acc = tl.zeros([BLOCK_N], tl.float64)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        inb = offs < N
        rr = tl.load(REWARDS + offs, mask=inb, other=0.0).to(tl.float64)
        if ALL:
            sel = inb
        else:
            gg = tl.load(GIDS + offs, mask=inb, other=0)
            sel = inb & (gg == g)
        dv = rr - mean
        acc += tl.where(sel, dv * dv, 0.0)
    return tl.sum(acc, 0)


# ---------------------------------------------------------------------------------------
# The per-token policy-loss forms (the Triton side of the registry in ops/grpo_loss.py,
# KERNEL_FORMS; mirrors csrc/include/mtgrpo/grpo_forms.h). One helper per form, selected by
# the tl.constexpr FORM id in policy_form, so each compiled kernel holds one form only.
# Inputs: advantage a, ratio r (after the cap), log-prob x, unclamped log-ratio d, the row
# constant rc. Returns (loss, d loss / d r, d loss / d x, low clip, high clip, dual clip).
# ---------------------------------------------------------------------------------------
@triton.jit
def form_vanilla(a, r, lo, hi, dual_clip, HAS_DUAL: tl.constexpr):
    loss, dldr, dual = clipped_surrogate(a, r, lo, hi, dual_clip, HAS_DUAL)
    return loss, dldr, tl.zeros_like(r), (r < lo) & (a < 0), (r > hi) & (a > 0), dual


@triton.jit
def form_cispo(a, r, x, lo, hi):
    coef = -tl.minimum(tl.maximum(r, lo), hi) * a
    return coef * x, tl.zeros_like(r), coef, r < lo, r > hi, a != a


@triton.jit
def form_sapo(a, r, tau_pos, tau_neg):
    tau = tl.where(a > 0, tau_pos, tau_neg)
    s = 1.0 / (1.0 + tl.exp(-(tau * (r - 1.0))))
    gate = s * 4.0 / tau
    none = a != a
    return -a * gate, -a * 4.0 * s * (1.0 - s), tl.zeros_like(r), none, none, none


@triton.jit
def form_logp_weighted(a, x, rc):
    coef = -rc * a
    none = a != a
    return coef * x, tl.zeros_like(x), coef, none, none, none


@triton.jit
def form_geo_mean(a, d, rc, eps_low, eps_high):
    loss = -a * rc
    inside = tl.where(a > 0, d <= eps_high, d >= -eps_low)
    clipped = (d < -eps_low) | (d > eps_high)
    return loss, tl.zeros_like(d), tl.where(inside, loss, 0.0), clipped & (a < 0), clipped & (a > 0), a != a


@triton.jit
def policy_form(a, r, x, d, rc, lo, hi, dual_clip, eps_low, eps_high, tau_pos, tau_neg, FORM: tl.constexpr,
                HAS_DUAL: tl.constexpr):
    """FORM: 0 vanilla / luspo, 1 cispo, 2 sapo, 3 gpg / vespo (rc = 1 / phi), 4 geo_mean."""
    if FORM == 1:
        out = form_cispo(a, r, x, lo, hi)
    elif FORM == 2:
        out = form_sapo(a, r, tau_pos, tau_neg)
    elif FORM == 3:
        out = form_logp_weighted(a, x, rc)
    elif FORM == 4:
        out = form_geo_mean(a, d, rc, eps_low, eps_high)
    else:
        out = form_vanilla(a, r, lo, hi, dual_clip, HAS_DUAL)
    return out


@triton.jit
def is_token_weight(o, roll, is_lo, is_hi, IS_MODE: tl.constexpr):
    """Token-level IS weight exp(clamp(old - rollout, -20, 20)), truncated to [is_lo, is_hi]
    (IS_MODE 1) or zeroed outside it (IS_MODE 2); returns (weight, truncated-or-masked)."""
    u = tl.minimum(tl.maximum(o - roll, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
    raw = tl.exp(u)
    keep = (raw >= is_lo) & (raw <= is_hi)
    if IS_MODE == 1:
        w = tl.minimum(tl.maximum(raw, is_lo), is_hi)
    else:
        w = tl.where(keep, raw, 0.0)
    return w, keep == 0
