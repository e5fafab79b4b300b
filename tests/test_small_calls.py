"""Small calls (issue 25 item 3): the eager fast paths give what the custom ops give, and check
everything the ops check.

A plain eager CPU call of ``grpo_loss`` / ``task_masked_sum`` runs the op's implementation
directly (``ops/_dispatch.py::eager_direct`` / ``eager_plain``) and builds ``GRPOStats`` on first
access. The op path is forced here by a pass-through ``TorchFunctionMode`` (a mode is active,
so the fast path steps aside; every torch call still does what it does without the mode).
Speed is measured in ``bench/bench_small_calls.py``, not here.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import pickle

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import mtgrpo_core as mc
from mtgrpo_core import _native
from mtgrpo_core.ops._dispatch import eager_direct, eager_plain

gl = importlib.import_module("mtgrpo_core.ops.grpo_loss")  # the module (mtgrpo_core.ops.grpo_loss is the function)

pytestmark = pytest.mark.skipif(not _native.available(), reason="the C++ extension is not built (make build)")


class PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassThroughDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def case(n=6, t=9, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (-torch.rand(n, t, generator=g, dtype=torch.float64) * 2).to(dtype)
    old = (lp.double() + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)).to(dtype)
    ref = (lp.double() + 0.2 * torch.randn(n, t, generator=g, dtype=torch.float64)).to(dtype)
    roll = (old.double() + 0.1 * torch.randn(n, t, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.rand(n, t, generator=g) > 0.25
    mask[2] = False
    rewards = torch.randint(0, 3, (n,), generator=g).float()
    gids = torch.arange(n) // 3
    adv = torch.randn(n, generator=g)
    return dict(lp=lp, old=old, ref=ref, roll=roll, mask=mask, rewards=rewards, gids=gids, adv=adv,
                adv_tok=torch.randn(n, t, generator=g), sw=torch.rand(n, generator=g) + 0.5,
                tids=torch.tensor([0, 1, 2, 0, 1, 2])[:n])


VARIANTS = {
    "fused": lambda c: dict(rewards=c["rewards"], group_ids=c["gids"]),
    "fused-int-rewards-uint8-mask": lambda c: dict(rewards=c["rewards"].long(), group_ids=c["gids"].int(),
                                                   mask=c["mask"].to(torch.uint8)),
    "fused-float-mask-on-policy": lambda c: dict(rewards=c["rewards"].double(), group_ids=c["gids"],
                                                 mask=c["mask"].float(), old=None),
    "adv[N]": lambda c: dict(advantages=c["adv"]),
    "adv[N]-labels-ignored": lambda c: dict(advantages=c["adv"], group_ids=c["gids"]),
    "adv[N,T]-seq-weights": lambda c: dict(advantages=c["adv_tok"], seq_weights=c["sw"]),
    "fused-kl-dual-cap": lambda c: dict(rewards=c["rewards"], group_ids=c["gids"], ref_logprobs=c["ref"],
                                        kl_coef=0.1, dual_clip=3.0, ratio_cap=1.5),
    "gspo-seq-mean": lambda c: dict(advantages=c["adv"], importance_level="sequence",
                                    loss_agg="seq-mean-token-mean"),
    "token-is": lambda c: dict(rewards=c["rewards"], group_ids=c["gids"], rollout_logprobs=c["roll"],
                               is_correction="token_truncate", is_hi=2.0),
    "vespo-seq-is": lambda c: dict(advantages=c["adv"], policy_loss="vespo", rollout_logprobs=c["roll"],
                                   is_correction="token_mask", is_hi=2.0),
    "geo-mean-fused-seq-weights": lambda c: dict(rewards=c["rewards"], group_ids=c["gids"], seq_weights=c["sw"],
                                                 policy_loss="geo_mean"),
    "gspo-token-is": lambda c: dict(advantages=c["adv"], importance_level="sequence", rollout_logprobs=c["roll"],
                                    is_correction="token_truncate", is_hi=2.0),
    "tasks": lambda c: dict(rewards=c["rewards"], group_ids=c["gids"], task_ids=c["tids"], num_tasks=3),
    "config-object": lambda c: dict(advantages=c["adv"], config=mc.GRPOConfig(clip_eps_high=0.28,
                                                                              loss_agg="token-sum")),
}


def call(c, dtype, grad, upstream=1.0, **kw):
    kw = dict(kw)
    mask = kw.pop("mask", c["mask"])
    old = kw.pop("old", c["old"])
    x = c["lp"].to(dtype, copy=True).requires_grad_(grad)
    conv = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k.endswith("logprobs")
                else v) for k, v in kw.items()}
    loss, stats = mc.grpo_loss(x, None if old is None else old.to(dtype), mask, backend="cpu", **conv)
    g = None
    if grad:
        (g,) = torch.autograd.grad(loss * upstream if upstream != 1.0 else loss, x)
    return loss, g, stats


def assert_same_stats(a, b):
    for f in dataclasses.fields(mc.GRPOStats):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if vb is None:
            assert va is None, f.name
            continue
        assert type(va) is type(vb), f.name
        assert va.dtype == vb.dtype and va.device == vb.device and va.shape == vb.shape, f.name
        assert torch.equal(va, vb), (f.name, va, vb)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [False, True])
def test_fast_path_gives_the_op_path_bits(variant, dtype, grad):
    c = case()
    kw = VARIANTS[variant](c)
    fast = call(c, dtype, grad, **kw)
    with PassThrough():
        op = call(c, dtype, grad, **kw)
    assert fast[0].dtype == op[0].dtype and fast[0].shape == op[0].shape == ()
    assert torch.equal(fast[0], op[0])
    assert fast[0].requires_grad == op[0].requires_grad == grad
    if grad:
        assert fast[1].dtype == op[1].dtype == dtype
        assert torch.equal(fast[1], op[1])
    assert_same_stats(fast[2], op[2])


def test_fast_path_is_taken_and_op_path_is_not():
    c = case()
    loss, _, stats = call(c, torch.float32, True, rewards=c["rewards"], group_ids=c["gids"])
    assert type(loss.grad_fn).__name__.startswith("_EagerGRPOLoss")
    assert "_pending" in stats.__dict__  # built on first access
    with PassThrough():
        loss, _, stats = call(c, torch.float32, True, rewards=c["rewards"], group_ids=c["gids"])
    assert not type(loss.grad_fn).__name__.startswith("_EagerGRPOLoss")
    assert "_pending" not in stats.__dict__
    x = c["lp"].detach().clone()
    assert eager_direct(x, None) and eager_plain(x)
    assert not eager_plain(x.requires_grad_()) and eager_direct(x)
    with PassThrough():
        assert not eager_direct(x) and not eager_plain(c["lp"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upstream_scale_and_retained_graph_on_the_fast_path(dtype):
    # the op's backward rules (_backward): an upstream 1 returns the saved gradient, another
    # scale multiplies, a retained graph's later backward never changes an earlier result
    c = case()
    x = c["lp"].to(dtype).requires_grad_()
    loss, _ = mc.grpo_loss(x, c["old"].to(dtype), c["mask"], rewards=c["rewards"], group_ids=c["gids"])
    assert type(loss.grad_fn).__name__.startswith("_EagerGRPOLoss")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1c = g1.clone()
    (g3,) = torch.autograd.grad(3.0 * loss, x, retain_graph=True)
    (gm,) = torch.autograd.grad(-0.5 * loss, x)
    assert torch.equal(g1, g1c)
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g3.float(), 3.0 * g1c.float(), **tol)
    torch.testing.assert_close(gm.float(), -0.5 * g1c.float(), **tol)
    with PassThrough():  # the same numbers through the op
        y = c["lp"].to(dtype).requires_grad_()
        l2, _ = mc.grpo_loss(y, c["old"].to(dtype), c["mask"], rewards=c["rewards"], group_ids=c["gids"])
        (h3,) = torch.autograd.grad(3.0 * l2, y)
    assert torch.equal(g3, h3)
    # .backward() accumulates into .grad like any leaf
    loss2, _ = mc.grpo_loss(x, c["old"].to(dtype), c["mask"], rewards=c["rewards"], group_ids=c["gids"])
    loss2.backward()
    loss2, _ = mc.grpo_loss(x, c["old"].to(dtype), c["mask"], rewards=c["rewards"], group_ids=c["gids"])
    loss2.backward()
    torch.testing.assert_close(x.grad.float(), 2 * g1c.float(), **tol)


def _nan_at(t, idx):
    t = t.clone()
    t[idx] = float("nan")
    return t


def bad_calls(c):
    """(kwargs, exception, argument named) of calls every path must refuse."""
    r, g = c["rewards"], c["gids"]
    return [
        (dict(rewards=_nan_at(r, 1), group_ids=g), ValueError, "rewards"),
        (dict(rewards=_nan_at(r.double(), 0), group_ids=g), ValueError, "rewards"),
        (dict(advantages=_nan_at(c["adv"], 3)), ValueError, "advantages"),
        (dict(advantages=_nan_at(c["adv_tok"], (1, 2))), ValueError, "advantages"),
        (dict(advantages=c["adv"].clone().fill_(float("inf"))), ValueError, "advantages"),
        (dict(rewards=r, group_ids=g, seq_weights=_nan_at(c["sw"], 0)), ValueError, "seq_weights"),
        (dict(advantages=c["adv"], seq_weights=_nan_at(c["sw"], 2)), ValueError, "seq_weights"),
        (dict(advantages=c["adv"], policy_loss="geo_mean", seq_weights=_nan_at(c["sw"], 2)), ValueError,
         "seq_weights"),
        (dict(rewards=r, group_ids=g, lp=_nan_at(c["lp"], (0, 0))), ValueError, "unmasked"),
        (dict(rewards=r, group_ids=g, old=_nan_at(c["old"], (1, 1))), ValueError, "unmasked"),
        (dict(rewards=r, group_ids=g, ref_logprobs=_nan_at(c["ref"], (0, 1)), kl_coef=0.1), ValueError, "unmasked"),
        (dict(rewards=r, group_ids=g, lp=c["lp"].int()), TypeError, "logprobs"),
        (dict(rewards=r, group_ids=g, old=c["old"][:, :4]), ValueError, "old_logprobs"),
        (dict(rewards=r, group_ids=g, mask=c["mask"][:3]), ValueError, "mask"),
        (dict(rewards=r[:4], group_ids=g), ValueError, "rewards"),
        (dict(rewards=r, group_ids=g.float()), TypeError, "group_ids"),
        (dict(advantages=c["adv"].int()), TypeError, "advantages"),
        (dict(advantages=c["adv"][:2]), ValueError, "advantages"),
        (dict(rewards=r, group_ids=g, task_ids=c["tids"] + 5, num_tasks=3), ValueError, "task_ids"),
        (dict(rewards=r, group_ids=g, clip_eps_high=True), TypeError, "clip_eps_high"),
        (dict(rewards=r, group_ids=g, clip_eps_low=[0.2]), TypeError, "clip_eps_low"),
        (dict(rewards=r, group_ids=g, loss_agg=["token-mean"]), ValueError, "loss_agg"),
        (dict(rewards=r, group_ids=g, kl_coef=float("nan")), ValueError, "kl_coef"),
        (dict(rewards=r, group_ids=g, is_correction="token_mask"), ValueError, "rollout_logprobs"),
        (dict(rewards=r, group_ids=g, rollout_logprobs=_nan_at(c["roll"], (0, 0)), is_correction="token_mask",
              is_hi=2.0), ValueError, "rollout_logprobs"),
    ]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("path", ["fast", "op"])
def test_every_check_fires_on_both_paths(grad, path):
    c = case()
    c["mask"][0, 0] = c["mask"][1, 1] = c["mask"][0, 1] = True
    # values accepted first, so the keyword configuration cache holds the valid neighbours
    mc.grpo_loss(c["lp"], c["old"], c["mask"], rewards=c["rewards"], group_ids=c["gids"], clip_eps_high=1.0)
    mc.grpo_loss(c["lp"], c["old"], c["mask"], rewards=c["rewards"], group_ids=c["gids"], clip_eps_low=0.2)
    for kw, exc, name in bad_calls(c):
        kw = dict(kw)
        lp = kw.pop("lp", c["lp"])
        lp = lp.clone().requires_grad_(grad and lp.is_floating_point())
        old, mask = kw.pop("old", c["old"]), kw.pop("mask", c["mask"])
        with pytest.raises(exc, match=name):
            if path == "op":
                with PassThrough():
                    mc.grpo_loss(lp, old, mask, backend="cpu", **kw)
            else:
                mc.grpo_loss(lp, old, mask, backend="cpu", **kw)


def test_plain_call_check_accepts_only_what_the_full_checks_accept():
    """``_plain_call_valid`` (one pass of attribute reads) may say True only where the
    per-argument checks (``_validate_args``) pass, over shapes, dtypes, devices and tensor subclasses."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int64,
              torch.int32, torch.uint8, torch.bool, torch.complex64]
    n, t = 3, 5

    def tensors(shape):
        out = [None, 1.0, torch.nn.Parameter(torch.zeros(shape)), torch.zeros(shape, device="meta")]
        out += [torch.zeros(shape).to(d) for d in dtypes]
        return out

    cfg = gl.GRPOConfig()
    seen_true = seen_false = 0
    lps = [torch.zeros(n, t).to(d) for d in dtypes[:5]] + [torch.zeros(0, t), torch.zeros(n), torch.zeros(n, t, 1)]
    masks = [torch.ones(n, t, dtype=torch.bool), torch.ones(n, t - 1, dtype=torch.bool), torch.ones(n, t).cfloat()]
    for lp in lps:
        for mask in masks:
            for old in [None, torch.zeros(n, t), torch.zeros(n, t).int(), torch.zeros(n, t + 1)]:
                for adv in [None] + tensors((n,)) + [torch.zeros(n, t), torch.zeros(n + 1)]:
                    for rw, gid in ([(None, None)] if adv is not None else
                                    [(r, g) for r in tensors((n,)) + [torch.zeros(n - 1)] for g in tensors((n,))]):
                        fast = gl._plain_call_valid(lp, old, mask, adv, rw, gid)
                        try:
                            gl._validate_args(lp, old, mask, adv, rw, gid, None, None, None, None, cfg)
                            full = True
                        except (TypeError, ValueError):
                            full = False
                        assert not fast or full, (lp.dtype, lp.shape, mask.shape, old, adv, rw, gid)
                        seen_true += fast
                        seen_false += not fast
    assert seen_true > 100 and seen_false > 1000  # both answers were exercised


