"""task_masked_sum / task_weighted_loss: reference, C++ CPU path, host twin of the CUDA
kernels and (on a GPU) the CUDA kernels, against a float64 numpy gold.

Tolerances: the kernels accumulate in float32 (float64 for float64 values), like the torch
reference, so a kernel's error is allowed to be twice the reference's error (both measured
against the fp64 gold of the same rounded inputs) plus 2e-6 * sum|x| of the task: a
float32 sum of blocked partial sums has a worst-case relative error of roughly
(64 + log2(units) + blocks) * 2^-24 of sum|x|, and random data stays far below that.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtgrpo_core as mc
from mtgrpo_core import _native
from mtgrpo_core.ops._dispatch import resolve_backend
from mtgrpo_core.ops.task_accumulate import _VALUE_TYPE, _VALUE_VIEW, _mask_kind, _mask_view
from mtgrpo_core.reference.task_accumulate import task_masked_sum_ref, task_weighted_loss_ref

C = _native.native()
CUDA = torch.cuda.is_available()


# ---- helpers --------------------------------------------------------------------------------
def gold(values: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor, k: int):
    """float64 numpy sums, exact counts and sum|x| per task, from the (rounded) inputs."""
    v = values.detach().to(torch.float64).cpu().numpy()
    sel = (mask != 0).cpu().numpy()
    ids = task_ids.cpu().numpy().astype(np.int64)
    sums, counts, abss = np.zeros(k), np.zeros(k, np.int64), np.zeros(k)
    for t in range(k):
        rows = ids == t
        x = v[rows][sel[rows]]
        sums[t], counts[t], abss[t] = x.sum(), x.size, np.abs(x).sum()
    return sums, counts, abss


def twin(values, mask, task_ids, k):
    v = values.contiguous().cpu()
    m = mask.contiguous().cpu()
    s, c = C.task_masked_sum_twin(v.view(_VALUE_VIEW[v.dtype]).numpy(), _VALUE_TYPE[v.dtype], _mask_view(m).numpy(),
                                  _mask_kind(m.dtype), task_ids.cpu().to(torch.int64).contiguous().numpy(), k)
    return torch.from_numpy(s), torch.from_numpy(c)


def cpu_threads(values, mask, task_ids, k, threads):
    v, m = values.contiguous(), mask.contiguous()
    s, c = C.task_masked_sum_cpu(v.view(_VALUE_VIEW[v.dtype]).numpy(), _VALUE_TYPE[v.dtype], _mask_view(m).numpy(),
                                 _mask_kind(m.dtype), task_ids.to(torch.int64).contiguous().numpy(), k, threads)
    return torch.from_numpy(s), torch.from_numpy(c)


def assert_close_to_gold(sums, counts, values, mask, task_ids, k):
    g, gc, abss = gold(values, mask, task_ids, k)
    ref_s, ref_c = task_masked_sum_ref(values.cpu(), mask.cpu(), task_ids.cpu(), k)
    assert np.array_equal(counts.cpu().numpy(), gc)
    assert np.array_equal(ref_c.numpy(), gc)
    ref_err = np.abs(ref_s.double().numpy() - g)
    err = np.abs(sums.cpu().double().numpy() - g)
    bound = 2 * ref_err + 2e-6 * abss + 1e-30
    assert (err <= bound).all(), (err, bound)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {4: torch.int32, 8: torch.int64, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def make_case(name: str, seed: int = 0):
    """Adversarial inputs: (values, mask, task_ids, K)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(n, t, dtype=torch.float32):
        return torch.randn(n, t, generator=g, dtype=torch.float64).to(dtype)

    def msk(n, t, p=0.7):
        return torch.rand(n, t, generator=g) < p

    if name == "random":
        n, t, k = 37, 301, 5
        return rnd(n, t), msk(n, t), torch.randint(0, k, (n,), generator=g), k
    if name == "k_larger_than_present":
        n, t, k = 20, 64, 50
        ids = torch.tensor([0, 7] * 10)
        return rnd(n, t), msk(n, t), ids, k
    if name == "all_masked":
        n, t, k = 9, 33, 4
        return rnd(n, t), torch.zeros(n, t, dtype=torch.bool), torch.randint(0, k, (n,), generator=g), k
    if name == "one_task":
        n, t = 17, 129
        return rnd(n, t), msk(n, t), torch.zeros(n, dtype=torch.int64), 1
    if name == "unsorted_int32_ids":
        n, t, k = 24, 50, 6
        ids = torch.tensor([5, 0, 3, 3, 1, 5, 2, 0, 4, 1] * 2 + [2, 2, 0, 5], dtype=torch.int32)
        return rnd(n, t), msk(n, t), ids, k
    if name == "non_contiguous":
        n, t, k = 31, 90, 4
        big = rnd(t, 2 * n)
        values = big[:, ::2].t()  # [n, t], strided both ways
        mask = msk(t, n).t()
        ids = torch.randint(0, k, (2 * n,), generator=g)[::2]
        assert not values.is_contiguous() and not mask.is_contiguous() and not ids.is_contiguous()
        return values, mask, ids, k
    if name == "bf16":
        n, t, k = 40, 257, 3
        return rnd(n, t, torch.bfloat16), msk(n, t), torch.randint(0, k, (n,), generator=g), k
    if name == "fp16":
        n, t, k = 40, 257, 3
        v = rnd(n, t, torch.float16)
        v[0, :3] = torch.tensor([6e-8, -3e-6, 65504.0], dtype=torch.float16)  # subnormals, max
        return v, msk(n, t), torch.randint(0, k, (n,), generator=g), k
    if name == "fp64":
        n, t, k = 23, 111, 7
        return rnd(n, t, torch.float64), msk(n, t), torch.randint(0, k, (n,), generator=g), k
    if name == "multi_segment_rows":  # T > 1024 (the unit length): several units per row
        n, t, k = 3, 5000, 2
        return rnd(n, t), msk(n, t), torch.tensor([1, 0, 1]), k
    if name == "single_long_row":
        return rnd(1, 9000), msk(1, 9000), torch.tensor([2]), 3
    if name == "t_equals_1":
        n, k = 3000, 9
        return rnd(n, 1), msk(n, 1), torch.randint(0, k, (n,), generator=g), k
    if name == "short_rows":
        n, t, k = 200, 13, 5
        return rnd(n, t), msk(n, t), torch.randint(0, k, (n,), generator=g), k
    if name == "nan_masked_out":
        n, t, k = 10, 40, 3
        v, m = rnd(n, t), msk(n, t)
        v[~m] = float("nan")
        return v, m, torch.randint(0, k, (n,), generator=g), k
    if name == "many_tasks":
        n, t, k = 300, 40, 4096
        return rnd(n, t), msk(n, t), torch.randint(0, k, (n,), generator=g), k
    if name == "empty_rows":
        return rnd(0, 16), msk(0, 16), torch.zeros(0, dtype=torch.int64), 3
    if name == "empty_cols":
        return rnd(5, 0), msk(5, 0), torch.tensor([0, 1, 2, 1, 0]), 3
    if name == "big_blocks":  # enough rows for many plan blocks
        n, t, k = 4000, 70, 9
        return rnd(n, t), msk(n, t), torch.randint(0, k, (n,), generator=g), k
    raise KeyError(name)


