"""The policy-loss family of grpo_loss (issue 22): every form x IS correction x aggregation on
every backend (C++, Triton under TRITON_INTERPRET=1, the torch reference) against the fp64
reference, values, gradients and statistics; low precision; multi-reward advantages (GDPO /
TRL normalize_then_sum); edge inputs; launch grids up to 2^20; torch.compile fullgraph.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import mtgrpo_core as mc
from mtgrpo_core.config import IS_CORRECTIONS, POLICY_LOSSES, TORCH_ONLY_POLICY_LOSSES, GRPOConfig
from mtgrpo_core.reference.grpo_loss import POLICY_LOSS_FNS, grpo_loss_ref

gl = importlib.import_module("mtgrpo_core.ops.grpo_loss")  # the module (the package exports the function)

BACKENDS = ["cpu", "triton", "torch"]
STATS = ["clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean", "approx_kl", "num_tokens",
         "is_ratio_mean", "is_clip_frac", "zero_adv_group_frac"]


def _case(seed=0, n=7, t=37, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    old = lp + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    roll = old + 0.2 * torch.randn(n, t, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) > 0.25
    mask[2] = False
    rewards = torch.randint(0, 3, (n,), generator=g).double() * 0.5
    gids = torch.tensor([0, 0, 1, 1, 1, 2, 2][:n]) * 5 - 2
    return lp, old, roll, mask, rewards, gids


def _cfgs():
    out = []
    for pl in POLICY_LOSSES:
        if pl in TORCH_ONLY_POLICY_LOSSES:
            continue
        for isc in (None, *IS_CORRECTIONS):
            if pl == "vespo" and isc is not None and isc.startswith("sequence"):
                continue
            kw = dict(policy_loss=pl, is_correction=isc)
            if isc is not None:
                kw.update(is_lo=0.85, is_hi=1.15)
            out.append(kw)
    return out


CFGS = _cfgs()


def test_registries_agree():
    assert set(POLICY_LOSS_FNS) == set(POLICY_LOSSES) == set(gl.KERNEL_FORMS) | set(TORCH_ONLY_POLICY_LOSSES)


@pytest.mark.parametrize("name", TORCH_ONLY_POLICY_LOSSES)
def test_torch_only_forms_run_on_torch_and_refuse_the_kernels(name):
    lp, old, roll, mask, rewards, gids = _case(9)
    kw = dict(policy_loss=name, clip_cov_ratio=0.2, clip_cov_lb=-1.0, kl_cov_ratio=0.2)
    torch.manual_seed(0)
    x0 = lp.clone().requires_grad_()
    l0, _ = grpo_loss_ref(x0, old, mask, rewards=rewards, group_ids=gids, config=GRPOConfig(**kw))
    l0.backward()
    torch.manual_seed(0)
    x1 = lp.clone().requires_grad_()
    l1, _ = mc.grpo_loss(x1, old, mask, rewards=rewards, group_ids=gids, **kw)  # auto -> torch
    l1.backward()
    torch.testing.assert_close(l1, l0.detach())
    torch.testing.assert_close(x1.grad, x0.grad)
    for be in ("cpu", "triton"):
        with pytest.raises(ValueError, match="backend"):
            mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, backend=be, **kw)


@pytest.mark.parametrize("agg", ["token-mean", "token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_form_and_correction_matches_the_fp64_reference(backend, agg):
    lp, old, roll, mask, rewards, gids = _case(BACKENDS.index(backend))
    fails = []
    # the Triton interpreter is slow: every form x correction once (token-mean), a third of them
    # with the other aggregations (the aggregation is the same code for every form)
    cfgs = CFGS if backend != "triton" or agg == "token-mean" else CFGS[::3]
    for i, kw in enumerate(cfgs):
        kw = dict(kw, loss_agg=agg, kl_coef=0.05 if i % 3 == 0 else 0.0, clip_eps_high=0.28)
        ref = lp + 0.1 if kw["kl_coef"] else None
        cfg = GRPOConfig(**kw)
        x0 = lp.clone().requires_grad_()
        l0, s0 = grpo_loss_ref(x0, old, mask, rewards=rewards, group_ids=gids, ref_logprobs=ref, config=cfg,
                               rollout_logprobs=roll)
        l0.backward()
        x1 = lp.float().requires_grad_()
        l1, s1 = mc.grpo_loss(x1, old.float(), mask, rewards=rewards.float(), group_ids=gids, backend=backend,
                              ref_logprobs=None if ref is None else ref.float(),
                              rollout_logprobs=roll.float() if kw["is_correction"] else None, **kw)
        l1.backward()
        try:
            torch.testing.assert_close(l1.double(), l0.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x1.grad.double(), x0.grad, rtol=1e-5, atol=1e-5)
            for f in STATS:
                torch.testing.assert_close(getattr(s1, f).double(), s0[f].double(), rtol=1e-5, atol=1e-5, msg=f)
            torch.testing.assert_close(s1.per_sequence_loss.double(), s0["per_sequence_loss"].double(), rtol=1e-5,
                                       atol=1e-5)
        except AssertionError as e:
            fails.append(f"{kw}: {str(e)[:300]}")
    assert not fails, "\n".join(fails)


def test_float64_cpu_path_matches_the_reference_to_1e10():
    """The C++ float64 path (the scalar instantiation of the same forms) against the reference."""
    lp, old, roll, mask, rewards, gids = _case(12)
    for kw in CFGS:
        kw = dict(kw, kl_coef=0.05)
        ref = lp + 0.1
        x0 = lp.clone().requires_grad_()
        l0, s0 = grpo_loss_ref(x0, old, mask, rewards=rewards, group_ids=gids, ref_logprobs=ref,
                               config=GRPOConfig(**kw), rollout_logprobs=roll)
        l0.backward()
        x1 = lp.clone().requires_grad_()
        l1, s1 = mc.grpo_loss(x1, old, mask, rewards=rewards, group_ids=gids, ref_logprobs=ref, backend="cpu",
                              rollout_logprobs=roll if kw["is_correction"] else None, **kw)
        l1.backward()
        torch.testing.assert_close(l1, l0.detach(), rtol=1e-10, atol=1e-10, msg=str(kw))
        torch.testing.assert_close(x1.grad, x0.grad, rtol=1e-10, atol=1e-10, msg=str(kw))
        for f in STATS:
            torch.testing.assert_close(getattr(s1, f), s0[f].to(getattr(s1, f).dtype), rtol=1e-10, atol=1e-10, msg=f)


@pytest.mark.parametrize("adv", ["rewards", "seq", "tok"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_ratio_with_token_is_weights(backend, adv):
    """GSPO's sequence ratio with token IS weights: each weight enters the row's one ratio
    gradient (folded into token advantages), for vanilla; cispo's ratio is a constant."""
    lp, old, roll, mask, rewards, gids = _case(8)
    g = torch.Generator().manual_seed(1)
    a = {"rewards": None, "seq": torch.randn(lp.shape[0], generator=g, dtype=torch.float64),
         "tok": torch.randn(lp.shape, generator=g, dtype=torch.float64)}[adv]
    fused = dict(rewards=rewards, group_ids=gids) if a is None else {}
    for pl in ("vanilla", "cispo"):
        if pl == "cispo" and adv == "tok":
            continue
        kw = dict(policy_loss=pl, importance_level="sequence", is_correction="token_mask", is_lo=0.85, is_hi=1.15,
                  seq_weights=torch.rand(lp.shape[0], generator=g, dtype=torch.float64) + 0.5)
        x0 = lp.clone().requires_grad_()
        cfg = GRPOConfig(**{k: v for k, v in kw.items() if k != "seq_weights"})
        l0, s0 = grpo_loss_ref(x0, old, mask, a, seq_weights=kw["seq_weights"], config=cfg, rollout_logprobs=roll,
                               **fused)
        l0.backward()
        x1 = lp.float().requires_grad_()
        f32 = {k: v.float() if v.is_floating_point() else v for k, v in fused.items()}
        l1, s1 = mc.grpo_loss(x1, old.float(), mask, None if a is None else a.float(), backend=backend,
                              rollout_logprobs=roll.float(), **dict(kw, seq_weights=kw["seq_weights"].float()), **f32)
        l1.backward()
        torch.testing.assert_close(l1.double(), l0.detach(), rtol=1e-5, atol=1e-5, msg=pl)
        torch.testing.assert_close(x1.grad.double(), x0.grad, rtol=1e-5, atol=1e-5, msg=pl)
        torch.testing.assert_close(s1.is_ratio_mean.double(), s0["is_ratio_mean"].double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s1.advantages.double(), s0["advantages"].double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_low_precision_forms(backend, dtype):
    """The kernel's error vs the fp64 gold is at most 2x the reference's on the same inputs (+1e-6;
    gradients: + one rounding step of the input dtype, eps * max|grad|)."""
    lp, old, roll, mask, rewards, gids = _case(3)
    lp, old, roll = (v.to(dtype).double() for v in (lp, old, roll))  # representable inputs
    for kw in CFGS[::2] if backend == "cpu" else CFGS[::5]:
        cfg = GRPOConfig(**kw)
        x0 = lp.clone().requires_grad_()
        l0, _ = grpo_loss_ref(x0, old, mask, rewards=rewards, group_ids=gids, config=cfg, rollout_logprobs=roll)
        l0.backward()
        xr = lp.to(dtype).requires_grad_()
        lr, _ = mc.grpo_loss(xr, old.to(dtype), mask, rewards=rewards, group_ids=gids, backend="torch",
                             rollout_logprobs=roll.to(dtype) if kw["is_correction"] else None, **kw)
        lr.backward()
        xk = lp.to(dtype).requires_grad_()
        lk, _ = mc.grpo_loss(xk, old.to(dtype), mask, rewards=rewards, group_ids=gids, backend=backend,
                             rollout_logprobs=roll.to(dtype) if kw["is_correction"] else None, **kw)
        lk.backward()
        lk, lr, l0 = float(lk.detach()), float(lr.detach()), float(l0.detach())
        assert abs(lk - l0) <= 2 * abs(lr - l0) + 1e-6, kw
        # gradients are rounded to the input dtype: allow one more rounding step (eps * max|g|)
        ek = (xk.grad.double() - x0.grad).abs().max()
        er = (xr.grad.double() - x0.grad).abs().max()
        ulp = torch.finfo(dtype).eps * float(x0.grad.abs().max())
        assert ek <= 2 * er + ulp + 1e-6, (kw, float(ek), float(er))


def test_form_values_by_hand():
    """One token, A = 1 and -1: each form's loss and d/dlogp from its formula."""
    x = torch.tensor([[-1.0], [-1.0]], dtype=torch.float64)
    old = torch.tensor([[-1.5], [-0.5]], dtype=torch.float64)  # ratios e^0.5, e^-0.5
    m = torch.ones(2, 1, dtype=torch.bool)
    a = torch.tensor([1.0, -1.0], dtype=torch.float64)
    r = torch.exp(x - old)[:, 0]
    lo, hi = 0.8, 1.28
    tau = torch.tensor([1.0, 1.05], dtype=torch.float64)  # tau_pos for A > 0, tau_neg else
    want = {
        "cispo": (-(r.clamp(lo, hi)) * a * x[:, 0], -(r.clamp(lo, hi)) * a),
        "sapo": (-torch.sigmoid(tau * (r - 1)) * 4 / tau * a, -a * 4 * torch.sigmoid(tau * (r - 1))
                 * (1 - torch.sigmoid(tau * (r - 1))) * r),
        "gpg": (-a * x[:, 0], -a),
        "vanilla": (torch.maximum(-a * r, -a * r.clamp(lo, hi)), None),
    }
    for name, (loss_w, grad_w) in want.items():
        xx = x.clone().requires_grad_()
        loss, _ = mc.grpo_loss(xx, old, m, a, policy_loss=name, loss_agg="token-sum", clip_eps_high=0.28,
                               backend="cpu")
        loss.backward()
        torch.testing.assert_close(loss, loss_w.sum(), rtol=1e-12, atol=1e-12, msg=name)
        if grad_w is not None:
            torch.testing.assert_close(xx.grad[:, 0], grad_w, rtol=1e-12, atol=1e-12, msg=name)


def test_validation_of_forms_and_corrections():
    lp, old, roll, mask, rewards, gids = _case()
    with pytest.raises(ValueError, match="policy_loss"):
        mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, policy_loss="nope")
    with pytest.raises(ValueError, match="rollout_logprobs"):
        mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, is_correction="token_mask", is_hi=2.0)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, rollout_logprobs=roll)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, is_correction="token_mask", is_hi=2.0,
                     rollout_logprobs=roll[:, :3])
    with pytest.raises(ValueError, match="is_hi"):
        mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, is_correction="token_truncate",
                     rollout_logprobs=roll)
    with pytest.raises(ValueError, match="is_lo"):
        mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, is_correction="token_mask", is_lo=2.0, is_hi=1.0,
                     rollout_logprobs=roll)
    with pytest.raises(ValueError, match="importance_level"):
        mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, policy_loss="sapo", importance_level="sequence")
    with pytest.raises(ValueError, match="advantages"):
        mc.grpo_loss(lp, old, mask, torch.ones_like(lp), policy_loss="geo_mean")
    with pytest.raises(ValueError, match="tau_pos"):
        mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, policy_loss="sapo", tau_pos=0.0)
    bad = roll.clone()
    bad[0, 0] = float("nan")
    mask0 = mask.clone()
    mask0[0, 0] = True
    with pytest.raises(ValueError, match="rollout_logprobs"):
        mc.grpo_loss(lp, old, mask0, rewards=rewards, group_ids=gids, is_correction="token_mask", is_hi=2.0,
                     rollout_logprobs=bad, backend="cpu")