def test_nan_at_masked_positions_is_fine_on_the_fast_path():
    c = case()
    lp = c["lp"].clone()
    lp[~c["mask"]] = float("nan")
    adv = c["adv_tok"].clone()
    loss, stats = mc.grpo_loss(lp, c["old"], c["mask"], rewards=c["rewards"], group_ids=c["gids"])
    assert torch.isfinite(loss) and torch.isfinite(stats.ratio_mean)
    loss, _ = mc.grpo_loss(lp.requires_grad_(), c["old"], c["mask"], adv)
    assert torch.isfinite(loss)


def test_lazy_stats_behave_like_a_dataclass():
    c = case()
    _, eager = mc.grpo_loss(c["lp"], c["old"], c["mask"], rewards=c["rewards"], group_ids=c["gids"],
                            task_ids=c["tids"], num_tasks=3)  # task statistics: built eagerly
    assert "_pending" not in eager.__dict__

    def lazy():
        _, s = mc.grpo_loss(c["lp"], c["old"], c["mask"], rewards=c["rewards"], group_ids=c["gids"])
        assert "_pending" in s.__dict__
        return s

    s = lazy()
    assert isinstance(s, mc.GRPOStats) and type(s) is mc.GRPOStats
    assert s.task_loss_sum is None and s.task_tokens is None
    assert s.is_ratio_mean.dtype == torch.float32 and float(s.is_ratio_mean) == 1.0
    assert float(s.is_clip_frac) == 0.0
    assert "_pending" not in s.__dict__
    for f in ("advantages", "per_sequence_loss", "clip_frac_low", "num_tokens"):
        assert torch.equal(getattr(s, f), getattr(eager, f))
    assert lazy().scalars() == s.scalars()
    assert set(dataclasses.asdict(lazy())) == {f.name for f in dataclasses.fields(mc.GRPOStats)}
    assert "clip_frac_high=" in repr(lazy())
    for clone in (pickle.loads(pickle.dumps(lazy())), copy.copy(lazy()), copy.deepcopy(lazy())):
        assert "_pending" not in clone.__dict__
        assert torch.equal(clone.ratio_mean, s.ratio_mean)
    r = dataclasses.replace(lazy(), num_tokens=torch.tensor(3.0))
    assert float(r.num_tokens) == 3.0 and torch.equal(r.ratio_mean, s.ratio_mean)
    with pytest.raises(AttributeError):
        lazy().not_a_field  # noqa: B018
    assert not hasattr(lazy(), "__setstate__x")
    # an eagerly constructed GRPOStats keeps its dataclass defaults
    t0 = torch.zeros(())
    e = mc.GRPOStats(*(t0,) * 10)
    assert e.is_ratio_mean is None and e.task_loss_sum is None