CASES = ["random", "k_larger_than_present", "all_masked", "one_task", "unsorted_int32_ids", "non_contiguous",
         "bf16", "fp16", "fp64", "multi_segment_rows", "single_long_row", "t_equals_1", "short_rows",
         "nan_masked_out", "many_tasks", "empty_rows", "empty_cols", "big_blocks"]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float32, torch.float64]


# ---- forward --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_cpu_twin_reference_agree(case):
    values, mask, ids, k = make_case(case)
    s, c = mc.task_masked_sum(values, mask, ids, k, backend="cpu")
    assert s.dtype == (torch.float64 if values.dtype == torch.float64 else torch.float32)
    assert c.dtype == torch.int64 and s.shape == (k,) and c.shape == (k,)
    assert_close_to_gold(s, c, values, mask, ids, k)
    rs, rc = mc.task_masked_sum(values, mask, ids, k, backend="torch")
    assert_close_to_gold(rs, rc, values, mask, ids, k)
    ts, tc = twin(values, mask, ids, k)
    # The CPU path follows the kernels' plan: same bits as their host twin.
    assert bits_equal(s, ts) and torch.equal(c, tc)
    assert torch.isfinite(s).all()


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_mask_dtypes(mask_dtype):
    values, mask, ids, k = make_case("random", seed=3)
    m = mask.to(mask_dtype)
    s, c = mc.task_masked_sum(values, m, ids, k, backend="cpu")
    s0, c0 = mc.task_masked_sum(values, mask, ids, k, backend="cpu")
    assert bits_equal(s, s0) and torch.equal(c, c0)
    if mask_dtype.is_floating_point:  # -0.0 is "not selected"
        m2 = m.clone()
        m2[~mask] = -0.0
        s2, c2 = mc.task_masked_sum(values, m2, ids, k, backend="cpu")
        assert bits_equal(s2, s0) and torch.equal(c2, c0)


