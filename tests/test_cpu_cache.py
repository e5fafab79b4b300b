"""The CPU output cache (csrc/cpu_cache.cpp, mtgrpo_core/ops/_cpu_cache.py): large outputs of the
C++ path reuse freed buffers; every element is written whatever the buffer held before; the
kept bytes stay within the limit; bad arguments are refused by name."""
import gc
import os
import threading

import pytest
import torch

import mtgrpo_core as mc
from mtgrpo_core import _native
from mtgrpo_core.ops import _cpu_cache as cc

pytestmark = pytest.mark.skipif(not _native.available(), reason="the C++ extension is not built")

BIG = (512, 1024)  # 2 MiB of fp32: above MIN_BYTES


@pytest.fixture(autouse=True)
def _fresh_cache():
    cc.set_cpu_cache_limit(256)
    cc.empty_cpu_cache()
    yield
    gc.collect()
    cc.set_cpu_cache_limit(256)
    cc.empty_cpu_cache()


def test_a_freed_buffer_serves_the_next_output_of_about_its_size():
    base = cc.cpu_cache_info()
    x = cc.cpu_empty(BIG, torch.float32)
    assert x.shape == BIG and x.dtype == torch.float32 and x.is_contiguous() and x.device.type == "cpu"
    assert x.data_ptr() % 4096 == 0
    ptr = x.data_ptr()
    info = cc.cpu_cache_info()
    assert info["misses"] == base["misses"] + 1 and info["in_use_bytes"] == base["in_use_bytes"] + 2 << 20
    del x
    info = cc.cpu_cache_info()
    assert info["cached_bytes"] == 2 << 20 and info["in_use_bytes"] == base["in_use_bytes"]
    y = cc.cpu_empty((500, 1024), torch.float32)  # smaller, within 1/4: the same buffer
    assert y.data_ptr() == ptr and cc.cpu_cache_info()["hits"] == base["hits"] + 1
    z = cc.cpu_empty((256, 1024), torch.float32)  # half the size: not that buffer, a fresh one
    assert z.data_ptr() != ptr
    del y, z
    assert cc.empty_cpu_cache() >= (2 << 20) + (1 << 20)
    assert cc.cpu_cache_info()["cached_bytes"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_small_outputs_and_a_zero_limit_come_from_torch(dtype):
    base = cc.cpu_cache_info()
    small = cc.cpu_empty((4, 8), dtype)
    assert small.dtype == dtype and small.shape == (4, 8)
    assert cc.cpu_cache_info()["misses"] == base["misses"]  # not through the cache
    big = cc.cpu_empty((2048, 1024), dtype)
    assert big.dtype == dtype and cc.cpu_cache_info()["misses"] == base["misses"] + 1
    del big
    cc.set_cpu_cache_limit(0)  # off: what is kept is unmapped, nothing new is kept or taken
    assert cc.cpu_cache_info()["cached_bytes"] == 0
    again = cc.cpu_empty((2048, 1024), dtype)
    assert cc.cpu_cache_info()["misses"] == base["misses"] + 1 and again.shape == (2048, 1024)


def test_kept_bytes_stay_within_the_limit_least_recently_freed_evicted_first():
    cc.set_cpu_cache_limit(5)  # MiB
    a, b, c = (cc.cpu_empty((n, 1024), torch.float32) for n in (512, 768, 1024))  # 2, 3, 4 MiB
    pa, pc = a.data_ptr(), c.data_ptr()
    del a
    del b  # 2 + 3 = 5 MiB kept
    assert cc.cpu_cache_info()["cached_bytes"] == 5 << 20
    del c  # 4 MiB more: a (freed first) and b evicted
    info = cc.cpu_cache_info()
    assert info["cached_bytes"] == 4 << 20 and info["cached_blocks"] == 1
    d = cc.cpu_empty((1024, 1024), torch.float32)
    assert d.data_ptr() == pc
    misses = cc.cpu_cache_info()["misses"]
    e = cc.cpu_empty((512, 1024), torch.float32)  # a was unmapped: a fresh mapping
    assert cc.cpu_cache_info()["misses"] == misses + 1
    del e, pa
    cc.set_cpu_cache_limit(1)  # a block over the limit is never kept
    assert cc.cpu_cache_info()["cached_bytes"] == 0
    del d
    assert cc.cpu_cache_info()["cached_bytes"] == 0


def _dirty_cache(nbytes: int) -> None:
    """Leave a freed buffer of `nbytes` full of NaN in the cache (what the next output gets)."""
    t = cc.cpu_empty((nbytes // 4,), torch.float32)
    t.fill_(float("nan"))
    del t
    assert cc.cpu_cache_info()["cached_bytes"] >= nbytes


def test_backward_scatter_writes_every_element_of_a_reused_buffer():
    g = torch.Generator().manual_seed(0)
    n, t, k = 512, 1024, 5
    x = torch.randn(n, t, generator=g, requires_grad=True)
    mask = torch.rand(n, t, generator=g) > 0.3
    ids = torch.randint(0, k, (n,), generator=g)
    w = torch.rand(k, generator=g)
    ref = torch.autograd.grad(mc.task_weighted_loss(x, mask, ids, w, backend="torch"), x)[0]
    for _ in range(2):
        _dirty_cache(n * t * 4)
        hits = cc.cpu_cache_info()["hits"]
        got = torch.autograd.grad(mc.task_weighted_loss(x, mask, ids, w, backend="cpu"), x)[0]
        assert cc.cpu_cache_info()["hits"] == hits + 1  # the NaN buffer was the output
        assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_gradient_on_a_reused_buffer_equals_a_fresh_one(dtype):
    g = torch.Generator().manual_seed(1)
    n, t = 512, 1024
    lp = (-torch.rand(n, t, generator=g)).to(dtype)
    old = (lp.float() + 0.1 * torch.randn(n, t, generator=g)).to(dtype)
    mask = torch.rand(n, t, generator=g) > 0.2
    kw = dict(rewards=torch.rand(n, generator=g), group_ids=torch.arange(n) // 8, backend="cpu")
    cc.set_cpu_cache_limit(0)
    x0 = lp.clone().requires_grad_()
    mc.grpo_loss(x0, old, mask, **kw)[0].backward()
    cc.set_cpu_cache_limit(256)
    _dirty_cache(n * t * dtype.itemsize)
    hits = cc.cpu_cache_info()["hits"]
    x = lp.clone().requires_grad_()
    mc.grpo_loss(x, old, mask, **kw)[0].backward()
    assert cc.cpu_cache_info()["hits"] == hits + 1  # the NaN buffer was the gradient
    assert torch.equal(x.grad, x0.grad)


def test_tensors_freed_on_many_threads_keep_the_counters_exact():
    base = cc.cpu_cache_info()["in_use_bytes"]
    tensors = [cc.cpu_empty((256 + i, 1024), torch.float32) for i in range(16)]
    assert cc.cpu_cache_info()["in_use_bytes"] > base

    def drop(chunk):
        for _ in range(len(chunk)):
            chunk.pop()

    chunks = [tensors[i::4] for i in range(4)]
    del tensors
    threads = [threading.Thread(target=drop, args=(c,)) for c in chunks]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    info = cc.cpu_cache_info()
    assert info["in_use_bytes"] == base
    assert info["cached_bytes"] == sum((256 + i) * 4096 for i in range(16))


def test_an_unconsumed_capsule_returns_its_buffer():
    C = _native.native()
    base = cc.cpu_cache_info()["in_use_bytes"]
    cap = C.cpu_cache_empty(2, 512, 1024, 2, 32)
    assert cc.cpu_cache_info()["in_use_bytes"] == base + (2 << 20)
    del cap
    assert cc.cpu_cache_info()["in_use_bytes"] == base
    cc.set_cpu_cache_limit(0)  # the cache off: the binding hands out nothing, the caller allocates
    assert C.cpu_cache_empty(2, 512, 1024, 2, 32) is None


@pytest.mark.parametrize("args,match", [
    ((3, 4, 4, 2, 32), "ndim: expected 1 or 2"),
    ((2, -1, 4, 2, 32), "shape: negative extent"),
    ((2, 1 << 40, 1 << 40, 2, 32), "shape: too many elements"),
    ((2, 4, 4, 0, 32), "dtype: expected float16/32/64 or bfloat16"),
    ((2, 4, 4, 2, 8), "dtype: expected float16/32/64 or bfloat16"),
])
def test_binding_refuses_bad_arguments_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        _native.native().cpu_cache_empty(*args)


def test_limit_arguments_are_checked():
    with pytest.raises(ValueError, match="megabytes"):
        cc.set_cpu_cache_limit(-1)
    with pytest.raises(ValueError, match="megabytes"):
        cc.set_cpu_cache_limit(float("nan"))
    with pytest.raises(TypeError, match="megabytes"):
        cc.set_cpu_cache_limit("8")
    with pytest.raises(ValueError, match="limit_bytes"):
        _native.native().cpu_cache_set_limit(-5)


@pytest.mark.parametrize("value,ok", [("0", True), ("64", True), ("0.5", True), ("", True), ("lots", False),
                                      ("-3", False), ("inf", False)])
def test_environment_limit_is_read_at_first_use(value, ok, monkeypatch):
    monkeypatch.setenv("MTGRPO_CPU_CACHE_MB", value)
    monkeypatch.setitem(cc._state, "env_read", False)  # as in a fresh process: not read yet
    if not ok:
        with pytest.raises(ValueError, match="MTGRPO_CPU_CACHE_MB"):
            cc.cpu_empty(BIG, torch.float32)
        return
    x = cc.cpu_empty(BIG, torch.float32)
    del x
    info = cc.cpu_cache_info()
    expect = int((float(value) if value else cc.DEFAULT_LIMIT_MB) * (1 << 20))
    assert info["limit_bytes"] == expect
    assert info["cached_bytes"] == (2 << 20 if expect >= 2 << 20 else 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_uses_and_frees_buffers():
    keep = cc.cpu_empty(BIG, torch.float32)
    keep.fill_(3.0)
    pid = os.fork()
    if pid == 0:  # the child: its own copy of the cache
        try:
            torch.set_num_threads(1)  # no OpenMP region in a forked child
            y = cc.cpu_empty(BIG, torch.float32)
            y.fill_(1.0)
            ok = float(keep[0, 0]) == 3.0 and float(y.sum()) == BIG[0] * BIG[1]
            del y
            os._exit(0 if ok and cc.cpu_cache_info()["cached_bytes"] >= 2 << 20 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