def test_keyword_config_cache_keeps_types_and_values_apart():
    c = case()
    base = dict(rewards=c["rewards"], group_ids=c["gids"])
    l1, _ = mc.grpo_loss(c["lp"], c["old"], c["mask"], clip_eps_high=0.28, **base)
    l2, _ = mc.grpo_loss(c["lp"], c["old"], c["mask"], clip_eps_high=0.2, **base)
    l3, _ = mc.grpo_loss(c["lp"], c["old"], c["mask"], clip_eps_high=0.28, **base)
    ref1, _ = mc.grpo_loss(c["lp"], c["old"], c["mask"], config=mc.GRPOConfig(clip_eps_high=0.28), **base)
    assert torch.equal(l1, l3) and torch.equal(l1, ref1) and not torch.equal(l1, l2)
    mc.grpo_loss(c["lp"], c["old"], c["mask"], num_tokens=2, **base)
    with pytest.raises(TypeError, match="num_tokens"):
        mc.grpo_loss(c["lp"], c["old"], c["mask"], num_tokens=2.0, **base)  # == 2, but not an int
    # two modules with different configurations never share a packed configuration
    a = mc.GRPOLoss(loss_agg="token-sum")
    b = mc.GRPOLoss(loss_agg="token-mean")
    la, _ = a(c["lp"], c["old"], c["mask"], **base)
    lb, _ = b(c["lp"], c["old"], c["mask"], **base)
    assert not torch.equal(la, lb)
    assert len(gl._CONFIGS) <= gl._CACHE_MAX and len(gl._PACKED) <= gl._CACHE_MAX