def test_determinism_and_thread_count_independence():
    values, mask, ids, k = make_case("big_blocks", seed=5)
    a = mc.task_masked_sum(values, mask, ids, k, backend="cpu")
    b = mc.task_masked_sum(values, mask, ids, k, backend="cpu")
    assert bits_equal(a[0], b[0]) and torch.equal(a[1], b[1])
    one = cpu_threads(values, mask, ids, k, 1)
    two = cpu_threads(values, mask, ids, k, 2)
    three = cpu_threads(values, mask, ids, k, 3)
    assert bits_equal(one[0], a[0]) and bits_equal(two[0], a[0]) and bits_equal(three[0], a[0])
    plan = C.task_masked_sum_plan(*values.shape, k)
    assert plan["blocks"] > 1  # the combine over blocks was exercised


def test_plan_is_bounded():
    for n, t, k in [(1, 1, 1), (8192, 1024, 100), (1, 8 << 20, 3), (8 << 20, 1, 4096), (1000, 3000, 7)]:
        p = C.task_masked_sum_plan(n, t, k)
        # whole tiles: a CUDA block's 8 warps each reduce one unit of every tile of 8
        assert p["units_per_block"] % 8 == 0
        assert p["units"] <= 8 or p["blocks"] == 1 or p["units_per_block"] * (p["blocks"] - 1) < p["units"]
        assert 1 <= p["blocks"] <= 1024
        assert p["blocks"] * k <= max(1 << 20, 64 * k)
        assert p["blocks"] * p["units_per_block"] >= p["units"]
        assert p["units_per_block"] * p["seg_len"] < 2**31  # per-block uint32 counts cannot overflow


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), t=st.integers(0, 90), k=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       density=st.sampled_from([0.0, 0.1, 0.5, 1.0]))
def test_property_random_shapes(n, t, k, seed, dtype, density):
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(n, t, generator=g, dtype=torch.float64) * 10).to(dtype)
    mask = torch.rand(n, t, generator=g) < density
    ids = torch.randint(0, k, (n,), generator=g)
    s, c = mc.task_masked_sum(values, mask, ids, k, backend="cpu")
    assert_close_to_gold(s, c, values, mask, ids, k)
    ts, tc = twin(values, mask, ids, k)
    assert bits_equal(s, ts) and torch.equal(c, tc)


def test_auto_backend_on_cpu_is_the_cxx_path():
    assert resolve_backend("task_masked_sum", "auto", torch.device("cpu")) == "cpu"
    assert resolve_backend("task_weighted_loss", "auto", torch.device("cpu")) == "cpu"


