"""Pure-PyTorch reference of the GRPO group advantage and clipped surrogate (the oracle).

What it computes (docs/ALGORITHMS.md section 1)
------------------------------------------
* ``group_advantages_ref``: per-group baseline ``A_i = (r_i - mean_g) / (std + eps)`` over
  ragged groups identified by labels (any integers, any order), with "group" / "batch" /
  "none" (Dr. GRPO) scaling, unbiased or population std, a policy for singleton groups and
  an optional clip. Matches verl's ``compute_grpo_outcome_advantage`` (``singleton="raw"``
  reproduces verl's mean 0 / std 1 convention for singletons) and TRL's ``scale_rewards``.
* ``grpo_loss_ref``: the PPO-clip surrogate of DeepSeekMath's GRPO with DAPO's asymmetric
  clip (clip-higher), verl's dual clip and log-ratio clamp, TRL's ratio cap (``delta``),
  GSPO's sequence-level ratio, an optional KL penalty (k1 / k2 / k3 as verl's
  ``kl_penalty``), and the four aggregation modes of verl's ``agg_loss``.

Written for clarity, not speed: every intermediate is materialised ([N, T] tensors), so it
reads about 10 [N, T] arrays and allocates as many; that cost is exactly what the fused
kernels remove. It runs in float64 when given float64 inputs (the gold standard of the
tests) and in float32 otherwise.

Tie-breaking: ``torch.maximum`` splits the gradient of equal arguments; for the clipped
surrogate both arguments then have the same derivative, so the kernels' choice of one
branch gives the same gradient. Masked tokens take no part in the loss, its statistics
or its gradient; the reference multiplies by the mask, so it needs finite values there.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..config import GRPOConfig

LOG_RATIO_CLAMP = 20.0  # verl clamps log(pi/pi_old) to [-20, 20] before exp
KL_LOG_CLAMP = 20.0  # verl's low_var_kl clamps (ref - logp) to [-20, 20]
KL_VALUE_CLAMP = 10.0  # ... and the k3 value to [-10, 10]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def group_structure(group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dense group index per element, group sizes, number of groups."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return inverse, counts, int(counts.numel())


def group_advantages_ref(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale: str = "group",
    eps: float = 1e-6,
    std: str = "unbiased",
    singleton: str = "zero",
    clip: float | None = None,
) -> torch.Tensor:
    """Group-relative advantages over ragged groups.

    Parameters
    ----------
    rewards : Tensor[N], float
        Scalar reward of each completion.
    group_ids : Tensor[N], integer
        Group label of each completion (the prompt it answers); any values, any order.
    scale : {"group", "batch", "none"}
        Divide by the group's std, the whole batch's std, or nothing (Dr. GRPO).
    std : {"unbiased", "population"}
        n - 1 (torch.std, verl) or n in the std's denominator.
    singleton : {"zero", "raw"}
        A group of one has advantage 0, or verl's mean 0 / std 1 convention.
    clip : float or None
        Clamp the advantages to [-clip, clip] after normalisation.

    Returns
    -------
    Tensor[N] in float64 for float64 rewards, else float32 (the statistics are computed in
    float64 either way). A group whose rewards are all equal gets exactly 0.
    """
    # Group statistics in float64 on every backend (issue 22 item 8: rewards near the float32
    # limit, |r| ~ 1e38, overflow a float32 sum of squares); the result is cast back after.
    out_dt = _compute_dtype(rewards)
    dt = torch.float64
    r = rewards.to(dt)
    inv, counts, g = group_structure(group_ids)
    n = counts.to(dt)
    mean = torch.zeros(g, dtype=dt, device=r.device).index_add_(0, inv, r) / n
    dev = r - mean[inv]
    ss = torch.zeros(g, dtype=dt, device=r.device).index_add_(0, inv, dev * dev)
    ddof = 1.0 if std == "unbiased" else 0.0
    gstd = torch.sqrt(ss / (n - ddof).clamp(min=1.0))
    gmax = torch.full((g,), -torch.inf, dtype=dt, device=r.device).scatter_reduce(0, inv, r, "amax")
    gmin = torch.full((g,), torch.inf, dtype=dt, device=r.device).scatter_reduce(0, inv, r, "amin")
    single = counts == 1
    if singleton == "raw":  # verl: mean 0, std 1 for a group of one
        mean = torch.where(single, torch.zeros_like(mean), mean)
        gstd = torch.where(single, torch.ones_like(gstd), gstd)
        dev = r - mean[inv]
    if scale == "group":
        adv = dev / (gstd[inv] + eps)
    elif scale == "batch":
        nb = r.numel()
        bstd = torch.std(r, correction=int(ddof)) if nb > ddof else torch.zeros((), dtype=dt, device=r.device)
        adv = dev / (bstd + eps)
    elif scale == "none":
        adv = dev
    else:
        raise ValueError(f"scale: expected 'group', 'batch' or 'none', got {scale!r}")
    flat = (gmax == gmin) & ~(single & (singleton == "raw"))  # zero-advantage groups
    adv = torch.where(flat[inv], torch.zeros_like(adv), adv)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(out_dt)


def zero_adv_group_flags(rewards: torch.Tensor, group_ids: torch.Tensor, singleton: str = "zero"):
    """Per group: is every advantage 0 (all rewards equal)? Returns (flags[G], inverse[N])."""
    inv, counts, g = group_structure(group_ids)
    r = rewards.to(_compute_dtype(rewards))
    gmax = torch.full((g,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amax")
    gmin = torch.full((g,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(0, inv, r, "amin")
    flat = gmax == gmin
    if singleton == "raw":
        flat = flat & (counts > 1)
    return flat, inv


def kl_penalty_ref(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate (verl's ``kl_penalty``: k1 "kl", k2 "mse", k3 "low_var_kl")."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if estimator == "k3":
        u = (ref_logprobs - logprobs).clamp(-KL_LOG_CLAMP, KL_LOG_CLAMP)
        return (torch.exp(u) - u - 1.0).clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)
    raise ValueError(f"kl_estimator: expected 'k1', 'k2' or 'k3', got {estimator!r}")


# ---------------------------------------------------------------------------------------
# The policy-loss forms, registered by name (verl's register_policy_loss): one small function
# per form mapping a token context to the per-token loss (autograd gives d/d logp) and the clip
# masks its statistics count. The fused backends mirror each entry: csrc/include/mtgrpo/
# grpo_forms.h (one functor per form) and ops/_triton_helpers.py (one @triton.jit helper per
# form id). Formulas and sources: docs/ALGORITHMS.md section 1.4.
# ---------------------------------------------------------------------------------------
class FormCtx:
    """What a form sees: ``lp`` log-probs (differentiable), ``d`` the unclamped log-ratio,
    ``ratio`` (clamped log-ratio, GSPO's sequence ratio when asked, capped), ``a`` advantages
    ([N, 1] or [N, T]), ``m`` the float mask, ``row_tokens``, the config ``c``, and ``w_tok`` the
    token-level IS weights (detached, [N, T]; ones without a correction)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


POLICY_LOSS_FNS: dict = {}


def register_policy_loss(*names: str):
    """Register a reference form under one or more ``policy_loss`` names."""
    def deco(fn):
        for name in names:
            POLICY_LOSS_FNS[name] = fn
        return fn
    return deco


@register_policy_loss("vanilla", "luspo")
def _form_vanilla(x: FormCtx):
    c = x.c
    lo, hi = 1.0 - c.clip_eps_low, 1.0 + c.clip_eps_high
    a, ratio = x.a, x.ratio
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(lo, hi))
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if c.dual_clip is not None:
        l_dual = -a * c.dual_clip
        dual = (a < 0) & (l_dual < pg)
        pg = torch.where(a < 0, torch.minimum(pg, l_dual), pg)
    return pg, (ratio < lo) & (a < 0), (ratio > hi) & (a > 0), dual


