"""Fused GRPO loss: reference -> backends (C++ and Triton under TRITON_INTERPRET=1) -> gradients.

Gold: the fp64 reference (itself gradchecked and checked against hand-computed values).
Tolerances: float32 kernels accumulate per row in fp32 with a ~1-ulp exp; against the fp64
gold their error is a few 1e-7 relative, so rtol = atol = 1e-5 leaves a 10x margin.
Low precision: the kernel's error vs the fp64 gold must be at most 2x the error of the
reference run on the same bf16/fp16 inputs, plus atol 1e-6 (both upcast to fp32).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtgrpo_core as mc
from mtgrpo_core.config import GRPOConfig
from mtgrpo_core.reference.grpo_loss import grpo_loss_ref

SCALAR_STATS = ["clip_frac_low", "clip_frac_high", "dual_clip_frac", "ratio_mean", "approx_kl", "ref_kl_mean",
                "zero_adv_group_frac", "num_tokens"]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
BACKENDS = ["cpu", "triton"]

CONFIGS = [
    dict(),
    dict(clip_eps_high=0.28, dual_clip=3.0, adv_scale="batch"),
    dict(ratio_cap=1.3, adv_singleton="raw", adv_clip=1.5),
    dict(kl_coef=0.1, kl_estimator="k3", adv_std="population"),
    dict(kl_coef=0.05, kl_estimator="k2", adv_scale="none"),
    dict(kl_coef=0.02, kl_estimator="k1", importance_level="sequence"),
    dict(importance_level="sequence", dual_clip=2.0, seq_count="all"),
    dict(norm_length=7.0, num_tokens=40),
]


def make_case(n, t, *, seed=0, spread=0.3, groups=None, dtype=torch.float64, empty_rows=(2,), ref=False):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(n, t, generator=g, dtype=torch.float64) * 2).to(dtype)
    old = (lp.double() + spread * torch.randn(n, t, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.rand(n, t, generator=g) > 0.25
    for r in empty_rows:
        if r < n:
            mask[r] = False
    if groups is None:
        groups = torch.randint(0, max(1, n // 3), (n,), generator=g) * 7 - 3  # any labels, unsorted
    rewards = torch.randint(0, 3, (n,), generator=g).double() * 0.5
    refl = (lp.double() + 0.2 * torch.randn(n, t, generator=g, dtype=torch.float64)).to(dtype) if ref else None
    return lp, old, mask, rewards, groups, refl


def run(backend, lp, old, mask, rewards, gids, ref, dtype, **kw):
    x = lp.detach().to(dtype).requires_grad_()
    loss, stats = mc.grpo_loss(x, None if old is None else old.to(dtype), mask, rewards=rewards.to(dtype),
                               group_ids=gids, ref_logprobs=None if ref is None else ref.to(dtype), backend=backend,
                               **kw)
    loss.backward()
    return loss.detach().double(), x.grad.double(), stats


def assert_close_all(got, gold, rtol=1e-5, atol=1e-5):
    (l1, g1, s1), (l0, g0, s0) = got, gold
    torch.testing.assert_close(l1, l0, rtol=rtol, atol=atol)
    torch.testing.assert_close(g1, g0, rtol=rtol, atol=atol)
    for f in SCALAR_STATS:
        torch.testing.assert_close(getattr(s1, f).double(), getattr(s0, f).double(), rtol=rtol, atol=atol, msg=f)
    torch.testing.assert_close(s1.per_sequence_loss.double(), s0.per_sequence_loss.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(s1.advantages.double(), s0.advantages.double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- reference
def test_reference_gradcheck_fp64():
    lp, old, mask, rewards, gids, ref = make_case(5, 6, ref=True)
    for kw in [dict(), dict(kl_coef=0.1, dual_clip=3.0, clip_eps_high=0.28), dict(importance_level="sequence")]:
        cfg = GRPOConfig(**kw, loss_agg="seq-mean-token-mean")
        def f(x, cfg=cfg):
            return grpo_loss_ref(x, old, mask, rewards=rewards, group_ids=gids, ref_logprobs=ref, config=cfg)[0]
        assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(),))


def test_hand_computed_each_aggregation():
    # Two sequences, one group: rewards 1 and 0 -> A = +-0.5/(std + eps), std = sqrt(0.5).
    lp = torch.tensor([[0.0, math.log(1.5), 0.0], [math.log(0.5), 0.0, 0.0]], dtype=torch.float64)
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    gids = torch.tensor([4, 4])
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    # ratios: row0 [1, 1.5 -> clipped to 1.2 for A > 0], row1 [0.5 (A < 0: max(0.5a, 0.8a) = 0.8a), 1, 1]
    row0 = [-a * 1.0, -a * 1.2]
    row1 = [a * 0.8, a * 1.0, a * 1.0]
    s0, s1 = sum(row0), sum(row1)
    expected = {
        "token-mean": (s0 + s1) / 5,
        "seq-mean-token-mean": (s0 / 2 + s1 / 3) / 2,
        "seq-mean-token-sum": (s0 + s1) / 2,
        "seq-mean-token-sum-norm": (s0 + s1) / (2 * 3),
    }
    for backend in ["torch", "cpu", "triton"]:
        for agg, want in expected.items():
            loss, stats = mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, loss_agg=agg, backend=backend)
            assert float(loss) == pytest.approx(want, rel=1e-6), (backend, agg)
            assert float(stats.clip_frac_high) == pytest.approx(1 / 5)
            assert float(stats.clip_frac_low) == pytest.approx(1 / 5)


def test_group_advantages_matches_verl_and_trl_conventions():
    r = torch.tensor([1.0, 0.0, 1.0, 0.5, 2.0, 2.0, 3.0], dtype=torch.float64)
    g = torch.tensor([10, 3, 10, 10, 7, 7, 99])  # unsorted labels, a zero-adv group and a singleton
    for backend in ["torch", "cpu"]:
        a = mc.group_advantages(r, g, backend=backend)
        grp = r[[0, 2, 3]]
        torch.testing.assert_close(a[[0, 2, 3]], (grp - grp.mean()) / (grp.std() + 1e-6))
        assert a[4] == 0 and a[5] == 0 and a[6] == 0 and a[1] == 0
        raw = mc.group_advantages(r, g, singleton="raw", backend=backend)  # verl: mean 0, std 1
        assert float(raw[6]) == pytest.approx(3.0 / (1 + 1e-6))
        b = mc.group_advantages(r, g, scale="batch", std="population", backend=backend)
        torch.testing.assert_close(b[[0, 2, 3]], (grp - grp.mean()) / (r.std(correction=0) + 1e-6))
        c = mc.group_advantages(r, g, scale="none", clip=0.2, backend=backend)
        torch.testing.assert_close(c[[0, 2, 3]], (grp - grp.mean()).clamp(-0.2, 0.2))


def test_zero_adv_group_exactly_zero_despite_rounding():
    r = torch.full((6,), 0.1, dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    for backend in ["torch", "cpu"]:
        assert torch.equal(mc.group_advantages(r, g, backend=backend), torch.zeros(6, dtype=torch.float64))


# --------------------------------------------------------------------------- backends vs reference
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_backends_match_reference(backend, agg):
    n, t = (9, 13) if backend == "triton" else (17, 45)
    lp, old, mask, rewards, gids, ref = make_case(n, t, ref=True)
    configs = CONFIGS if backend == "cpu" else CONFIGS[:1] + CONFIGS[3:4] + CONFIGS[5:6] + CONFIGS[1:2]
    for kw in configs:
        use_ref = ref if "kl_coef" in kw else None
        gold = run("torch", lp, old, mask, rewards, gids, use_ref, torch.float64, loss_agg=agg, **kw)
        for dtype in (torch.float64, torch.float32):
            got = run(backend, lp, old, mask, rewards, gids, use_ref, dtype, loss_agg=agg, **kw)
            assert_close_all(got, gold)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    # T = 1, one row, groups of size 1, every row masked, huge log-ratios (+-50: clamped).
    for n, t in [(1, 1), (3, 1), (1, 7), (4, 3)]:
        lp, old, mask, rewards, gids, _ = make_case(n, t, empty_rows=())
        for gids_case in (gids, torch.arange(n)):
            gold = run("torch", lp, old, mask, rewards, gids_case, None, torch.float64)
            assert_close_all(run(backend, lp, old, mask, rewards, gids_case, None, torch.float32), gold)
    lp, old, mask, rewards, gids, _ = make_case(4, 5)
    none = torch.zeros_like(mask)
    loss, stats = mc.grpo_loss(lp.clone().requires_grad_(), old, none, rewards=rewards, group_ids=gids, backend=backend)
    assert float(loss.detach()) == 0.0 and float(stats.num_tokens) == 0.0 and math.isfinite(float(stats.ratio_mean))
    wild = old + torch.tensor([50.0, -50.0]).repeat(4, 3)[:, :5]
    gold = run("torch", lp, wild, mask, rewards, gids, None, torch.float64, dual_clip=3.0)
    got = run(backend, lp, wild, mask, rewards, gids, None, torch.float32, dual_clip=3.0)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    assert_close_all(got, gold)


@pytest.mark.parametrize("backend", BACKENDS)
def test_given_advantages_token_level_seq_weights_and_noncontiguous(backend):
    lp, old, mask, rewards, gids, _ = make_case(6, 11)
    adv_seq = torch.randn(6, dtype=torch.float64)
    adv_tok = torch.randn(6, 11, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64) + 0.5
    big = torch.randn(6, 22, dtype=torch.float64)
    lp_nc = big[:, ::2]  # non-contiguous view
    assert not lp_nc.is_contiguous()
    for adv in (adv_seq, adv_tok):
        outs = []
        for be in ("torch", backend):
            x = lp_nc.detach().clone().requires_grad_() if be == "torch" else lp_nc.detach().requires_grad_()
            old_nc = old.t().contiguous().t()  # a transposed-layout view
            loss, s = mc.grpo_loss(x, old_nc, mask.t().contiguous().t(), adv, seq_weights=w,
                                   loss_agg="seq-mean-token-mean", backend=be)
            loss.backward()
            outs.append((loss.detach(), x.grad.clone(), s))
        assert_close_all(outs[1], outs[0])


def test_on_policy_old_none_ratio_one():
    lp, _, mask, rewards, gids, _ = make_case(8, 9)
    for backend in ("torch", "cpu"):
        loss, s = mc.grpo_loss(lp.clone().requires_grad_(), None, mask, rewards=rewards, group_ids=gids,
                               backend=backend)
        assert float(s.ratio_mean) == pytest.approx(1.0) and float(s.approx_kl) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_reference(backend, dtype):
    lp, old, mask, rewards, gids, _ = make_case(8, 33, spread=0.1)
    gold = run("torch", lp, old, mask, rewards, gids, None, torch.float64)
    ref_low = run("torch", lp, old, mask, rewards, gids, None, dtype)
    got = run(backend, lp, old, mask, rewards, gids, None, dtype)
    for i in (0, 1):
        err_ref = (ref_low[i] - gold[i]).abs().max().item()
        err_got = (got[i] - gold[i]).abs().max().item()
        assert err_got <= 2 * err_ref + 1e-6, (i, err_got, err_ref)
    assert got[1].dtype == torch.float64  # (run() upcasts); the raw grad has the input dtype:
    x = lp.to(dtype).requires_grad_()
    mc.grpo_loss(x, old.to(dtype), mask, rewards=rewards, group_ids=gids, backend=backend)[0].backward()
    assert x.grad.dtype == dtype


def test_long_sequence_no_grid_limit():
    # T = 131072 in one row: the kernels loop over token tiles (no grid dimension over T).
    t = 131072
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(2, t, generator=g)
    old = lp + 0.05 * torch.randn(2, t, generator=g)
    mask = torch.ones(2, t, dtype=torch.bool)
    rewards, gids = torch.tensor([1.0, 0.0]), torch.tensor([0, 0])
    gold = run("torch", lp.double(), old.double(), mask, rewards.double(), gids, None, torch.float64)
    for backend in BACKENDS:
        assert_close_all(run(backend, lp, old, mask, rewards, gids, None, torch.float32), gold)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 12), t=st.integers(1, 20), seed=st.integers(0, 10_000),
       spread=st.sampled_from([0.05, 0.5, 3.0]), agg=st.sampled_from(AGGS), cfg=st.sampled_from(CONFIGS),
       ngroups=st.integers(1, 6))
def test_hypothesis_cpu_matches_reference(n, t, seed, spread, agg, cfg, ngroups):
    g = torch.Generator().manual_seed(seed)
    gids = torch.randint(0, ngroups, (n,), generator=g) * 13
    lp, old, mask, rewards, _, ref = make_case(n, t, seed=seed, spread=spread, groups=gids, ref=True,
                                               empty_rows=(seed % (n + 1),))
    use_ref = ref if "kl_coef" in cfg else None
    kw = dict(cfg, loss_agg=agg)
    gold = run("torch", lp, old, mask, rewards, gids, use_ref, torch.float64, **kw)
    assert_close_all(run("cpu", lp, old, mask, rewards, gids, use_ref, torch.float32, **kw), gold)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 6), t=st.integers(1, 9), seed=st.integers(0, 10_000), agg=st.sampled_from(AGGS),
       cfg=st.sampled_from(CONFIGS))
def test_hypothesis_triton_matches_reference(n, t, seed, agg, cfg):
    lp, old, mask, rewards, gids, ref = make_case(n, t, seed=seed, ref=True)
    use_ref = ref if "kl_coef" in cfg else None
    gold = run("torch", lp, old, mask, rewards, gids, use_ref, torch.float64, loss_agg=agg, **cfg)
    assert_close_all(run("triton", lp, old, mask, rewards, gids, use_ref, torch.float32, loss_agg=agg, **cfg), gold)


# --------------------------------------------------------------------------- per-task statistics
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_per_task_statistics(backend):
    lp, old, mask, rewards, gids, _ = make_case(12, 8)
    gids = torch.arange(12) // 3
    task_ids = torch.tensor([0, 0, 0, 2, 2, 2, 0, 0, 0, 2, 2, 2])
    rewards[:3] = 1.0  # group 0 (task 0) is a zero-advantage group
    loss, s = mc.grpo_loss(lp.clone().requires_grad_(), old, mask, rewards=rewards, group_ids=gids,
                           task_ids=task_ids, num_tasks=4, backend=backend)
    per_seq = s.per_sequence_loss.double()
    for k in range(4):
        sel = task_ids == k
        assert float(s.task_loss_sum[k]) == pytest.approx(float(per_seq[sel].sum()), abs=1e-6)
        assert int(s.task_tokens[k]) == int(mask[sel].sum())
        assert int(s.task_num_sequences[k]) == int(sel.sum())
    flat = [bool((rewards[gids == g] == rewards[gids == g][0]).all()) for g in range(4)]
    assert float(s.task_zero_adv_frac[0]) == pytest.approx((flat[0] + flat[2]) / 2)
    assert float(s.task_zero_adv_frac[1]) == 0.0  # no groups: 0, not NaN


# --------------------------------------------------------------------------- module, compile, dispatch
def test_module_and_torch_compile_traces_custom_op():
    lp, old, mask, rewards, gids, _ = make_case(6, 10, dtype=torch.float32)
    crit = mc.GRPOLoss(clip_eps_high=0.28, loss_agg="seq-mean-token-mean", backend="cpu")
    x = lp.clone().requires_grad_()
    eager, _ = crit(x, old, mask, rewards=rewards.float(), group_ids=gids)
    eager.backward()
    g_eager = x.grad.clone()

    def f(x):
        loss, stats = crit(x, old, mask, rewards=rewards.float(), group_ids=gids)
        return loss

    compiled = torch.compile(f, backend="aot_eager")
    y = lp.clone().requires_grad_()
    out = compiled(y)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(y.grad, g_eager)


def test_dispatch_auto_and_explicit(monkeypatch):
    lp, old, mask, rewards, gids, _ = make_case(3, 4, dtype=torch.float32)
    from mtgrpo_core.ops._dispatch import resolve_backend

    assert resolve_backend("grpo_loss", "auto", torch.device("cpu")) == "cpu"
    monkeypatch.setenv("MTGRPO_BACKEND", "torch")
    assert resolve_backend("grpo_loss", "auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("MTGRPO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MTGRPO_BACKEND"):
        resolve_backend("grpo_loss", "auto", torch.device("cpu"))
    monkeypatch.delenv("MTGRPO_BACKEND")
    with pytest.raises(RuntimeError, match="cuda"):
        mc.task_masked_sum(torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, dtype=torch.long), 1,
                           backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        mc.grpo_loss(lp, old, mask, rewards=rewards, group_ids=gids, backend="triton")


# --------------------------------------------------------------------------- bad input
BAD = [
    (dict(logprobs=torch.zeros(3)), ValueError, "logprobs"),
    (dict(logprobs=torch.zeros(2, 3, dtype=torch.long)), TypeError, "logprobs"),
    (dict(logprobs=torch.zeros(0, 3)), ValueError, "logprobs"),
    (dict(old_logprobs=torch.zeros(2, 4)), ValueError, "old_logprobs"),
    (dict(mask=torch.ones(3, 3)), ValueError, "mask"),
    (dict(rewards=torch.tensor([1.0, float("nan")])), ValueError, "rewards"),
    (dict(rewards=torch.tensor([1.0, 0.0, 1.0])), ValueError, "rewards"),
    (dict(group_ids=torch.tensor([0, 1, 2])), ValueError, "group_ids"),
    (dict(group_ids=torch.tensor([0.0, 1.0])), TypeError, "group_ids"),
    (dict(group_ids=None), ValueError, "group_ids"),
    (dict(loss_agg="mean"), ValueError, "loss_agg"),
    (dict(kl_estimator="k4", kl_coef=0.1), ValueError, "kl_estimator"),
    (dict(clip_eps_low=1.5), ValueError, "clip_eps_low"),
    (dict(clip_eps_high=-0.1), ValueError, "clip_eps_high"),
    (dict(dual_clip=0.5), ValueError, "dual_clip"),
    (dict(ratio_cap=0.0), ValueError, "ratio_cap"),
    (dict(adv_scale="grp"), ValueError, "adv_scale"),
    (dict(kl_coef=0.1), ValueError, "ref_logprobs"),
    (dict(kl_coef=float("nan")), ValueError, "kl_coef"),
    (dict(seq_weights=torch.tensor([1.0, float("inf")])), ValueError, "seq_weights"),
    (dict(task_ids=torch.tensor([0, 5]), num_tasks=3), ValueError, "task_ids"),
    (dict(task_ids=torch.tensor([0, 1]), num_tasks=0), ValueError, "num_tasks"),
    (dict(importance_level="seq"), ValueError, "importance_level"),
    (dict(num_tokens=0), ValueError, "num_tokens"),
    (dict(num_tokens=1.5), TypeError, "num_tokens"),
    (dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("override,exc,name", BAD)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_input_names_the_argument(override, exc, name, backend):
    kw = dict(logprobs=torch.zeros(2, 3), old_logprobs=torch.zeros(2, 3), mask=torch.ones(2, 3, dtype=torch.bool),
              rewards=torch.tensor([1.0, 0.0]), group_ids=torch.tensor([0, 0]), backend=backend)
    kw.update(override)
    with pytest.raises(exc, match=name):
        mc.grpo_loss(kw.pop("logprobs"), kw.pop("old_logprobs"), kw.pop("mask"), **kw)


def test_advantages_and_rewards_both_rejected():
    with pytest.raises(ValueError, match="advantages"):
        mc.grpo_loss(torch.zeros(2, 3), None, torch.ones(2, 3), torch.zeros(2), rewards=torch.zeros(2),
                     group_ids=torch.zeros(2, dtype=torch.long))


def test_cpp_binding_bounds_checked_never_crashes():
    from mtgrpo_core import _native

    C = _native.native()
    def f32(*s):
        return np.zeros(s, dtype=np.float32)
    good = dict(logprobs=f32(2, 3), old_logprobs=f32(2, 3), mask=np.ones((2, 3), np.bool_), advantages=f32(2),
                rewards=None, group_ids=None, seq_weights=None, ref_logprobs=None, dtype="float32", grad=f32(2, 3),
                rowstats=np.zeros((2, C.GRPO_ROW_STATS)), adv_out=np.zeros(2), row_flat=np.zeros(2, np.uint8),
                row_leader=np.zeros(2, np.uint8))
    C.grpo_loss_fwd_bwd_cpu(**good)  # sanity: the good call works
    bad = [
        (dict(old_logprobs=f32(2, 4)), "old_logprobs"),
        (dict(mask=np.ones((3, 3), np.bool_)), "mask"),
        (dict(grad=f32(1, 3)), "grad"),
        (dict(rowstats=np.zeros((2, 4))), "rowstats"),
        (dict(advantages=f32(5)), "advantages"),
        (dict(advantages=None), "rewards"),
        (dict(advantages=None, rewards=np.array([1.0, np.nan]), group_ids=np.zeros(2, np.int64)), "rewards"),
        (dict(advantages=None, rewards=np.zeros(2), group_ids=np.zeros(3, np.int64)), "group_ids"),
        (dict(dtype="int8"), "dtype"),
        (dict(logprobs=np.zeros((2, 3))), "logprobs"),
        (dict(logprobs=f32(2, 6)[:, ::2]), "logprobs"),
        (dict(ref_logprobs=None, kl_estimator=3), "ref_logprobs"),
        (dict(eps_low=1.0), "clip_eps_low"),
        (dict(loss_agg=7), "loss_agg"),
        (dict(form=9), "form"),
        (dict(form=2, seq_level=True), "importance_level"),
        (dict(tau_pos=0.0), "tau_pos"),
        (dict(is_mode=3), "is_mode"),
        (dict(is_mode=1), "rollout_logprobs"),
        (dict(is_mode=1, rollout_logprobs=f32(2, 5)), "rollout_logprobs"),
        (dict(is_lo=2.0, is_hi=1.0), "is_hi"),
        (dict(row_coef=np.array([1.0, np.inf])), "row_coef"),
        (dict(is_row=np.zeros(3)), "is_row"),
    ]
    for override, name in bad:
        kw = dict(good)
        kw.update(override)
        with pytest.raises(ValueError, match=name):
            C.grpo_loss_fwd_bwd_cpu(**kw)


# --------------------------------------------------------------------------- every compiled ISA
_ISA_SCRIPT = """
import torch, mtgrpo_core as mc
from mtgrpo_core import _native
from mtgrpo_core.reference.grpo_loss import grpo_loss_ref
from mtgrpo_core.config import GRPOConfig
print(_native.native().grpo_loss_cpu_isa())
g = torch.Generator().manual_seed(3)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for kw in (dict(), dict(kl_coef=0.1, dual_clip=3.0, ratio_cap=1.5), dict(importance_level="sequence")):
        lp = (-torch.rand(7, 45, generator=g, dtype=torch.float64) * 2)
        old = lp + 0.3 * torch.randn(7, 45, generator=g, dtype=torch.float64)
        ref = lp + 0.2 * torch.randn(7, 45, generator=g, dtype=torch.float64)
        mask = torch.rand(7, 45, generator=g) > 0.2
        r, gid = torch.randint(0, 3, (7,), generator=g).double(), torch.tensor([0, 0, 1, 1, 1, 5, 5])
        lpq, oldq, refq = lp.to(dtype).double(), old.to(dtype).double(), ref.to(dtype).double()
        x0 = lpq.clone().requires_grad_()
        l0, _ = grpo_loss_ref(x0, oldq, mask, rewards=r, group_ids=gid, ref_logprobs=refq, config=GRPOConfig(**kw))
        l0.backward()
        x = lp.to(dtype).requires_grad_()
        l, _ = mc.grpo_loss(x, old.to(dtype), mask, rewards=r, group_ids=gid, ref_logprobs=ref.to(dtype),
                            backend="cpu", **kw)
        l.backward()
        assert abs(float(l.detach()) - float(l0.detach())) < 1e-5, (dtype, kw)
        tol = 1e-5 if dtype == torch.float32 else 4e-5  # fp32 math on the same rounded inputs
        err = float((x.grad.double() - x0.grad).abs().max())
        assert err < tol, (dtype, kw, err)