def test_cpp_binding_positional_loss_out_and_finite_flag():
    C = _native.native()
    n, t = 2, 3
    lp = np.zeros((n, t), np.float32)
    lp[0, 0] = np.nan
    mask = np.ones((n, t), np.bool_)
    args = [lp, lp.copy(), mask, np.ones(n, np.float32), None, None, None, None, "float32",
            np.zeros((n, t), np.float32), np.zeros((n, C.GRPO_ROW_STATS)), np.zeros(n), np.zeros(n, np.uint8),
            np.zeros(n, np.uint8)]
    loss = np.zeros((), np.float32)
    assert C.grpo_loss_fwd_bwd_cpu(*args, loss_out=loss) is False  # a NaN at an unmasked token
    mask[0, 0] = False
    assert C.grpo_loss_fwd_bwd_cpu(*args, loss_out=loss) is True
    with pytest.raises(ValueError, match="loss_out"):
        C.grpo_loss_fwd_bwd_cpu(*args, loss_out=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="loss_out"):
        C.grpo_loss_fwd_bwd_cpu(*args, loss_out=np.zeros((), np.float64))
    bad = list(args)
    bad[3] = np.array([1.0, np.inf], np.float32)
    with pytest.raises(ValueError, match="advantages"):
        C.grpo_loss_fwd_bwd_cpu(*bad)
    bad[3] = np.ones(n, np.float32)
    bad[10] = np.zeros((n, C.GRPO_ROW_STATS))
    bad[10].flags.writeable = False
    with pytest.raises(ValueError, match="rowstats"):
        C.grpo_loss_fwd_bwd_cpu(*bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_binding_reads_dlpack_capsules_as_arrays(dtype):
    """The binding takes a tensor's DLPack capsule where it takes a numpy array: same bits, and the
    same checks (dimensions, shape, element size, contiguity, type), naming the argument."""
    from torch.utils.dlpack import to_dlpack

    C = _native.native()
    c = case(dtype=dtype)
    n, t = c["lp"].shape
    ints = {torch.bfloat16: torch.int16}.get(dtype)

    def as_np(x):
        return (x.view(ints) if ints is not None and x.dtype == dtype else x).numpy()

    def run(conv, **over):
        grad = torch.empty(n, t, dtype=dtype)
        out = (np.zeros((n, C.GRPO_ROW_STATS)), np.zeros(n), np.zeros(n, np.uint8), np.zeros(n, np.uint8))
        loss = np.zeros((), np.float32)
        a = {**dict(lp=conv(c["lp"]), old=conv(c["old"]), mask=conv(c["mask"]), grad=conv(grad)), **over}
        C.grpo_loss_fwd_bwd_cpu(a["lp"], a["old"], a["mask"], None, conv(c["rewards"]), conv(c["gids"]), None, None,
                                {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype], a["grad"], *out,
                                loss_out=loss)
        return grad, out, loss

    g1, o1, l1 = run(as_np)
    g2, o2, l2 = run(to_dlpack)
    assert torch.equal(g1, g2) and l1 == l2 and all(np.array_equal(x, y) for x, y in zip(o1, o2))
    lp_t = c["lp"].t().contiguous().t()  # the same values, column-major
    for over, name in [(dict(lp=to_dlpack(c["lp"][0])), "logprobs"), (dict(old=to_dlpack(c["old"][:, :4])),
                       "old_logprobs"), (dict(mask=to_dlpack(lp_t)), "mask"), (dict(lp=to_dlpack(lp_t)), "logprobs"),
                       (dict(old=to_dlpack(c["old"].double())), "old_logprobs"), (dict(grad=[0.0] * t), "grad")]:
        with pytest.raises(ValueError, match=name):
            run(to_dlpack, **over)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32, torch.bfloat16, torch.int32])
