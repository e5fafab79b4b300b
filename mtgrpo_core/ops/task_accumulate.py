"""Per-task masked sums and the multi-task weighted loss (MT-GRPO's per-task objective).

What
    ``task_masked_sum(values[N,T], mask[N,T], task_ids[N], K)`` returns, for every task
    ``k``, the sum of the selected (``mask != 0``) values of the rows of task ``k`` and
    their number. ``task_weighted_loss`` turns them into
    ``L = sum_k w_k * sums[k] / counts[k]`` ("task-token-mean") or
    ``L = sum_k w_k * sums[k] / sum_k counts[k]`` ("token-mean"); tasks with no token
    contribute 0, never NaN. Its gradient is ``dL/dvalues[n,t] = w_k * m[n,t] / count_k``
    (``k = task_ids[n]``; or ``/ total count``), and ``dL/dw_k = sums[k] / counts[k]``.

Algorithm
    One pass over values and mask, deterministic: rows are cut into units of at most 1024
    columns, 32 lanes reduce a unit (lane l adds elements l, l+32, ...; then a fixed
    shuffle tree), blocks of units (a multiple of 8: one unit per CUDA warp) add their
    unit sums to K bins in unit order, and the block partials are added in block order
    (no floating-point atomics). The plan depends only on (N, T, K), so the C++ CPU path
    (blocks on OpenMP threads), the CUDA kernels and their host twin give the same bits,
    run to run and for any thread count. Accumulation in float32 (float64 for float64
    values). The backward is one write pass:
    ``grad[n,t] = mask[n,t] ? table[task_ids[n]] : 0`` with ``table[k] = coef_k * dL`` cast
    to the values' dtype once per task.

Cost
    Forward: reads ``N*T*(value bytes + mask bytes) + 8N`` bytes, ``N*T`` adds, plus at most
    ``2^20`` partial bins (``blocks*K``). Backward: reads the mask, writes ``N*T`` values.
    The torch reference (``mtgrpo_core.reference.task_accumulate``) makes three passes and
    an ``[N, T]`` float32 temporary.

Backends
    "cpu" (C++ extension, CPU tensors), "cuda" (CUDA kernels, CUDA tensors), "torch" (the
    reference), picked by ``ops/_dispatch.py``. One template (CONTRIBUTING / OPS_TEMPLATE):
    the public function validates shapes, dtypes and devices eagerly, resolves the
    backend, and calls one ``torch.library`` custom op per public op
    (``mtgrpo::task_masked_sum``, ``mtgrpo::task_weighted_loss``) with a fake
    implementation (meta tensors, ``torch.compile``) and ``register_autograd``; both
    backwards call ``mtgrpo::task_masked_sum_backward`` (the scatter above). Value checks
    (ids in range, finite weights) run inside the ops' real implementations: ValueError
    on CPU tensors, ``torch._assert_async`` on CUDA tensors (never a host sync).

Source
    MT-GRPO task-weighted objective (docs/ALGORITHMS.md section 3); token-mean aggregation as verl's
    ``agg_loss`` (``verl/trainer/ppo/core_algos.py``).
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch

from .. import _native
from ..reference.task_accumulate import accumulate_dtype, task_masked_sum_ref
from ._dispatch import eager_direct, eager_plain, register_op, resolve_backend
from ._cpu_cache import cpu_empty

__all__ = ["task_masked_sum", "task_weighted_loss", "MAX_TASKS", "NORMALIZE_MODES"]

MAX_TASKS = 4096
NORMALIZE_MODES = ("task-token-mean", "token-mean")

register_op("task_masked_sum", cuda="task_masked_sum_cuda", cpu="task_masked_sum_cpu")
register_op("task_weighted_loss", cuda="task_weighted_grad_cuda", cpu="task_weighted_grad_cpu")

# Value type tags and mask kinds of csrc/include/mtgrpo/task_accumulate.cuh.
_VALUE_TYPE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_VALUE_VIEW = {torch.float32: torch.float32, torch.float64: torch.float64,
               torch.bfloat16: torch.int16, torch.float16: torch.int16}
# The same for `_np`: None where numpy has the dtype (no view op on the small-call path).
_VALUE_NP_VIEW = {torch.float32: None, torch.float64: None, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MASK_INT_KIND = {1: 0, 2: 1, 4: 2, 8: 3}
_MASK_FLOAT_KIND = {torch.float16: 4, torch.bfloat16: 4, torch.float32: 5, torch.float64: 6}


# mask dtype -> kind (a dict look-up on the small-call path; _mask_kind for any other dtype)
_MASK_KIND = {**{d: k for d, k in _MASK_FLOAT_KIND.items()},
              **{d: _MASK_INT_KIND[d.itemsize] for d in (torch.bool, torch.uint8, torch.int8, torch.int16,
                                                         torch.int32, torch.int64)}}
_MASK_NP_VIEW = {torch.bfloat16: torch.int16}  # the masks numpy has no dtype for


def _mask_kind(dtype: torch.dtype) -> int:
    if dtype in _MASK_FLOAT_KIND:
        return _MASK_FLOAT_KIND[dtype]
    return _MASK_INT_KIND[_itemsize(dtype)]


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _mask_view(mask: torch.Tensor) -> torch.Tensor:
    """The mask as an integer tensor of the same itemsize (numpy has no bf16; bool -> uint8)."""
    return mask.view(_INT_VIEW[_itemsize(mask.dtype)])


def _cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ---- kernels (called by the custom ops only) ---------------------------------------------
# The value checks (ids in range, finite weights) live here, in the ops' real
# implementations: they run for real tensors, eager or compiled, and never while
# torch.compile traces (the fake implementations below run then). CPU tensors: a ValueError
# naming the argument. CUDA tensors: torch._assert_async (no host synchronisation; a failure
# surfaces as a device-side assert at the next synchronisation and ends the CUDA context),
# or nothing when validate=False (the kernels skip out-of-range ids, never write out of
# bounds).
def _check_ids_in_range(task_ids: torch.Tensor, k: int, k_from: str) -> None:
    if task_ids.numel() == 0:
        return
    if task_ids.device.type == "cuda":
        torch._assert_async(((task_ids >= 0) & (task_ids < k)).all(),
                            f"task_ids: expected every task id in [0, {k}) ({k_from}={k})")
        return
    bad = (task_ids < 0) | (task_ids >= k)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"task_ids: entry {i} is {int(task_ids[i])}, expected a task id in [0, {k}) "
                         f"({k_from}={k})")


def _check_finite_weights(w: torch.Tensor) -> None:
    ok = torch.isfinite(w).all()
    if w.device.type == "cuda":
        torch._assert_async(ok, "task_weights: expected finite weights")
    elif not bool(ok):
        raise ValueError(f"task_weights: expected finite weights, got {w.cpu().tolist()}")


def _masked_sum_kernel(values: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """sums[K], counts[K] on ``backend`` ("cpu", "cuda" or "torch"); ids already checked."""
    v, m = _plain(values), _plain(mask)
    ids = _plain(task_ids if task_ids.dtype == torch.int64 else task_ids.to(torch.int64))
    if backend == "torch":
        return task_masked_sum_ref(v, m, ids, num_tasks)
    C = _native.native()
    vtype, mkind = _VALUE_TYPE[v.dtype], _mask_kind(m.dtype)
    if backend == "cuda":
        n, t = v.shape
        acc = accumulate_dtype(v.dtype)
        sums = torch.empty(num_tasks, dtype=acc, device=v.device)
        counts = torch.empty(num_tasks, dtype=torch.int64, device=v.device)
        plan = C.task_masked_sum_plan(n, t, num_tasks)
        nbytes = plan["workspace_bytes_f64" if acc == torch.float64 else "workspace_bytes_f32"]
        with torch.cuda.device(v.device):
            ws = torch.empty(nbytes, dtype=torch.uint8, device=v.device)
            C.task_masked_sum_cuda(v.data_ptr(), vtype, m.data_ptr(), mkind, ids.data_ptr(), n, t,
                                   num_tasks, sums.data_ptr(), counts.data_ptr(), ws.data_ptr(), nbytes,
                                   _cuda_stream(v.device))
        return sums, counts
    # "cpu": the C++ path checks the ids itself, in the same pass.
    return _masked_sum_cpu(v, m, ids, num_tasks)


def _masked_sum_cpu(v: torch.Tensor, m: torch.Tensor, ids: torch.Tensor, num_tasks: int):
    """The C++ call on contiguous CPU tensors without grad (int64 ``ids``): numpy views (an
    integer view where numpy lacks the dtype), one table look-up per dtype."""
    vview, mview, mkind = _VALUE_NP_VIEW[v.dtype], _MASK_NP_VIEW.get(m.dtype), _MASK_KIND.get(m.dtype)
    sums, counts = _native.native().task_masked_sum_cpu(
        (v if vview is None else v.view(vview)).numpy(), _VALUE_TYPE[v.dtype],
        (m if mview is None else m.view(mview)).numpy(), _mask_kind(m.dtype) if mkind is None else mkind,
        ids.numpy(), num_tasks)
    return torch.from_numpy(sums), torch.from_numpy(counts)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` without autograd history, contiguous (no new tensor when it already is: the
    detach and the dtype conversion above cost ~1 us each on a small call)."""
    return (t.detach() if t.requires_grad else t).contiguous()