@register_policy_loss("cispo")
def _form_cispo(x: FormCtx):
    lo, hi = 1.0 - x.c.clip_eps_low, 1.0 + x.c.clip_eps_high
    coef = -x.ratio.clamp(lo, hi).detach() * x.a
    none = torch.zeros_like(x.lp, dtype=torch.bool)
    return coef * x.lp, (x.ratio < lo) & (x.m > 0), (x.ratio > hi) & (x.m > 0), none


@register_policy_loss("sapo")
def _form_sapo(x: FormCtx):
    tau = torch.where(x.a > 0, x.a.new_tensor(x.c.tau_pos), x.a.new_tensor(x.c.tau_neg))  # in a's dtype
    none = torch.zeros_like(x.lp, dtype=torch.bool)
    return -(torch.sigmoid(tau * (x.ratio - 1.0)) * 4.0 / tau) * x.a, none, none, none


@register_policy_loss("gpg")
def _form_gpg(x: FormCtx):
    none = torch.zeros_like(x.lp, dtype=torch.bool)
    return -x.lp * x.a, none, none, none


@register_policy_loss("vespo")
def _form_vespo(x: FormCtx):
    phi = vespo_phi(x.d.detach(), x.m, x.a, x.c, x.w_tok)
    none = torch.zeros_like(x.lp, dtype=torch.bool)
    return (-phi[:, None] * x.a) * x.lp, none, none, none