print("ok")
"""


@pytest.fixture(scope="module")
def capped_isa_runs():
    """One process per lower ISA version (the choice is made once per process, by
    MTGRPO_CPU_ISA): it runs _ISA_SCRIPT, then _BITS_SCRIPT with 1 and then 2 OpenMP threads
    (``torch.set_num_threads``, which is what the kernels read). isa -> its output lines."""
    import os
    import subprocess
    import sys

    runs = {}
    for isa in ("avx2", "baseline"):
        env = dict(os.environ, MTGRPO_CPU_ISA=isa)
        code = _ISA_SCRIPT + "\nfor threads in (1, 2):\n    torch.set_num_threads(threads)\n" + \
            "".join("    " + line + "\n" for line in _BITS_SCRIPT.strip().splitlines())
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        runs[isa] = (out.returncode, out.stdout.splitlines(), out.stderr[-3000:])
    return runs


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_each_cpu_isa_version_matches_reference(isa, capped_isa_runs):
    # The best version for this CPU runs everywhere else in this file; the lower ones only
    # run on older CPUs, so they are forced here (the choice is made once per process).
    rc, lines, err = capped_isa_runs[isa]
    assert rc == 0, err
    assert lines[1] == "ok"
    assert lines[0] in (isa, "baseline")  # a CPU without the ISA falls back to baseline


# --------------------------------------------------------------------------- issue 16 regressions
ALL_BACKENDS = ["torch", "cpu", "triton"]


def _grad_of(backend, lp, old, mask, dtype=torch.float64, **kw):
    x = lp.detach().to(dtype).requires_grad_()
    loss, stats = mc.grpo_loss(x, None if old is None else old.to(dtype), mask, backend=backend, **kw)
    loss.backward()
    return loss.detach().double(), x.grad.double(), stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [dict(), dict(dual_clip=2.0, ratio_cap=1.4, loss_agg="seq-mean-token-mean")])
def test_gspo_token_advantages_gradient_is_the_sequence_ratios(backend, extra):
    # issue 16 item 1: with [N, T] advantages every token's gradient is
    # w * r_seq * mean_s(m_s dldr_s), not its own dldr (the loss value agreed, the gradient not).
    lp, old, mask, _, _, _ = make_case(5, 37, spread=0.2)
    adv = torch.randn(5, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    kw = dict(importance_level="sequence", advantages=adv, **extra)
    gold = _grad_of("torch", lp, old, mask, **kw)
    for dtype in (torch.float64, torch.float32):
        got = _grad_of(backend, lp, old, mask, dtype, **kw)
        torch.testing.assert_close(got[0], gold[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], gold[1], rtol=1e-5, atol=1e-5)
    # the per-token gradient (the old, wrong one) differs from the gold by far more than the tolerance
    tok = _grad_of("torch", lp, old, mask, importance_level="token", advantages=adv, **extra)[1]
    assert (tok - gold[1]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_uint8_mask_values_above_one_count_once(backend):
    # issue 16 item 2: a uint8 mask holding 2..255 means "token", exactly like 1.
    lp, old, mask, rewards, gids, _ = make_case(6, 19)
    m1 = mask.to(torch.uint8)
    m7 = m1 * torch.randint(1, 255, m1.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for agg in AGGS:
        a = run(backend, lp, old, m1, rewards, gids, None, torch.float32, loss_agg=agg)
        b = run(backend, lp, old, m7, rewards, gids, None, torch.float32, loss_agg=agg)
        assert_close_all(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_at_masked_positions_never_reaches_loss_or_gradient(backend):
    # issue 16 item 5: masked positions may hold anything (the README's promise), NaN included.
    lp, old, mask, rewards, gids, ref = make_case(6, 21, ref=True)
    dirty = [t.clone() for t in (lp, old, ref)]
    for t in dirty:
        t[~mask] = float("nan")
    for kw in (dict(), dict(kl_coef=0.1, kl_estimator="k3"), dict(importance_level="sequence")):
        clean = run(backend, lp, old, mask, rewards, gids, ref if kw else None, torch.float32, **kw)
        got = run(backend, dirty[0], dirty[1], mask, rewards, gids, dirty[2] if kw else None, torch.float32, **kw)
        assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all(), (backend, kw)
        assert_close_all(got, clean, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["logprobs", "old_logprobs", "ref_logprobs"])
def test_nan_at_unmasked_position_raises_value_error(backend, where):
    # issue 16 item 5: every backend refuses (cpu did; torch and triton returned a NaN loss).
    lp, old, mask, rewards, gids, ref = make_case(4, 9, ref=True, empty_rows=())
    mask[1, 3] = True
    t = {"logprobs": lp, "old_logprobs": old, "ref_logprobs": ref}[where].clone()
    t[1, 3] = float("nan")
    args = {"logprobs": lp, "old_logprobs": old, "ref_logprobs": ref, where: t}
    with pytest.raises(ValueError, match="unmasked"):
        mc.grpo_loss(args["logprobs"].float().requires_grad_(), args["old_logprobs"].float(), mask, rewards=rewards,
                     group_ids=gids, ref_logprobs=args["ref_logprobs"].float(), kl_coef=0.1, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float64_rewards_with_task_ids(backend):
    # issue 16 item 5: float64 rewards + float32 log-probs + task_ids raised a bare RuntimeError
    # from index_add_ on torch.
    lp, old, mask, rewards, gids, _ = make_case(9, 7, dtype=torch.float32)
    tids = torch.arange(9) % 3
    loss, s = mc.grpo_loss(lp.requires_grad_(), old, mask, rewards=rewards.double(), group_ids=gids, task_ids=tids,
                           num_tasks=3, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and s.task_loss_sum.shape == (3,)
    torch.testing.assert_close(s.task_loss_sum.double().sum(), s.per_sequence_loss.double().sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_meta_tensors_give_output_shapes(fused):
    # issue 16 item 6: meta tensors raised "Tensor.item() cannot be called on meta tensors".
    n, t = 5, 11
    lp = torch.empty(n, t, device="meta", requires_grad=True)
    mask = torch.empty(n, t, dtype=torch.bool, device="meta")
    kw = (dict(rewards=torch.empty(n, device="meta"), group_ids=torch.empty(n, dtype=torch.long, device="meta"))
          if fused else dict(advantages=torch.empty(n, t, device="meta")))
    loss, s = mc.grpo_loss(lp, lp.detach(), mask, task_ids=None, **kw)
    assert loss.shape == () and loss.device.type == "meta"
    assert s.per_sequence_loss.shape == (n,) and s.advantages.shape == ((n,) if fused else (n, t))
    loss.backward()
    assert lp.grad.shape == (n, t) and lp.grad.device.type == "meta"
    adv = mc.group_advantages(torch.empty(n, device="meta"), torch.empty(n, dtype=torch.long, device="meta"))
    assert adv.shape == (n,) and adv.dtype == torch.float32


# --------------------------------------------------------------------------- the op template
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("fused", [True, False])
def test_fullgraph_training_step_has_no_graph_break(backend, fused):
    torch.manual_seed(0)
    n, t, h, v = 6, 9, 8, 11
    hid = torch.randn(n, t, h)
    tokens = torch.randint(0, v, (n, t))
    mask = torch.rand(n, t) > 0.2
    old = -torch.rand(n, t)
    rewards, gids = torch.randint(0, 2, (n,)).float(), torch.arange(n) // 3
    adv = torch.randn(n)
    crit = mc.GRPOLoss(clip_eps_high=0.28, loss_agg="seq-mean-token-mean", backend=backend)

    def step(w):
        logp = torch.log_softmax(hid @ w, -1).gather(-1, tokens[..., None])[..., 0]
        if fused:
            loss, stats = crit(logp, old, mask, rewards=rewards, group_ids=gids)
        else:
            loss, stats = mc.grpo_loss(logp, old, mask, adv, clip_eps_high=0.28, loss_agg="seq-mean-token-mean",
                                       backend=backend)
        return loss, stats.clip_frac_high

    w0 = torch.randn(h, v) * 0.1
    explain = torch._dynamo.explain(step)(w0.clone().requires_grad_())
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    we, wc = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    le, fe = step(we)
    le.backward()
    lc, fc = compiled(wc)
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(fc, fe)
    torch.testing.assert_close(wc.grad, we.grad)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_upstream_gradient_scale_and_retained_graph(backend):
    # The forward writes dL/dlogp; backward returns it as is for an upstream 1, scales it otherwise,
    # and a retained graph's later backward never changes a gradient returned earlier.
    lp, old, mask, rewards, gids, _ = make_case(5, 13, dtype=torch.float32)
    x = lp.clone().requires_grad_()
    loss, _ = mc.grpo_loss(x, old, mask, rewards=rewards.float(), group_ids=gids, backend=backend)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(3.0 * loss, x, retain_graph=True)
    g1_copy = g1.clone()
    (g2,) = torch.autograd.grad(-2.0 * loss, x, retain_graph=True)
    torch.testing.assert_close(g3, 3.0 * g1_copy)
    torch.testing.assert_close(g2, -2.0 * g1_copy)
    assert torch.equal(g1, g1_copy)
    y = lp.clone().requires_grad_()
    l2, _ = mc.grpo_loss(y, old, mask, rewards=rewards.float(), group_ids=gids, backend=backend)
    (0.5 * l2).backward(retain_graph=True)
    torch.testing.assert_close(y.grad, 0.5 * g1_copy)
    l2.backward()
    torch.testing.assert_close(y.grad, 1.5 * g1_copy)


def test_group_advantages_triton_matches_reference():
    r = torch.tensor([1.0, 0.0, 1.0, 0.5, 2.0, 2.0, 3.0])
    g = torch.tensor([10, 3, 10, 10, 7, 7, 99])
    for kw in (dict(), dict(scale="batch", std="population"), dict(scale="none", clip=0.2), dict(singleton="raw")):
        want = mc.group_advantages(r.double(), g, backend="torch", **kw)
        got = mc.group_advantages(r, g, backend="triton", **kw)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_triton_grid_spans_chunks_of_long_rows():
    # N = 2, T = 5000: the 2-D grid cuts each row into 5 chunks of 1024 tokens; the per-chunk
    # partial statistics must fold into the same row statistics as one pass (fp64 gold).
    from mtgrpo_core.ops.grpo_loss import _grid_plan

    assert _grid_plan(2, 5000)[2] == 5 and _grid_plan(64, 32768)[2] == 8 and _grid_plan(512, 2048)[2] == 1
    lp, old, mask, rewards, gids, ref = make_case(2, 5000, ref=True, empty_rows=())
    gids = torch.tensor([0, 0])
    for kw in (dict(kl_coef=0.1), dict(importance_level="sequence", loss_agg="seq-mean-token-mean")):
        use_ref = ref if "kl_coef" in kw else None
        gold = run("torch", lp, old, mask, rewards, gids, use_ref, torch.float64, **kw)
        assert_close_all(run("triton", lp, old, mask, rewards, gids, use_ref, torch.float32, **kw), gold)


_BITS_SCRIPT = """
import hashlib, torch, mtgrpo_core as mc
g = torch.Generator().manual_seed(3)
out = []
for dtype in (torch.float32, torch.bfloat16):
    for kw in (dict(kl_coef=0.1), dict(importance_level="sequence"), dict(importance_level="sequence", dual_clip=2.0)):
        n, t = 5, 20000  # rows of 3 spans of 8192 tokens: the span split is part of the check
        lp = (-torch.rand(n, t, generator=g)).to(dtype)
        old = (lp.float() + 0.1 * torch.randn(n, t, generator=g)).to(dtype)
        ref = (lp.float() + 0.1 * torch.randn(n, t, generator=g)).to(dtype)
        mask = torch.rand(n, t, generator=g) > 0.2
        adv = torch.randn(n, t, generator=g)
        x = lp.clone().requires_grad_()
        l, s = mc.grpo_loss(x, old, mask, adv, ref_logprobs=ref, backend="cpu", **kw)
        l.backward()
        out.append(hashlib.md5(x.grad.float().numpy().tobytes() + l.detach().double().numpy().tobytes()
                               + s.ratio_mean.double().numpy().tobytes()).hexdigest())