# ---- task_weighted_loss -------------------------------------------------------------------
@pytest.mark.parametrize("normalize", ["task-token-mean", "token-mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_weighted_loss_and_gradients_match_reference(normalize, dtype):
    g = torch.Generator().manual_seed(11)
    n, t, k = 29, 77, 6
    base = torch.randn(n, t, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.rand(n, t, generator=g) < 0.6
    mask[3] = False  # a fully masked row
    ids = torch.randint(0, k - 1, (n,), generator=g)  # task k-1 has no tokens
    w0 = torch.rand(k, generator=g, dtype=torch.float64) + 0.1

    x1, w1 = base.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss = mc.task_weighted_loss(x1, mask, ids, w1, normalize=normalize, backend="cpu")
    loss.backward()
    x2, w2 = base.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    ref = task_weighted_loss_ref(x2, mask, ids, w2, normalize)
    ref.backward()

    assert loss.dtype == ref.dtype and loss.shape == ()
    # fp32/bf16: the loss is a K-term combination of fp32 sums -> fp32 rounding (rtol 1e-6);
    # fp64: everything in fp64.
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(loss, ref, rtol=rtol, atol=1e-12)
    assert x1.grad.dtype == dtype and x1.grad.shape == (n, t)
    # grad = w_k/c_k * g vs the reference's (w_k*g)/c_k: one rounding apart in fp32, then the
    # same cast to the values' dtype (bf16: at most one bf16 ulp apart, 2^-8 relative).
    grtol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(x1.grad, x2.grad, rtol=grtol, atol=0)
    assert torch.count_nonzero(x1.grad[~mask]) == 0
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-12)
    assert w1.grad[k - 1] == 0  # a task without tokens: zero gradient, not NaN


def test_weighted_loss_gold_values():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    ids = torch.tensor([0, 1, 0])
    w = torch.tensor([2.0, 3.0, 7.0])  # task 2 has no tokens
    # task 0: tokens 1,2,5,5,5 -> mean 18/5; task 1: 10 -> mean 10
    loss = mc.task_weighted_loss(values, mask, ids, w, backend="cpu")
    assert loss.item() == pytest.approx(2 * 18 / 5 + 3 * 10)
    loss = mc.task_weighted_loss(values, mask, ids, w, normalize="token-mean", backend="cpu")
    assert loss.item() == pytest.approx((2 * 18 + 3 * 10) / 6)
    loss = mc.task_weighted_loss(values, mask, ids, np.array([2.0, 3.0, 7.0]), backend="cpu")
    assert loss.item() == pytest.approx(2 * 18 / 5 + 3 * 10)


@pytest.mark.parametrize("normalize", ["task-token-mean", "token-mean"])
def test_weighted_loss_all_masked_is_zero_not_nan(normalize):
    x = torch.randn(4, 9, requires_grad=True)
    loss = mc.task_weighted_loss(x, torch.zeros(4, 9), torch.tensor([0, 1, 1, 0]), torch.ones(2),
                                 normalize=normalize, backend="cpu")
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_task_masked_sum_is_differentiable():
    values, mask, ids, k = make_case("random", seed=2)
    x1 = values.clone().requires_grad_(True)
    s, _ = mc.task_masked_sum(x1, mask, ids, k, backend="cpu")
    (s * torch.arange(1.0, k + 1)).sum().backward()
    expected = (ids.to(torch.float32) + 1)[:, None] * mask
    torch.testing.assert_close(x1.grad, expected, rtol=0, atol=0)


def test_torch_compile_traces_the_custom_ops():
    values, mask, ids, k = make_case("random", seed=4)
    w = torch.rand(k)

    def f(x):
        return mc.task_weighted_loss(x, mask, ids, w, backend="cpu")

    x1 = values.clone().requires_grad_(True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x1)
    out.backward()
    x2 = values.clone().requires_grad_(True)
    ref = f(x2)
    ref.backward()
    assert bits_equal(out.detach(), ref.detach()) and bits_equal(x1.grad, x2.grad)
    assert torch.ops.mtgrpo.task_masked_sum.default is not None


# ---- the op template: gold gradients per backend, meta tensors, fullgraph compile -----------
def _gold_grads(values, mask, ids, w, normalize):
    """fp64 numpy gold of d loss / d token_loss and d loss / d w."""
    v = values.detach().double().numpy()
    sel = (mask != 0).numpy()
    idn = ids.numpy().astype(np.int64)
    wn = w.detach().double().numpy()
    k = wn.shape[0]
    sums = np.array([v[idn == t][sel[idn == t]].sum() for t in range(k)])
    counts = np.array([sel[idn == t].sum() for t in range(k)])
    if normalize == "task-token-mean":
        coef = np.where(counts > 0, wn / np.maximum(counts, 1), 0.0)
        dw = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    else:
        total = max(counts.sum(), 1)
        coef, dw = wn / total, sums / total
    return coef[idn][:, None] * sel, dw


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("normalize", ["task-token-mean", "token-mean"])
def test_gradients_vs_fp64_gold_every_backend(backend, normalize):
    g = torch.Generator().manual_seed(21)
    n, t, k = 33, 150, 5
    values = torch.randn(n, t, generator=g, dtype=torch.float64).float().requires_grad_(True)
    mask = torch.rand(n, t, generator=g) < 0.5
    ids = torch.randint(0, k - 1, (n,), generator=g)  # task k-1 has no tokens
    w = (torch.rand(k, generator=g) + 0.1).requires_grad_(True)
    loss = mc.task_weighted_loss(values, mask, ids, w, normalize=normalize, backend=backend)
    loss.backward()
    gx, gw = _gold_grads(values, mask, ids, w, normalize)
    np.testing.assert_allclose(values.grad.double().numpy(), gx, rtol=2e-6, atol=0)
    np.testing.assert_allclose(w.grad.double().numpy(), gw, rtol=2e-6, atol=1e-7)
    x2 = values.detach().clone().requires_grad_(True)
    s, _ = mc.task_masked_sum(x2, mask, ids, k, backend=backend)
    (s * torch.arange(1.0, k + 1)).sum().backward()
    assert torch.equal(x2.grad, (ids.float() + 1)[:, None] * mask)


def test_meta_tensors_give_shapes_and_dtypes():
    meta = torch.device("meta")
    for dtype, acc in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]:
        v = torch.empty(7, 11, dtype=dtype, device=meta)
        m = torch.empty(7, 11, dtype=torch.bool, device=meta)
        ids = torch.empty(7, dtype=torch.int64, device=meta)
        s, c = mc.task_masked_sum(v, m, ids, 4)
        assert s.device.type == "meta" and s.shape == (4,) and s.dtype == acc
        assert c.shape == (4,) and c.dtype == torch.int64
        x = v.clone().requires_grad_(True)
        loss = mc.task_weighted_loss(x, m, ids, torch.empty(4, device=meta))
        assert loss.device.type == "meta" and loss.shape == () and loss.dtype == acc
        loss.backward()
        assert x.grad.shape == (7, 11) and x.grad.dtype == dtype


def _training_step_parts():
    torch.manual_seed(0)
    n, t, h, k = 12, 20, 8, 3
    model = torch.nn.Linear(h, 1)
    feats = torch.randn(n, t, h)
    mask = torch.rand(n, t) < 0.7
    ids = torch.arange(n) % k
    w = torch.tensor([0.5, 1.0, 2.0])

    def loss_fn(m):
        token_loss = m(feats).squeeze(-1) ** 2  # [n, t]
        sums, counts = mc.task_masked_sum(token_loss, mask, ids, k)  # backend "auto" resolves inside the trace
        aux = (sums / counts.clamp_min(1)).sum()
        return mc.task_weighted_loss(token_loss, mask, ids, w, backend="cpu") + 0.1 * aux

    return model, loss_fn


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_training_step_has_no_graph_breaks(backend):
    model, loss_fn = _training_step_parts()
    explained = torch._dynamo.explain(loss_fn)(model)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ref_model, _ = _training_step_parts()
    ref_model.load_state_dict(model.state_dict())
    compiled = torch.compile(loss_fn, backend=backend, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for _ in range(2):  # two steps: the compiled graph is reused after the update
        opt.zero_grad()
        loss = compiled(model)
        loss.backward()
        opt.step()
        ref_opt.zero_grad()
        ref = loss_fn(ref_model)
        ref.backward()
        ref_opt.step()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(model.weight, ref_model.weight, rtol=1e-6, atol=1e-7)


def test_validate_flag_and_torch_backend_errors():
    v, m, i = _ok()
    with pytest.raises(TypeError, match="validate"):
        mc.task_masked_sum(v, m, i, 3, validate=1)
    # the reference path (a custom op too) names the argument like the C++ path
    with pytest.raises(ValueError, match="task_ids"):
        mc.task_weighted_loss(v, m, torch.tensor([0, 1, 5, 1]), torch.ones(3), backend="torch")
    # CPU C++ path: checks the ids even with validate=False (it never reads out of bounds)
    with pytest.raises(ValueError, match="task_ids"):
        mc.task_masked_sum(v, m, torch.tensor([0, 1, 5, 1]), 3, backend="cpu", validate=False)


# ---- bad input ------------------------------------------------------------------------------
def _ok():
    return torch.randn(4, 5), torch.ones(4, 5, dtype=torch.bool), torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("mutate, exc, name", [
    (lambda v, m, i, k: (v, m, torch.tensor([0, 1, 3, 1]), k), ValueError, "task_ids"),
    (lambda v, m, i, k: (v, m, torch.tensor([0, -1, 2, 1]), k), ValueError, "task_ids"),
    (lambda v, m, i, k: (v, m, torch.tensor([0, 1, 2]), k), ValueError, "task_ids"),
    (lambda v, m, i, k: (v, m, i.float(), k), TypeError, "task_ids"),
    (lambda v, m, i, k: (v, m, i[:, None], k), ValueError, "task_ids"),
    (lambda v, m, i, k: (v, m[:, :4], i, k), ValueError, "mask"),
    (lambda v, m, i, k: (v, m.numpy(), i, k), TypeError, "mask"),
    (lambda v, m, i, k: (v[0], m[0], i, k), ValueError, "values"),
    (lambda v, m, i, k: (v.to(torch.int32), m, i, k), TypeError, "values"),
    (lambda v, m, i, k: (v, m, i, 0), ValueError, "num_tasks"),
    (lambda v, m, i, k: (v, m, i, -2), ValueError, "num_tasks"),
    (lambda v, m, i, k: (v, m, i, 4097), ValueError, "num_tasks"),
    (lambda v, m, i, k: (v, m, i, 3.0), TypeError, "num_tasks"),
])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_task_masked_sum_bad_input(mutate, exc, name, backend):
    v, m, i = _ok()
    args = mutate(v, m, i, 3)
    with pytest.raises(exc, match=name):
        mc.task_masked_sum(*args, backend=backend)


@pytest.mark.parametrize("weights, normalize, exc, name", [
    (torch.ones(2), "task-token-mean", ValueError, "task_weights"),       # ids reach 2: K too short
    (torch.ones(0), "task-token-mean", ValueError, "task_weights"),
    (torch.ones(3, 1), "task-token-mean", ValueError, "task_weights"),
    (torch.tensor([1.0, float("nan"), 1.0]), "task-token-mean", ValueError, "task_weights"),
    (torch.tensor([1.0, float("inf"), 1.0]), "token-mean", ValueError, "task_weights"),
    ("abc", "task-token-mean", TypeError, "task_weights"),
    (torch.ones(3), "seq-mean", ValueError, "normalize"),
])
def test_task_weighted_loss_bad_input(weights, normalize, exc, name):
    v, m, i = _ok()
    with pytest.raises(exc, match=name):
        mc.task_weighted_loss(v, m, i, weights, normalize=normalize, backend="cpu")


def test_bad_backend_names_the_argument():
    v, m, i = _ok()
    with pytest.raises(ValueError, match="backend"):
        mc.task_masked_sum(v, m, i, 3, backend="gpu")
    with pytest.raises(RuntimeError, match="cuda"):
        mc.task_masked_sum(v, m, i, 3, backend="cuda")  # CPU tensors


def test_cxx_entry_points_reject_bad_input():
    v = np.zeros((4, 5), np.float32)
    m = np.ones((4, 5), np.uint8)
    with pytest.raises(ValueError, match="task_ids"):
        C.task_masked_sum_cpu(v, 0, m, 0, np.array([0, 1, 7, 0]), 3)
    with pytest.raises(ValueError, match="task_ids"):
        C.task_masked_sum_cpu(v, 0, m, 0, np.array([0, 1, 0], np.int64), 3)
    with pytest.raises(ValueError, match="values"):
        C.task_masked_sum_cpu(v, 2, m, 0, np.zeros(4, np.int64), 3)  # itemsize vs bf16 tag
    with pytest.raises(ValueError, match="mask"):
        C.task_masked_sum_cpu(v, 0, np.ones((4, 6), np.uint8), 0, np.zeros(4, np.int64), 3)
    with pytest.raises(ValueError, match="num_tasks"):
        C.task_masked_sum_twin(v, 0, m, 0, np.zeros(4, np.int64), 0)
    with pytest.raises(ValueError, match="task_ids"):
        C.task_weighted_grad_cpu(np.zeros((4, 5), np.float32), m, 0, np.array([0, 9, 0, 0]),
                                 np.ones(3, np.float32))


# ---- the CUDA build ---------------------------------------------------------------------------
def _nvcc_exists() -> bool:
    return os.path.exists("/usr/local/cuda/bin/nvcc") or shutil.which("nvcc") is not None


def test_cuda_kernels_built_when_nvcc_exists():
    info = mc.build_info()
    if _nvcc_exists():
        assert info["cuda_kernels_compiled"] is True, "nvcc is installed but the CUDA kernels were not built"
    assert _native.has("task_masked_sum_cuda") == info["cuda_kernels_compiled"]
    assert _native.has("task_weighted_grad_cuda") == info["cuda_kernels_compiled"]


@pytest.mark.skipif(CUDA or not _native.has("task_masked_sum_cuda"),
                    reason="checks the no-GPU error path of a CUDA build")
def test_cuda_entry_points_without_gpu_raise_with_kernel_name():
    # The module imported fine on this GPU-less machine (static cudart); a launch fails
    # cleanly with the kernel's name instead of crashing.
    with pytest.raises(RuntimeError, match="task_masked_sum_partial_kernel"):
        C.task_masked_sum_cuda(16, 0, 16, 0, 16, 4, 4, 3, 16, 16, 16, 1 << 20, 0)
    with pytest.raises(RuntimeError, match="task_weighted_grad_kernel"):
        C.task_weighted_grad_cuda(16, 4, 16, 0, 16, 16, 4, 4, 3, 0)


# ---- GPU ------------------------------------------------------------------------------------
@pytest.mark.requires_cuda
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_twin_bits_and_gold(case):
    values, mask, ids, k = make_case(case)
    dev = torch.device("cuda")
    s, c = mc.task_masked_sum(values.to(dev), mask.to(dev), ids.to(dev), k, backend="cuda")
    assert s.device.type == "cuda"
    ts, tc = twin(values, mask, ids, k)
    assert bits_equal(s, ts) and torch.equal(c.cpu(), tc)
    assert_close_to_gold(s, c, values, mask, ids, k)
    s2, c2 = mc.task_masked_sum(values.to(dev), mask.to(dev), ids.to(dev), k, backend="cuda")
    assert bits_equal(s, s2) and torch.equal(c, c2)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_cuda_mask_dtypes(mask_dtype):
    values, mask, ids, k = make_case("bf16", seed=8)
    dev = torch.device("cuda")
    s, c = mc.task_masked_sum(values.to(dev), mask.to(mask_dtype).to(dev), ids.to(dev), k, backend="cuda")
    ts, tc = twin(values, mask, ids, k)
    assert bits_equal(s, ts) and torch.equal(c.cpu(), tc)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("normalize", ["task-token-mean", "token-mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_weighted_loss_gradients(normalize, dtype):
    values, mask, ids, k = make_case("random", seed=9)
    dev = torch.device("cuda")
    base = values.to(dtype).to(dev)
    w = (torch.rand(k, dtype=torch.float64) + 0.1).to(dev)
    x1 = base.clone().requires_grad_(True)
    loss = mc.task_weighted_loss(x1, mask.to(dev), ids.to(dev), w, normalize=normalize, backend="cuda")
    loss.backward()
    x2 = base.cpu().clone().requires_grad_(True)
    loss_cpu = mc.task_weighted_loss(x2, mask, ids, w.cpu(), normalize=normalize, backend="cpu")
    loss_cpu.backward()
    # Same sums bit for bit; the K-term torch reduction may add in another order on the GPU.
    torch.testing.assert_close(loss.cpu(), loss_cpu, rtol=1e-6, atol=1e-12)
    assert bits_equal(x1.grad, x2.grad)  # w_k / c_k (IEEE division on both) cast once per task


@pytest.mark.requires_cuda
def test_cuda_ops_never_synchronise_the_host():
    # sync debug mode "error" raises on any host<->device synchronisation (.item(), bool(t),
    # nonzero, a blocking copy): the ops, forward and backward, must not do one.
    dev = torch.device("cuda")
    values, mask, ids, k = make_case("random", seed=12)
    x = values.to(dev).requires_grad_(True)
    m, i, w = mask.to(dev), ids.to(dev), (torch.rand(k) + 0.1).to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s, c = mc.task_masked_sum(x, m, i, k)
        loss = mc.task_weighted_loss(x, m, i, w) + s.sum()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ts, tc = twin(values, mask, ids, k)
    assert bits_equal(s, ts) and torch.equal(c.cpu(), tc)


@pytest.mark.requires_cuda
def test_cuda_bad_task_ids_assert_on_the_device():
    # An out-of-range id on CUDA is caught by torch._assert_async (no host sync), which ends
    # the process's CUDA context: so the failing call runs in a child process. In the parent,
    # validate=False skips the check and the kernel ignores the bad row.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, mtgrpo_core as mc
        d = torch.device("cuda")
        s, c = mc.task_masked_sum(torch.randn(3, 4, device=d), torch.ones(3, 4, device=d),
                                  torch.tensor([0, 5, 1], device=d), 3, backend="cuda")
        torch.cuda.synchronize()
        print("NO ERROR")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "NO ERROR" not in out.stdout, out.stdout + out.stderr
    assert "assert" in (out.stdout + out.stderr).lower(), out.stderr[-2000:]
    dev = torch.device("cuda")
    v = torch.randn(3, 4, device=dev)
    s, c = mc.task_masked_sum(v, torch.ones(3, 4, device=dev), torch.tensor([0, 5, 1], device=dev), 3,
                              backend="cuda", validate=False)
    assert c.tolist() == [4, 4, 0]
    torch.testing.assert_close(s[:2].cpu(), torch.stack([v[0].sum(), v[2].sum()]).cpu(), rtol=1e-6, atol=1e-6)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("normalize", ["task-token-mean", "token-mean"])
def test_cuda_gradients_vs_fp64_gold(normalize):
    g = torch.Generator().manual_seed(21)
    n, t, k = 33, 3000, 5
    values = torch.randn(n, t, generator=g, dtype=torch.float64).float()
    mask = torch.rand(n, t, generator=g) < 0.5
    ids = torch.randint(0, k - 1, (n,), generator=g)
    w = torch.rand(k, generator=g) + 0.1
    dev = torch.device("cuda")
    x, wd = values.to(dev).requires_grad_(True), w.to(dev).requires_grad_(True)
    mc.task_weighted_loss(x, mask.to(dev), ids.to(dev), wd, normalize=normalize, backend="cuda").backward()
    gx, gw = _gold_grads(values, mask, ids, w, normalize)
    np.testing.assert_allclose(x.grad.double().cpu().numpy(), gx, rtol=2e-6, atol=0)
    np.testing.assert_allclose(wd.grad.double().cpu().numpy(), gw, rtol=2e-6, atol=1e-7)


@pytest.mark.requires_cuda
def test_cuda_plan_fills_every_warp():
    # Issue 11 item 5: every tile of 8 units (one per warp) is full except the grid's last.
    for n, t, k in [(64, 32768, 3), (1, 8 << 20, 3), (4096, 1024, 9), (3000, 1, 9), (37, 301, 5)]:
        p = C.task_masked_sum_plan(n, t, k)
        assert p["units_per_block"] % 8 == 0
        x = torch.randn(n, t, device="cuda")
        s, _ = mc.task_masked_sum(x, torch.ones_like(x, dtype=torch.bool), torch.arange(n, device="cuda") % k, k,
                                  backend="cuda")
        ts, _ = twin(x.cpu(), torch.ones(n, t, dtype=torch.bool), torch.arange(n) % k, k)
        assert bits_equal(s, ts)


# ---- instruction-set versions, the small-call path, the parallel threshold (issue 25) ----
_ISA_SCRIPT = r"""
import hashlib, torch, mtgrpo_core as mc
from mtgrpo_core import _native
h = hashlib.sha256()
g = torch.Generator().manual_seed(5)
for n, t, dt, mdt in [(37, 1500, torch.float32, torch.bool), (64, 33, torch.bfloat16, torch.float32),
                      (9, 2100, torch.float64, torch.int64), (300, 250, torch.float16, torch.uint8)]:
    v = torch.randn(n, t, generator=g).to(dt)
    m = (torch.rand(n, t, generator=g) < 0.7).to(mdt)
    ids = torch.randint(0, 5, (n,), generator=g)
    s, c = mc.task_masked_sum(v, m, ids, 5, backend="cpu")
    x = v.clone().requires_grad_(True)
    mc.task_weighted_loss(x, m, ids, torch.rand(5, generator=g) + 0.5, backend="cpu").backward()
    for a in (s, c, x.grad):
        h.update(a.contiguous().view(torch.uint8).numpy().tobytes())
print(_native.native().task_accumulate_cpu_isa(), h.hexdigest())
"""


@pytest.mark.skipif(not _native.has("task_accumulate_cpu_isa"), reason="C++ extension not built")
def test_isa_versions_give_the_same_bits():
    # The AVX-512 / AVX2 / baseline loops add the same lanes in the same order: same bits.
    import subprocess
    import sys

    import contextlib
    import io

    here = io.StringIO()
    with contextlib.redirect_stdout(here):  # this process: the best version the CPU has
        exec(_ISA_SCRIPT, {})
    isa, digest = here.getvalue().split()
    digests = {isa: digest}
    for want in ("baseline", "avx2"):  # the others, capped by MTGRPO_CPU_ISA (one process each)
        if want == isa:
            continue
        env = dict(os.environ, MTGRPO_CPU_ISA=want, OMP_NUM_THREADS="2")
        out = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, check=True)
        got_isa, got = out.stdout.split()
        digests[got_isa] = got
    assert "baseline" in digests
    assert len(set(digests.values())) == 1, digests


def test_small_call_path_equals_the_custom_op():
    # The eager small-call path (no custom-op dispatch) runs the op's own implementation:
    # same bits as the op, and the same ValueError for a bad id.
    g = torch.Generator().manual_seed(1)
    v, m = torch.randn(4, 8, generator=g), torch.rand(4, 8, generator=g) < 0.5
    ids = torch.tensor([0, 2, 1, 2], dtype=torch.int32)
    fast = mc.task_masked_sum(v, m, ids, 3, backend="cpu")
    op = torch.ops.mtgrpo.task_masked_sum(v, m, ids, 3, "cpu", True)
    for a, b in zip(fast, op):
        assert torch.equal(a, b) and a.dtype == b.dtype
    with pytest.raises(ValueError, match="task_ids"):
        mc.task_masked_sum(v, m, torch.tensor([0, 3, 1, 2]), 3, backend="cpu")
    with torch.no_grad():  # a tensor that requires grad, with grad mode off
        s, _ = mc.task_masked_sum(v.clone().requires_grad_(True), m, ids, 3, backend="cpu")
    assert torch.equal(s, fast[0])


@pytest.mark.skipif(not _native.has("task_accumulate_cpu_isa"), reason="C++ extension not built")
def test_parallel_threshold_does_not_change_the_bits():
    # Below TASK_ACC_PARALLEL_MIN_ELEMS the call stays on one thread; above it, blocks run on
    # OpenMP threads. Either side of the threshold, any thread count gives the same bits.
    C = _native.native()
    lim = C.TASK_ACC_PARALLEL_MIN_ELEMS
    g = torch.Generator().manual_seed(2)
    for n, t in [(2, lim // 4), (8, lim // 4 + 3)]:
        v, m = torch.randn(n, t, generator=g), torch.rand(n, t, generator=g) < 0.5
        ids = torch.arange(n) % 3
        base = cpu_threads(v, m, ids, 3, 1)
        for threads in (2, 3):
            got = cpu_threads(v, m, ids, 3, threads)
            assert all(np.array_equal(a, b) for a, b in zip(base, got))