def _np(t: torch.Tensor, view: torch.dtype | None) -> np.ndarray:
    """A contiguous CPU tensor as a numpy array, through an integer view of the same itemsize
    when numpy lacks its dtype (``view`` None: numpy has it, no view op needed)."""
    return (t if view is None else t.view(view)).numpy()


def _mask_np_view(dtype: torch.dtype) -> torch.dtype | None:
    """The view `_np` needs for a mask: none for numpy dtypes (bool, ints, f16/32/64; the C++
    side reads only the itemsize and the mask kind), int16 for bfloat16."""
    return _MASK_NP_VIEW.get(dtype)


def _scatter_grad_kernel(table: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor,
                         backend: str) -> torch.Tensor:
    """``out[n,t] = mask[n,t] ? table[task_ids[n]] : 0`` in ``table.dtype``."""
    m = mask.detach().contiguous()
    ids = task_ids.detach().to(torch.int64).contiguous()
    tab = table.detach().contiguous()
    if backend == "torch":
        return torch.where(m != 0, tab[ids][:, None], torch.zeros((), dtype=tab.dtype, device=tab.device))
    C = _native.native()
    if backend == "cuda":
        out = torch.empty(m.shape, dtype=tab.dtype, device=m.device)
        with torch.cuda.device(m.device):
            C.task_weighted_grad_cuda(out.data_ptr(), _itemsize(tab.dtype), m.data_ptr(), _mask_kind(m.dtype),
                                      ids.data_ptr(), tab.data_ptr(), m.shape[0], m.shape[1], tab.shape[0],
                                      _cuda_stream(m.device))
        return out
    out = cpu_empty(tuple(m.shape), tab.dtype)  # large: a reused buffer (no page faults on the write)
    ints = _INT_VIEW[_itemsize(tab.dtype)]
    C.task_weighted_grad_cpu(out.view(ints).numpy(), _np(m, _mask_np_view(m.dtype)), _mask_kind(m.dtype), ids.numpy(),
                             tab.view(ints).numpy())
    return out