@register_policy_loss("geo_mean")
def _form_geo_mean(x: FormCtx):
    d = x.lp - x.old  # verl does not clamp the log-ratio here
    dmin = geo_mean_dmin(d, x.a, x.c.clip_eps_low, x.c.clip_eps_high)
    r_row = torch.exp((dmin * x.m).sum(1) / x.row_tokens.clamp(min=1.0))
    clipped = ((d < -x.c.clip_eps_low) | (d > x.c.clip_eps_high)) & (x.m > 0)
    return (-x.a * r_row[:, None]).expand_as(x.lp), clipped & (x.a < 0), clipped & (x.a > 0), \
        torch.zeros_like(x.lp, dtype=torch.bool)


@register_policy_loss("clip_cov")
def _form_clip_cov(x: FormCtx):
    """verl compute_policy_loss_clip_cov: the PPO clip, and among the unclipped tokens whose
    covariance (A - mean A)(logp - mean logp) lies in (lb, ub) up to max(1, int(ratio * tokens))
    drawn at random (torch.randperm, the global generator) lose their loss. Torch path only (a
    batch-wide random draw and a host sync)."""
    c, a, m = x.c, x.a.expand_as(x.lp), x.m
    lo, hi = 1.0 - c.clip_eps_low, 1.0 + c.clip_eps_high
    pg1, pg2 = -a * x.ratio, -a * x.ratio.clamp(lo, hi)
    mb = m > 0
    clip_by_origin = (pg2 > pg1) & mb
    tok = m.sum()
    cov = (a - (a * m).sum() / tok) * (x.lp - (x.lp.detach() * m).sum() / tok)
    cov = cov.masked_fill(~mb | clip_by_origin, -math.inf)
    clip_num = max(int(c.clip_cov_ratio * float(tok)), 1)
    idx = torch.nonzero((cov < c.clip_cov_ub) & (cov > c.clip_cov_lb) & mb)
    if len(idx) > 0:
        idx = idx[torch.randperm(len(idx))[: min(clip_num, len(idx))]]
    corr = torch.ones_like(x.lp)
    corr[idx[:, 0], idx[:, 1]] = 0
    none = torch.zeros_like(x.lp, dtype=torch.bool)
    return torch.maximum(pg1, pg2) * corr, none, (corr == 0) & mb, none


@register_policy_loss("kl_cov")
def _form_kl_cov(x: FormCtx):
    """verl compute_policy_loss_kl_cov: -A r, plus ppo_kl_coef |d| on the max(1, int(ratio *
    tokens)) tokens of largest covariance (A - mean A)(logp - mean logp). Torch path only."""
    c, a, m = x.c, x.a.expand_as(x.lp), x.m
    d = x.lp - x.old
    pg = -a * x.ratio
    pg_kl = pg + c.ppo_kl_coef * d.abs()
    valid = (m > 0).reshape(-1)
    vidx = torch.nonzero(valid, as_tuple=True)[0]
    av, lv = a.detach().reshape(-1)[vidx], x.lp.detach().reshape(-1)[vidx]
    sel = torch.zeros_like(valid)
    if len(vidx) > 0:
        cov = (av - av.mean()) * (lv - lv.mean())
        k = max(1, int(len(cov) * c.kl_cov_ratio))
        sel[vidx[torch.topk(cov, k, largest=True).indices]] = True
    sel = sel.view_as(pg)
    none = torch.zeros_like(x.lp, dtype=torch.bool)
    return torch.where(sel, pg_kl, pg), none, none, none