def test_geo_mean_ignores_loss_agg_and_token_sum_is_the_masked_sum():
    lp, old, roll, mask, rewards, gids = _case(4)
    a = torch.randn(lp.shape[0], dtype=torch.float64)
    l1, _ = mc.grpo_loss(lp, old, mask, a, policy_loss="geo_mean", loss_agg="token-mean", backend="cpu")
    l2, _ = mc.grpo_loss(lp, old, mask, a, policy_loss="geo_mean", loss_agg="seq-mean-token-sum", backend="cpu")
    torch.testing.assert_close(l1, l2)
    lt, st = mc.grpo_loss(lp, old, mask, a, loss_agg="token-sum", backend="cpu")
    lm, _ = mc.grpo_loss(lp, old, mask, a, loss_agg="token-mean", backend="cpu")
    torch.testing.assert_close(lt, lm * st.num_tokens)


# --------------------------------------------------------------------------- several reward columns
def test_multi_reward_advantages_match_trl_normalize_then_sum():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(0)
    k, r = 4, 3
    rewards = torch.randn(6 * k, r, generator=g, dtype=torch.float64)
    rewards[:k, 1] = 0.5  # a flat column in one group
    weights = [1.0, 0.5, 2.0]
    gids = torch.arange(6 * k) // k
    # TRL 1.16 _generate_and_score_completions, multi_objective_aggregation == "normalize_then_sum"
    grouped = rewards.view(-1, k, r)
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = trl_utils.nanstd(grouped, dim=1, keepdim=True)
    reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, r)
    s = (reward_k * torch.tensor(weights, dtype=torch.float64)).nansum(dim=1)
    want = (s - torch.nanmean(s)) / (trl_utils.nanstd(s) + 1e-4)
    perm = torch.randperm(6 * k, generator=g)  # labels in any order
    for backend in BACKENDS:
        got = mc.group_advantages(rewards[perm], gids[perm], eps=1e-4, reward_weights=weights, backend=backend)
        torch.testing.assert_close(got, want[perm], rtol=1e-6, atol=1e-6, msg=backend)
    with pytest.raises(ValueError, match="reward_weights"):
        mc.group_advantages(rewards, gids, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="reward_weights"):
        mc.group_advantages(rewards[:, 0], gids, reward_weights=[1.0])
    with pytest.raises(ValueError, match="scale"):
        mc.group_advantages(rewards, gids, scale="batch")