def _weighted_terms(sums: torch.Tensor, counts: torch.Tensor, w: torch.Tensor, normalize: str):
    """(loss, coef, dw) from the per-task sums: ``coef[k] = d loss / d token of task k``,
    ``dw[k] = d loss / d w_k``. K-element torch ops on the sums' device (no host sync)."""
    if normalize == "task-token-mean":
        has = counts > 0
        denom = counts.clamp_min(1).to(sums.dtype)
        zero = torch.zeros_like(sums)
        per_task = torch.where(has, sums / denom, zero)
        return (w * per_task).sum(), torch.where(has, w / denom, zero), per_task
    total = counts.sum().clamp_min(1).to(sums.dtype)  # "token-mean"
    return (w * sums).sum() / total, w / total, sums / total


# ---- the custom ops (one per public op, plus the shared backward scatter) ----------------
@torch.library.custom_op("mtgrpo::task_masked_sum", mutates_args=())
def _task_masked_sum_op(values: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                        backend: str, validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if validate and backend != "cpu":  # the C++ path checks the ids in its own pass
        _check_ids_in_range(task_ids, num_tasks, "num_tasks")
    return _masked_sum_kernel(values, mask, task_ids, num_tasks, backend)


@_task_masked_sum_op.register_fake
def _task_masked_sum_fake(values, mask, task_ids, num_tasks, backend, validate):
    acc = accumulate_dtype(values.dtype)
    return values.new_empty((num_tasks,), dtype=acc), values.new_empty((num_tasks,), dtype=torch.int64)


@torch.library.custom_op("mtgrpo::task_masked_sum_backward", mutates_args=())
def _task_masked_sum_backward_op(table: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor,
                                 backend: str) -> torch.Tensor:
    """The backward kernel of both ops: ``out[n,t] = mask[n,t] ? table[task_ids[n]] : 0``."""
    return _scatter_grad_kernel(table, mask, task_ids, backend)


@_task_masked_sum_backward_op.register_fake
def _task_masked_sum_backward_fake(table, mask, task_ids, backend):
    return mask.new_empty(mask.shape, dtype=table.dtype)


def _scatter_grad(table: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor, backend: str) -> torch.Tensor:
    """The backward scatter from inside a backward: in a plain eager CPU backward (no trace, no
    mode, no meta tensors, no double backward) the C++ kernel directly, which is what the op runs, without its dispatch
    (~25 us: an eighth of a 1M-token backward); otherwise the op, so a trace records it."""
    if backend == "cpu" and mask.device.type == "cpu" and eager_plain(table, mask, task_ids):
        return _scatter_grad_kernel(table, mask, task_ids, backend)
    return torch.ops.mtgrpo.task_masked_sum_backward(table, mask, task_ids, backend)


def _sum_setup_context(ctx, inputs, output):
    values, mask, task_ids, _, backend, _ = inputs
    ctx.save_for_backward(mask, task_ids)
    ctx.values_dtype = values.dtype
    ctx.backend = backend


def _sum_backward(ctx, grad_sums, grad_counts):
    if grad_sums is None:
        return None, None, None, None, None, None
    mask, task_ids = ctx.saved_tensors
    table = grad_sums.to(ctx.values_dtype)
    grad = _scatter_grad(table, mask, task_ids, ctx.backend)
    return grad, None, None, None, None, None


_task_masked_sum_op.register_autograd(_sum_backward, setup_context=_sum_setup_context)


@torch.library.custom_op("mtgrpo::task_weighted_loss", mutates_args=())
def _task_weighted_loss_op(token_loss: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor,
                           task_weights: torch.Tensor, normalize: str, backend: str,
                           validate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (loss [], coef [K], dw [K]); coef and dw are the saved gradient factors (the public
    function returns only the loss)."""
    return _weighted_loss_impl(token_loss, mask, task_ids, task_weights, normalize, backend, validate)


def _weighted_loss_impl(token_loss, mask, task_ids, task_weights, normalize: str, backend: str, validate: bool):
    """What ``mtgrpo::task_weighted_loss`` computes (the op and the eager CPU path both call it)."""
    k = task_weights.shape[0]
    if validate:
        if backend != "cpu":
            _check_ids_in_range(task_ids, k, "len(task_weights)")
        _check_finite_weights(task_weights.detach())
    try:
        sums, counts = _masked_sum_kernel(token_loss, mask, task_ids, k, backend)
    except ValueError as e:  # the C++ path's own id check (same pass): say where K came from
        raise ValueError(f"{e} (len(task_weights)={k})") from None
    loss, coef, dw = _weighted_terms(sums, counts, task_weights.detach().to(sums.dtype), normalize)
    return loss, coef, dw


@_task_weighted_loss_op.register_fake
def _task_weighted_loss_fake(token_loss, mask, task_ids, task_weights, normalize, backend, validate):
    acc = accumulate_dtype(token_loss.dtype)
    k = task_weights.shape[0]
    return (token_loss.new_empty((), dtype=acc), token_loss.new_empty((k,), dtype=acc),
            token_loss.new_empty((k,), dtype=acc))


def _loss_setup_context(ctx, inputs, output):
    token_loss, mask, task_ids, task_weights, _, backend, _ = inputs
    _, coef, dw = output
    ctx.save_for_backward(mask, task_ids, coef, dw)
    ctx.loss_dtype, ctx.weights_dtype, ctx.backend = token_loss.dtype, task_weights.dtype, backend


def _loss_grads(ctx, grad_loss, need_x: bool, need_w: bool):
    """(d token_loss, d task_weights) from the saved (mask, task_ids, coef, dw)."""
    mask, task_ids, coef, dw = ctx.saved_tensors
    grad_x = grad_w = None
    if need_x:  # skip the [N, T] write when only the weights need a gradient
        table = (coef * grad_loss).to(ctx.loss_dtype)
        grad_x = _scatter_grad(table, mask, task_ids, ctx.backend)
    if need_w:
        grad_w = (dw * grad_loss).to(ctx.weights_dtype)
    return grad_x, grad_w


def _loss_backward(ctx, grad_loss, grad_coef, grad_dw):
    # coef and dw are internal outputs: only the loss's gradient flows back.
    if grad_loss is None:
        return None, None, None, None, None, None, None
    grad_x, grad_w = _loss_grads(ctx, grad_loss, ctx.needs_input_grad[0], ctx.needs_input_grad[3])
    return grad_x, None, None, grad_w, None, None, None


_task_weighted_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


class _EagerWeightedLoss(torch.autograd.Function):
    """The op's forward and backward for a plain eager CPU call, without the custom op's
    dispatch and autograd wrappers (a 4 x 8 forward + backward: ~300 us through the op)."""

    @staticmethod
    def forward(ctx, token_loss, task_weights, mask, task_ids, normalize, validate):
        out = _weighted_loss_impl(token_loss, mask, task_ids, task_weights, normalize, "cpu", validate)
        _loss_setup_context(ctx, (token_loss, mask, task_ids, task_weights, normalize, "cpu", validate), out)
        return out[0]

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = _loss_grads(ctx, grad_loss, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_x, grad_w, None, None, None, None


# ---- validation ---------------------------------------------------------------------------
def _check_values(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [N, T], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected shape [N, T] (2-d), got {tuple(x.shape)}")
    if x.dtype not in _VALUE_TYPE:
        raise TypeError(f"{name}: expected float32, float64, bfloat16 or float16, got {x.dtype}")


def _check_common(values: torch.Tensor, name: str, mask, task_ids) -> None:
    _check_values(values, name)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask: expected a torch.Tensor [N, T], got {type(mask).__name__}")
    shape = values.shape
    if mask.shape != shape:
        raise ValueError(f"mask: expected shape {tuple(shape)} like {name}, got {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"mask: expected bool or a real numeric dtype, got {mask.dtype}")
    on_cpu = values.is_cpu  # CPU tensors share the one CPU device: no device objects to compare
    if not (on_cpu and mask.is_cpu) and mask.device != values.device:
        raise ValueError(f"mask: expected device {values.device} like {name}, got {mask.device}")
    if not isinstance(task_ids, torch.Tensor):
        raise TypeError(f"task_ids: expected an integer torch.Tensor [N], got {type(task_ids).__name__}")
    if task_ids.dim() != 1 or task_ids.shape[0] != shape[0]:
        raise ValueError(f"task_ids: expected shape [{shape[0]}] (one task id per row of {name}), "
                         f"got {tuple(task_ids.shape)}")
    if task_ids.dtype not in _INT_ID_DTYPES and (task_ids.dtype == torch.bool or task_ids.is_floating_point()
                                                 or task_ids.is_complex()):
        raise TypeError(f"task_ids: expected an integer dtype, got {task_ids.dtype}")
    if not (on_cpu and task_ids.is_cpu) and task_ids.device != values.device:
        raise ValueError(f"task_ids: expected device {values.device} like {name}, got {task_ids.device}")


_INT_ID_DTYPES = (torch.int64, torch.int32)  # the usual ids: accepted without the three dtype tests


def _check_num_tasks(num_tasks) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral):
        raise TypeError(f"num_tasks: expected an int, got {type(num_tasks).__name__}")
    k = int(num_tasks)
    if not 1 <= k <= MAX_TASKS:
        raise ValueError(f"num_tasks: expected 1 <= num_tasks <= {MAX_TASKS}, got {k}")
    return k


# ---- public functions ---------------------------------------------------------------------
def _check_validate(validate) -> None:
    if not isinstance(validate, bool):
        raise TypeError(f"validate: expected a bool, got {type(validate).__name__}")


def task_masked_sum(values: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                    backend: str = "auto", validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task sum and count of the masked values, deterministic.

    Parameters
    ----------
    values : Tensor [N, T], float32 / float64 / bfloat16 / float16
    mask : Tensor [N, T], bool or any real numeric dtype (0/1; nonzero = selected)
    task_ids : Tensor [N], integer, each in ``[0, num_tasks)``
    num_tasks : int, ``1 <= K <= 4096``
    backend : "auto" | "cpu" | "cuda" | "torch"
    validate : bool
        Check that every task id is in range. CPU tensors: a ValueError naming task_ids.
        CUDA tensors: ``torch._assert_async`` (no host synchronisation; a bad id fails at the
        next synchronisation as a device-side assert). False skips the check on CUDA and in
        the reference; the CUDA kernels then ignore out-of-range ids (the C++ CPU path
        always checks them).

    Returns
    -------
    sums : Tensor [K], float32 (float64 for float64 values), on values' device;
        differentiable in ``values`` (``d sums[k] / d values[n,t] = mask[n,t] * [task_ids[n] == k]``)
    counts : Tensor [K], int64

    Raises
    ------
    TypeError, ValueError
        An argument has the wrong type, shape, device or range (the message names it).
    """
    _check_common(values, "values", mask, task_ids)
    k = num_tasks if type(num_tasks) is int and 1 <= num_tasks <= MAX_TASKS else _check_num_tasks(num_tasks)
    _check_validate(validate)
    be = resolve_backend("task_masked_sum", backend, values.device)
    if be == "cpu" and values.device.type == "cpu" and eager_plain(values, mask, task_ids):
        # what the op runs (_masked_sum_kernel's "cpu" branch), without its dispatch
        ids = task_ids if task_ids.dtype == torch.int64 else task_ids.to(torch.int64)
        return _masked_sum_cpu(values.contiguous(), mask.contiguous(), ids.contiguous(), k)
    return torch.ops.mtgrpo.task_masked_sum(values, mask, task_ids, k, be, validate)


def _as_weights(task_weights, like: torch.Tensor) -> torch.Tensor:
    if isinstance(task_weights, torch.Tensor):
        w = task_weights
        if w.device != like.device:
            raise ValueError(f"task_weights: expected device {like.device} like token_loss, got {w.device}")
    elif isinstance(task_weights, (np.ndarray, Sequence)) and not isinstance(task_weights, (str, bytes)):
        try:
            w = torch.as_tensor(np.asarray(task_weights, dtype=np.float64), device=like.device)
        except (TypeError, ValueError) as e:
            raise TypeError(f"task_weights: expected a 1-d sequence of numbers, got {task_weights!r}") from e
    else:
        raise TypeError(f"task_weights: expected a torch.Tensor [K] (or numpy array / sequence), "
                        f"got {type(task_weights).__name__}")
    if w.dim() != 1:
        raise ValueError(f"task_weights: expected shape [K] (1-d), got {tuple(w.shape)}")
    if not w.is_floating_point():
        if w.is_complex() or w.dtype == torch.bool:
            raise TypeError(f"task_weights: expected a real dtype, got {w.dtype}")
        w = w.to(accumulate_dtype(like.dtype))
    return w


def task_weighted_loss(token_loss: torch.Tensor, mask: torch.Tensor, task_ids: torch.Tensor, task_weights,
                       normalize: str = "task-token-mean", backend: str = "auto",
                       validate: bool = True) -> torch.Tensor:
    """Multi-task weighted loss ``sum_k w_k * (mean of task k's masked token losses)``.

    Parameters
    ----------
    token_loss : Tensor [N, T], float32 / float64 / bfloat16 / float16 (differentiable)
    mask : Tensor [N, T], bool or 0/1 of any real dtype
    task_ids : Tensor [N], integer in ``[0, K)``
    task_weights : Tensor [K] (differentiable; or a numpy array / sequence), finite; K <= 4096
    normalize : "task-token-mean"
        ``sum_k w_k * sums[k] / counts[k]`` (tasks with no token contribute 0), or
        "token-mean": ``sum_k w_k * sums[k] / sum_k counts[k]`` (0 when no token at all).
    backend : "auto" | "cpu" | "cuda" | "torch"
    validate : bool
        Check the task ids' range and that the weights are finite: a ValueError on CPU
        tensors, ``torch._assert_async`` on CUDA tensors (no host synchronisation); False
        skips both checks.

    Returns
    -------
    Tensor [], float32 (float64 for float64 token_loss). Backward:
    ``d/d token_loss[n,t] = w_k * mask[n,t] / count_k`` (or ``/ total count``), in
    token_loss's dtype; ``d/d w_k = sums[k] / counts[k]`` (or ``/ total count``).

    Raises
    ------
    TypeError, ValueError
        An argument has the wrong type, shape, device or range, task_weights are not
        finite, or normalize is unknown (the message names the argument).
    """
    _check_common(token_loss, "token_loss", mask, task_ids)
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize: expected one of {NORMALIZE_MODES}, got {normalize!r}")
    w = _as_weights(task_weights, token_loss)
    k = w.shape[0]
    if not 1 <= k <= MAX_TASKS:
        raise ValueError(f"task_weights: expected 1 <= len(task_weights) <= {MAX_TASKS}, got {k}")
    _check_validate(validate)
    be = resolve_backend("task_weighted_loss", backend, token_loss.device)
    if be == "cpu" and token_loss.device.type == "cpu" and eager_direct(token_loss, mask, task_ids, w):
        # what the op runs, forward and backward, without its dispatch (traces record the op)
        return _EagerWeightedLoss.apply(token_loss, w, mask, task_ids, normalize, validate)
    return torch.ops.mtgrpo.task_weighted_loss(token_loss, mask, task_ids, w, normalize, be, validate)[0]