def geo_mean_dmin(d: torch.Tensor, a: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """GMPO's sign-aware clipped log-ratio: sgn(a) min(sgn(a) d, sgn(a) clamp(d, -eps_low, eps_high))."""
    s = torch.sign(a)
    return s * torch.minimum(s * d, s * d.clamp(-eps_low, eps_high))


VESPO_LOG_FLOOR = math.log(1e-8)  # TRL's get_gamma_weights clamps log w to [log 1e-8, 20]


def vespo_phi(d: torch.Tensor, m: torch.Tensor, a: torch.Tensor, c: GRPOConfig, w_tok: torch.Tensor | None):
    """VESPO's gamma weight per row (TRL ``get_gamma_weights``; no gradient):
    log w = clamp(sum_t m clamp(d_t, -20, 20) + sum_t m clamp(log w_is_t, log 1e-8, 20), log 1e-8, 20),
    phi = exp(lam + k log w - lam w), (k, lam) = (k_pos, lam_pos) where a >= 0, else the negative pair."""
    with torch.no_grad():
        s = (d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * m).sum(1)
        if w_tok is not None:
            s = s + (torch.log(w_tok).clamp(VESPO_LOG_FLOOR, LOG_RATIO_CLAMP) * m).sum(1)
        log_w = s.clamp(VESPO_LOG_FLOOR, LOG_RATIO_CLAMP)
        a_row = a[:, 0] if a.dim() == 2 and a.shape[1] == 1 else a
        pos = a_row >= 0
        k = torch.where(pos, s.new_tensor(c.vespo_k_pos), s.new_tensor(c.vespo_k_neg))
        lam = torch.where(pos, s.new_tensor(c.vespo_lambda_pos), s.new_tensor(c.vespo_lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


def is_weights_ref(old: torch.Tensor, rollout: torch.Tensor, m: torch.Tensor, mode: str, lo: float | None,
                   hi: float | None):
    """Importance-sampling correction weights of the train / rollout mismatch (no gradient).

    ``old`` / ``rollout``: log-probs of the training policy's behaviour pass and of the sampler
    (masked positions already 0). Token modes: w_t = exp(clamp(old_t - rollout_t, -20, 20));
    sequence modes: one w per row, exp(clamp(sum_t m (old_t - rollout_t), -20, 20)) (TRL sums,
    verl's rollout_is="sequence" too). "truncate": clamp(w, lo, hi) (TIS; lo None = 0);
    "mask": w where lo <= w <= hi, else 0 (IcePop / masked IS; None = unbounded).

    Returns (w [N, T] for token modes or [N] for sequence modes, modified bool of the same shape).
    """
    with torch.no_grad():
        u = (old - rollout) * m
        if mode.startswith("sequence"):
            u = u.sum(1)
        raw = torch.exp(u.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        lo_v = 0.0 if lo is None else lo
        hi_v = math.inf if hi is None else hi
        keep = (raw >= lo_v) & (raw <= hi_v)
        w = raw.clamp(lo_v, hi_v) if mode.endswith("truncate") else torch.where(keep, raw, torch.zeros_like(raw))
        return w, ~keep


def effective_config(c: GRPOConfig) -> GRPOConfig:
    """The config a loss actually runs: GMPO ("geo_mean") is a mean over all rows of each row's
    loss whatever ``loss_agg`` says (verl ignores loss_agg_mode there), i.e. seq-mean-token-mean
    with seq_count="all"."""
    if c.policy_loss == "geo_mean" and (c.loss_agg, c.seq_count) != ("seq-mean-token-mean", "all"):
        return dataclasses.replace(c, loss_agg="seq-mean-token-mean", seq_count="all")
    return c


def is_stats_ref(is_w, is_mod, m, mode, dt):
    """(mean IS weight after the correction, share truncated or masked): over masked tokens for
    token modes, over rows for sequence modes (as TRL logs them); (1, 0) without a correction."""
    if is_w is None:
        return torch.ones((), dtype=dt, device=m.device), torch.zeros((), dtype=dt, device=m.device)
    if mode.startswith("token"):
        tok = m.sum().clamp(min=1.0)
        return (is_w * m).sum() / tok, (is_mod.to(dt) * m).sum() / tok
    return is_w.to(dt).mean(), is_mod.to(dt).mean()


def grpo_loss_ref(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    *,
    rewards: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    seq_weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    task_ids: torch.Tensor | None = None,
    num_tasks: int | None = None,
    config: GRPOConfig = GRPOConfig(),
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Clipped GRPO surrogate, differentiable with respect to ``logprobs``.

    Parameters
    ----------
    logprobs : Tensor[N, T]
        Log-probabilities of the sampled tokens under the current policy.
    old_logprobs : Tensor[N, T] or None
        Under the behaviour policy; None means on-policy (``logprobs.detach()``).
    mask : Tensor[N, T], bool or 0/1
        Which tokens are completion tokens.
    advantages : Tensor[N] or Tensor[N, T] or None
        Given advantages, or None to compute them from ``rewards`` and ``group_ids``.
    seq_weights : Tensor[N] or None
        Multiplies each sequence's advantage (GDRO bin weights, task weights).
    ref_logprobs : Tensor[N, T] or None
        Reference-policy log-probs for the KL penalty (needed when ``config.kl_coef != 0``).
    task_ids, num_tasks : per-task statistics.
    config : GRPOConfig
    rollout_logprobs : Tensor[N, T] or None
        The sampler's log-probs, for ``config.is_correction``.

    Returns
    -------
    loss : 0-d Tensor
    stats : dict with the fields of :class:`mtgrpo_core.GRPOStats`.
    """
    loss, stats, _ = grpo_loss_rows_ref(logprobs, old_logprobs, mask, advantages, rewards=rewards,
                                        group_ids=group_ids, seq_weights=seq_weights, ref_logprobs=ref_logprobs,
                                        task_ids=task_ids, num_tasks=num_tasks, config=config,
                                        rollout_logprobs=rollout_logprobs)
    return loss, stats


def grpo_loss_rows_ref(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    *,
    rewards: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    seq_weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    task_ids: torch.Tensor | None = None,
    num_tasks: int | None = None,
    config: GRPOConfig = GRPOConfig(),
    rollout_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict, dict]:
    """:func:`grpo_loss_ref` plus the per-row quantities the fused kernels return.

    Returns
    -------
    loss, stats : as :func:`grpo_loss_ref`
    rows : dict
        ``row_stats`` [N, 11] float64 (columns as ``mtgrpo_core.ops.grpo_loss.PG_SUM`` ...
        ``TOKENS``: masked sums of the surrogate, KL, ratio, negative log-ratio, low / high /
        dual clip counts, the row's share of the loss, tokens, sum of the IS weights applied, tokens
        whose token IS weight was truncated or masked), ``adv_rows`` [N] float64 (the
        row's advantage after ``seq_weights``; the seq weight, or 1, with token advantages),
        ``flat`` / ``leader`` [N] uint8 (zero-advantage group, first row of its group; 0
        without rewards).
    """
    c = effective_config(config)
    dt = _compute_dtype(logprobs)
    mb = mask != 0
    # Masked positions may hold anything (NaN included): they are replaced by 0 before any
    # arithmetic, so no NaN can reach the loss or the gradient through a product with 0.
    lp = torch.where(mb, logprobs.to(dt), 0.0)
    old = lp.detach() if old_logprobs is None else torch.where(mb, old_logprobs.to(dt), 0.0)
    m = mb.to(dt)
    n, t = lp.shape
    row_tokens = m.sum(1)
    total_tokens = row_tokens.sum()

    if advantages is None:
        # .to(dt): float64 rewards with float32 log-probs give float32 advantages (the loss's
        # compute dtype), so every per-task sum below adds tensors of one dtype.
        adv = group_advantages_ref(rewards, group_ids, scale=c.adv_scale, eps=c.adv_eps, std=c.adv_std,
                                   singleton=c.adv_singleton, clip=c.adv_clip).to(dt)
    else:
        adv = advantages.to(dt)  # finite everywhere (validated), so masked tokens need no guard
    if seq_weights is not None:
        w = seq_weights.to(dt)
        adv = adv * (w if adv.dim() == 1 else w[:, None])
    a = adv[:, None] if adv.dim() == 1 else adv  # [N, 1] or [N, T]

    d = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if c.importance_level == "sequence":  # GSPO: exp(mean over the sequence's tokens)
        seq_log = (d * m).sum(1) / row_tokens.clamp(min=1.0)
        log_ratio = seq_log[:, None].expand(n, t)
    else:
        log_ratio = d
    ratio = torch.exp(log_ratio)
    if c.ratio_cap is not None:
        ratio = ratio.clamp(max=c.ratio_cap)
    # Importance-sampling correction (detached weights): token weights multiply each token's
    # loss, a sequence weight the row's; VESPO folds token weights into its gamma weight and
    # GMPO into one geometric-mean weight per row (as verl's geo_mean).
    w_tok = w_row = is_mod = is_w = None
    if c.is_correction is not None:
        if rollout_logprobs is None:
            raise ValueError(f"rollout_logprobs: required with is_correction={c.is_correction!r}")
        roll = torch.where(mb, rollout_logprobs.to(dt), 0.0)
        is_w, is_mod = is_weights_ref(old.detach(), roll, m, c.is_correction, c.is_lo, c.is_hi)
        if c.is_correction.startswith("token"):
            w_tok = is_w
        else:
            w_row = is_w
    ctx = FormCtx(lp=lp, old=old, d=lp - old, ratio=ratio, a=a, m=m, row_tokens=row_tokens, c=c, w_tok=w_tok)
    pg, clip_lo, clip_hi, dual_active = POLICY_LOSS_FNS[c.policy_loss](ctx)
    if c.policy_loss == "geo_mean" and w_tok is not None:  # one geometric-mean weight per row
        w_row = torch.exp((torch.log(w_tok + 1e-10) * m).sum(1) / row_tokens.clamp(min=1.0))
        w_tok = None
    if c.policy_loss == "vespo":
        w_tok = None  # already inside phi
    if w_tok is not None:
        pg = pg * w_tok
    if w_row is not None:
        pg = pg * w_row[:, None]

    token_loss = pg
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty_ref(lp, torch.where(mb, ref_logprobs.to(dt), 0.0), c.kl_estimator)
        if c.kl_coef != 0.0:
            token_loss = pg + c.kl_coef * kl

    seq_sum = (token_loss * m).sum(1)
    if c.seq_count == "nonempty":
        n_seq = (row_tokens > 0).sum().to(dt)
    else:
        n_seq = torch.tensor(float(n), dtype=dt, device=lp.device)
    n_seq_safe = n_seq.clamp(min=1.0)
    if c.loss_agg == "token-sum":
        row_share = seq_sum
        loss = (token_loss * m).sum()
    elif c.loss_agg == "token-mean":
        denom = (torch.tensor(float(c.num_tokens), dtype=dt, device=lp.device) if c.num_tokens
                 else total_tokens.clamp(min=1.0))
        row_share = seq_sum / denom
        loss = (token_loss * m).sum() / denom
    elif c.loss_agg == "seq-mean-token-mean":
        row_share = seq_sum / row_tokens.clamp(min=1.0) / n_seq_safe
        loss = (seq_sum / row_tokens.clamp(min=1.0)).sum() / n_seq_safe
    elif c.loss_agg == "seq-mean-token-sum":
        row_share = seq_sum / n_seq_safe
        loss = seq_sum.sum() / n_seq_safe
    elif c.loss_agg == "seq-mean-token-sum-norm":
        norm = float(c.norm_length) if c.norm_length is not None else float(t)
        row_share = seq_sum / (n_seq_safe * norm)
        loss = seq_sum.sum() / (n_seq_safe * norm)
    else:
        raise ValueError(f"loss_agg: unknown mode {c.loss_agg!r}")

    with torch.no_grad():
        tok = total_tokens.clamp(min=1.0)
        stats = {
            "advantages": adv.detach(),
            "per_sequence_loss": (pg * m).sum(1).detach() / row_tokens.clamp(min=1.0),
            "clip_frac_low": (clip_lo.to(dt) * m).sum() / tok,
            "clip_frac_high": (clip_hi.to(dt) * m).sum() / tok,
            "dual_clip_frac": (dual_active.to(dt) * m).sum() / tok,
            "ratio_mean": (ratio * m).sum() / tok,
            "approx_kl": (-d * m).sum() / tok,
            "ref_kl_mean": (kl * m).sum() / tok if kl is not None else torch.zeros((), dtype=dt, device=lp.device),
            "num_tokens": total_tokens,
        }
        stats["is_ratio_mean"], stats["is_clip_frac"] = is_stats_ref(is_w, is_mod, m, c.is_correction, dt)
        if group_ids is not None and rewards is not None:
            flat, inv = zero_adv_group_flags(rewards, group_ids, c.adv_singleton)
            stats["zero_adv_group_frac"] = flat.to(dt).mean()
        else:  # no group structure known: share of sequences whose advantage is all zero
            a_rows = adv if adv.dim() == 1 else adv.abs().amax(1)
            stats["zero_adv_group_frac"] = (a_rows == 0).to(dt).mean() if n else torch.zeros((), dtype=dt)
            flat = inv = None
        if task_ids is not None:
            k = int(num_tasks)
            tid = task_ids.long()
            stats["task_loss_sum"] = torch.zeros(k, dtype=dt, device=lp.device).index_add_(
                0, tid, stats["per_sequence_loss"])
            stats["task_tokens"] = torch.zeros(k, dtype=torch.int64, device=lp.device).index_add_(
                0, tid, row_tokens.long())
            stats["task_num_sequences"] = torch.bincount(tid, minlength=k)
            if flat is not None:
                first = torch.full((flat.numel(),), n, dtype=torch.long, device=lp.device).scatter_reduce(
                    0, inv, torch.arange(n, device=lp.device), "amin")
                gtask = tid[first]
                ng = torch.bincount(gtask, minlength=k).to(dt)
                nz = torch.zeros(k, dtype=dt, device=lp.device).index_add_(0, gtask, flat.to(dt))
            else:
                ng = stats["task_num_sequences"].to(dt)
                a_rows = adv if adv.dim() == 1 else adv.abs().amax(1)
                nz = torch.zeros(k, dtype=dt, device=lp.device).index_add_(0, tid, (a_rows == 0).to(dt))
            stats["task_zero_adv_frac"] = torch.where(ng > 0, nz / ng.clamp(min=1.0), torch.zeros_like(nz))
        f64 = torch.float64
        # IS columns: token modes: masked sums of the correction weight and of its truncated /
        # masked flag; sequence modes: the row's weight and flag; no correction: tokens and 0
        if is_w is None:
            is_cols = [row_tokens, torch.zeros_like(row_tokens)]
        elif is_w.dim() == 2:
            is_cols = [(is_w * m).sum(1), (is_mod.to(dt) * m).sum(1)]
        else:
            is_cols = [is_w.to(dt), is_mod.to(dt)]
        cols = [(pg * m).sum(1), (kl * m).sum(1) if kl is not None else torch.zeros(n, dtype=dt, device=lp.device),
                (ratio * m).sum(1), (-d * m).sum(1), (clip_lo.to(dt) * m).sum(1),
                (clip_hi.to(dt) * m).sum(1), (dual_active.to(dt) * m).sum(1), row_share.detach(),
                row_tokens, *is_cols]
        rows = {"row_stats": torch.stack([col.detach().to(f64) for col in cols], 1)}
        if adv.dim() == 1:
            rows["adv_rows"] = adv.detach().to(f64)
        elif seq_weights is not None:
            rows["adv_rows"] = seq_weights.detach().to(f64)
        else:
            rows["adv_rows"] = torch.ones(n, dtype=f64, device=lp.device)
        if flat is not None:
            first = torch.full((flat.numel(),), n, dtype=torch.long, device=lp.device).scatter_reduce(
                0, inv, torch.arange(n, device=lp.device), "amin")
            rows["flat"] = flat[inv].to(torch.uint8)
            rows["leader"] = (first[inv] == torch.arange(n, device=lp.device)).to(torch.uint8)
        else:
            rows["flat"] = torch.zeros(n, dtype=torch.uint8, device=lp.device)
            rows["leader"] = torch.zeros(n, dtype=torch.uint8, device=lp.device)
    return loss, stats, rows