def test_task_masked_sum_fast_path_gives_the_op_path_bits(dtype, mask_dtype):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(5, 7, generator=g).to(dtype)
    m = (torch.rand(5, 7, generator=g) > 0.3).to(mask_dtype)
    for ids in (torch.tensor([0, 2, 1, 0, 2]), torch.tensor([0, 2, 1, 0, 2], dtype=torch.int32)):
        fast = mc.task_masked_sum(v, m, ids, 3)
        with PassThrough():
            op = mc.task_masked_sum(v, m, ids, 3)
        for a, b in zip(fast, op):
            assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="task_ids"):
        mc.task_masked_sum(v, m, torch.tensor([0, 3, 1, 0, 2]), 3)
    with pytest.raises(TypeError, match="num_tasks"):
        mc.task_masked_sum(v, m, torch.tensor([0, 2, 1, 0, 2]), 3.0)
    with pytest.raises(ValueError, match="num_tasks"):
        mc.task_masked_sum(v, m, torch.tensor([0, 2, 1, 0, 2]), 0)
    with pytest.raises(TypeError, match="task_ids"):
        mc.task_masked_sum(v, m, torch.tensor([0.0, 2, 1, 0, 2]), 3)
    with pytest.raises(ValueError, match="mask"):
        mc.task_masked_sum(v, m[:, :3], torch.tensor([0, 2, 1, 0, 2]), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("normalize", ["task-token-mean", "token-mean"])
def test_task_weighted_loss_fast_path_gives_the_op_path_bits(dtype, normalize):
    """A plain eager CPU call runs the op's forward and backward without its dispatch: the same
    loss and gradients (token losses and weights) bit for bit, the same errors."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(6, 9, generator=g).to(dtype)
    m = torch.rand(6, 9, generator=g) > 0.3
    m[4] = False  # task 2 below has a row without tokens; task 3 has none at all
    ids = torch.tensor([0, 2, 1, 0, 2, 1], dtype=torch.int32)
    w0 = torch.tensor([0.5, 2.0, 1.0, 3.0])

    def run(need_w):
        x = v.clone().requires_grad_()
        w = w0.clone().requires_grad_(need_w)
        loss = mc.task_weighted_loss(x, m, ids, w, normalize=normalize)
        loss.backward()
        return loss.detach(), x.grad, w.grad

    for need_w in (False, True):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fast = run(need_w)
        assert not any("mtgrpo::task_weighted_loss" in e.name for e in prof.events())
        with PassThrough():
            op = run(need_w)
        for a, b in zip(fast, op):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():  # no graph: the value alone
        assert torch.equal(mc.task_weighted_loss(v, m, ids, w0, normalize=normalize), fast[0])
    with pytest.raises(ValueError, match=r"task_ids.*len\(task_weights\)=4"):
        mc.task_weighted_loss(v, m, torch.tensor([0, 4, 1, 0, 2, 1]), w0)
    with pytest.raises(ValueError, match="task_weights: expected finite"):
        mc.task_weighted_loss(v, m, ids, torch.tensor([0.5, float("nan"), 1.0, 1.0]))
    bad = mc.task_weighted_loss(v, m, ids, torch.tensor([0.5, float("nan"), 1.0, 1.0]), validate=False)
    assert bad.isnan()  # validate=False skips the check, as on the op path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_backward_scatter_runs_directly_and_gives_the_op_bits(dtype):
    """The per-task ops' backward calls the C++ scatter directly in a plain eager backward and
    through the ``mtgrpo::task_masked_sum_backward`` op otherwise: same gradients, bit for bit."""
    ta = importlib.import_module("mtgrpo_core.ops.task_accumulate")
    g = torch.Generator().manual_seed(2)
    v = torch.randn(6, 5, generator=g).to(dtype)
    m = torch.rand(6, 5, generator=g) > 0.3
    ids = torch.tensor([0, 2, 1, 0, 2, 1])
    w = torch.tensor([0.5, 2.0, 1.0])

    def grads():
        x = v.clone().requires_grad_()
        (mc.task_masked_sum(x, m, ids, 3)[0].float() * torch.arange(1.0, 4.0)).sum().backward()
        y = v.clone().requires_grad_()
        mc.task_weighted_loss(y, m, ids, w).backward()
        return x.grad, y.grad

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fast = grads()
    assert not any("task_masked_sum_backward" in e.name for e in prof.events())
    # a dispatch mode reaches into the backward (a torch-function mode does not: the engine runs
    # the backward without it, so that call goes straight to the kernel as well)
    with PassThroughDispatch():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            op = grads()
    assert sum("task_masked_sum_backward" in e.name for e in prof.events()) >= 2
    for a, b in zip(fast, op):
        assert a.dtype == dtype and torch.equal(a, b)
    assert ta._scatter_grad.__doc__  # (the one function both backwards call)


def test_backend_env_variable_still_read_per_call(monkeypatch):
    from mtgrpo_core.ops._dispatch import resolve_backend

    dev = torch.device("cpu")
    assert resolve_backend("grpo_loss", "auto", dev) == "cpu"
    monkeypatch.setenv("MTGRPO_BACKEND", "torch")
    assert resolve_backend("grpo_loss", "auto", dev) == "torch"
    monkeypatch.setenv("MTGRPO_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MTGRPO_BACKEND"):
        resolve_backend("grpo_loss", "auto", dev)
    monkeypatch.delenv("MTGRPO_BACKEND")
    assert resolve_backend("grpo_loss", "auto", dev) == "cpu"


def test_jit_trace_records_the_op_not_the_fast_path():
    c = case()

    def f(lp):
        return mc.grpo_loss(lp, c["old"], c["mask"], rewards=c["rewards"], group_ids=c["gids"])[0]

    traced = torch.jit.trace(f, (c["lp"],), check_trace=False)
    assert "mtgrpo::grpo_loss" in str(traced.graph)
    assert torch.equal(traced(c["lp"]), f(c["lp"]))


def test_backend_answer_is_a_trace_constant_without_importing_dynamo():
    """``_resolve_constant`` carries what ``torch.compiler.assume_constant_result`` sets (checked
    against torch's own decorator, so a torch that changes it fails here), and importing the ops
    does not import ``torch._dynamo`` (1.7 s in every process that imports the library)."""
    import subprocess
    import sys

    import torch._dynamo.decorators as decorators

    from mtgrpo_core.ops import _dispatch

    def f():
        return 0

    before = set(vars(f))
    decorators.assume_constant_result(f)
    assert {k: vars(f)[k] for k in set(vars(f)) - before} == {"_dynamo_marked_constant": True}
    assert _dispatch._resolve_constant._dynamo_marked_constant is True
    code = "import sys, mtgrpo_core.ops; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a buffer twice as long;
    a transposed copy for 2-d)."""
    if x.dim() == 2:
        return x.t().contiguous().t()
    buf = torch.empty(2 * x.numel(), dtype=x.dtype)
    buf[::2] = x
    return buf[::2]


@pytest.mark.parametrize("variant", ["fused+sw", "adv", "adv_tok", "kl", "token_is", "seq_is", "geo_mean"])
def test_non_contiguous_inputs_give_the_contiguous_result(variant):
    """Every tensor argument may be a strided view: the C++ path makes what it hands to the binding
    contiguous (seq_weights was passed as it was and refused as not C-contiguous)."""
    c = case()
    kw = {"fused+sw": dict(rewards=c["rewards"], group_ids=c["gids"], seq_weights=c["sw"]),
          "adv": dict(advantages=c["adv"], seq_weights=c["sw"]), "adv_tok": dict(advantages=c["adv_tok"]),
          "kl": dict(advantages=c["adv"], ref_logprobs=c["ref"], kl_coef=0.1),
          "token_is": dict(advantages=c["adv"], rollout_logprobs=c["roll"], is_correction="token_truncate",
                           is_hi=2.0),
          "seq_is": dict(rewards=c["rewards"], group_ids=c["gids"], rollout_logprobs=c["roll"],
                         is_correction="sequence_mask", is_lo=0.5, is_hi=2.0),
          "geo_mean": dict(advantages=c["adv"], seq_weights=c["sw"], policy_loss="geo_mean")}[variant]
    out = []
    for conv in (lambda x: x, _strided):
        x = conv(c["lp"]).detach().requires_grad_()  # a leaf, with the strides of the view
        args = {k: conv(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        loss, stats = mc.grpo_loss(x, conv(c["old"]), conv(c["mask"]), backend="cpu", **args)
        loss.backward()
        out.append((loss, x.grad, stats.per_sequence_loss))
    for a, b in zip(*out):
        assert torch.equal(a, b), variant
    v, m, ids = c["lp"], c["mask"], c["tids"]
    got = mc.task_masked_sum(_strided(v), _strided(m), _strided(ids), 3)
    for a, b in zip(got, mc.task_masked_sum(v, m, ids, 3)):
        assert torch.equal(a, b)