# --------------------------------------------------------------------------- edge inputs
@pytest.mark.parametrize("scale", ["group", "batch"])
def test_huge_rewards_give_one_answer_on_every_backend(scale):
    """|r| ~ 1e38 overflows a float32 sum of squares: the statistics run in float64 everywhere."""
    r = torch.tensor([3e38, -3e38, 1e38, 2e38, -1e38, 0.0], dtype=torch.float32)
    gids = torch.tensor([0, 0, 1, 1, 2, 2])
    outs = {be: mc.group_advantages(r, gids, scale=scale, backend=be) for be in BACKENDS}
    for be, a in outs.items():
        assert bool(torch.isfinite(a).all()), (be, a)
        torch.testing.assert_close(a, outs["cpu"], rtol=1e-6, atol=1e-6, msg=be)
    if scale == "group":  # (3e38 - 0) / std([3e38, -3e38]) = 1 / sqrt(2)
        assert float(outs["cpu"][0]) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    lp = -torch.rand(6, 5)
    res = {}
    for be in BACKENDS:
        x = lp.clone().requires_grad_()
        loss, st = mc.grpo_loss(x, lp + 0.1, torch.ones(6, 5, dtype=torch.bool), rewards=r, group_ids=gids,
                                adv_scale=scale, backend=be)
        loss.backward()
        res[be] = (loss.detach(), x.grad, st.advantages)
    for be in BACKENDS:
        for a, b in zip(res[be], res["cpu"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=be)


def test_linear_logprobs_hidden_size_zero_is_a_clean_error():
    h, w, ids = torch.zeros(3, 0), torch.zeros(5, 0), torch.zeros(3, dtype=torch.long)
    for be in ("cpu", "torch"):
        with pytest.raises(ValueError, match="hidden"):
            mc.linear_logprobs(h, w, ids, backend=be)


# --------------------------------------------------------------------------- launch grids, compile
@pytest.mark.parametrize("n", [1, 7, 64, 4096, 1 << 20])
@pytest.mark.parametrize("t", [1, 1000, 32768, 65536, 1 << 20])
def test_grid_plan_up_to_2_20(n, t):
    """The 2-D grid (rows on axis 0, token chunks on axis 1) fits CUDA's limits (axis 0 < 2^31,
    axis 1 <= 65535) and the chunks cover each row exactly once, for N and T up to 2^20 (Liger's
    unchunked kernel fails at T >= 65,536); the flat upstream-scale grid too."""
    pytest.importorskip("triton")
    block_t, tiles, nchunk, warps = gl._grid_plan(n, t)
    assert n < 2**31 and 1 <= nchunk <= 65535
    span = tiles * block_t
    assert nchunk * span >= t and (nchunk - 1) * span < t
    assert block_t & (block_t - 1) == 0 and warps in (4, 8)
    assert (n * t + 4095) // 4096 < 2**31


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fullgraph_with_a_form_and_a_correction(backend):
    torch.manual_seed(0)
    lp, old, roll, mask, rewards, gids = _case(6, dtype=torch.float32)
    lp, old, roll = lp.float(), old.float(), roll.float()

    def step(x):
        loss, st = mc.grpo_loss(x, old, mask, rewards=rewards.float(), group_ids=gids, policy_loss="cispo",
                                is_correction="token_truncate", is_hi=1.2, rollout_logprobs=roll, backend=backend)
        return loss, st.is_ratio_mean

    explain = torch._dynamo.explain(step)(lp.clone().requires_grad_())
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xe, xc = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    le, se = step(xe)
    le.backward()
    lc, sc = compiled(xc)
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(sc, se)
    torch.testing.assert_close(xc.grad, xe.grad)