print(" ".join(out))
"""


def test_cpu_bits_identical_across_isa_versions_and_thread_counts(capped_isa_runs):
    # Every compiled ISA version and any OpenMP thread count give the same bits (token level,
    # KL, GSPO with token advantages, bf16): fixed span plan, fixed fold order, no FMA contraction.
    import contextlib
    import io

    outs = set()
    for rc, lines, err in capped_isa_runs.values():  # avx2 and baseline, 1 and 2 threads each
        assert rc == 0, err
        assert len(lines) == 4
        outs.update(lines[2:])
    here = io.StringIO()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):  # this process: the best version the CPU has
            torch.set_num_threads(n)
            with contextlib.redirect_stdout(here):
                exec(_BITS_SCRIPT, {})
    finally:
        torch.set_num_threads(threads)
    outs.update(here.getvalue().splitlines())
    assert len(outs) == 1, outs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_gradient_is_the_fp32_gradient_rounded_once(dtype):
    # The C++ kernel writes bf16 / fp16 gradients itself (one pass, no fp32 [N, T] + cast):
    # they must be exactly the fp32 kernel's gradient on the same (upcast) inputs, rounded to
    # nearest even -- normal and fp16-subnormal magnitudes alike (advantages over 1e-9 .. 1e2).
    g = torch.Generator().manual_seed(5)
    n, t = 7, 301
    lp = (-torch.rand(n, t, generator=g)).to(dtype)
    old = (lp.float() + 0.2 * torch.randn(n, t, generator=g)).to(dtype)
    mask = torch.rand(n, t, generator=g) > 0.1
    adv = torch.randn(n, t, generator=g) * 10.0 ** torch.randint(-9, 3, (n, t), generator=g).float()
    for kw in (dict(), dict(importance_level="sequence"), dict(loss_agg="seq-mean-token-sum", dual_clip=2.0)):
        x = lp.clone().requires_grad_()
        mc.grpo_loss(x, old, mask, adv, backend="cpu", **kw)[0].backward()
        x32 = lp.float().requires_grad_()
        mc.grpo_loss(x32, old.float(), mask, adv, backend="cpu", **kw)[0].backward()
        assert x.grad.dtype == dtype
        assert torch.equal(x.grad, x32.grad.to(dtype)), (kw, (x.grad.float() - x32.grad.to(dtype).float()).abs().max())
        if dtype == torch.float16:
            tiny = x.grad[(x.grad != 0) & (x.grad.abs() < 6.1e-5)]
            assert tiny.numel() > 0  # subnormal halves were exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_upstream_scale_kernel(dtype):
    # The CUDA backward scales the saved gradient in place with the "== 1" test on the device:
    # upstream 1 leaves every bit unchanged, anything else multiplies in fp32 and rounds once.
    import sys

    G = sys.modules["mtgrpo_core.ops.grpo_loss"]
    g0 = torch.randn(3, 5000, generator=torch.Generator().manual_seed(2)).to(dtype)
    g = g0.clone()
    G._scale_grad_(g, torch.tensor(1.0))
    assert torch.equal(g, g0)
    G._scale_grad_(g, torch.tensor(-0.37))
    want = g0.float() * -0.37
    if dtype == torch.float32:
        assert torch.equal(g, want)
    else:  # one rounding to bf16: within one bf16 ulp (2^-7 relative). On a GPU it is round-to-
        # nearest-even; Triton's numpy interpreter truncates fp32 -> bf16, so the bound is one ulp.
        assert ((g.float() - want).abs() <= want.abs() * 2.0**-7).all()
        assert ((g.float() - want).abs() > 0).any()  # it was scaled and rounded, not left alone
