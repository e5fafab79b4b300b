"""The one place that picks a backend for an op.

``backend="auto"`` picks the fastest backend that can run on the tensors' device and falls
back quietly; an explicitly requested backend that cannot run raises ``RuntimeError`` with
the reason. The environment variable ``MTGRPO_BACKEND`` replaces ``"auto"`` (never an
explicit choice).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from .. import _native

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# For each op: the backends it has, in order of preference for "auto".
# "cpu" entries name the symbol of the C++ extension that implements it.
_OPS: dict[str, dict[str, str | None]] = {}


def register_op(op: str, *, triton: bool = False, cuda: str | None = None, cpu: str | None = None) -> None:
    """Declare which backends ``op`` has. ``cuda``/``cpu`` name the extension symbols."""
    _OPS[op] = {"triton": "triton" if triton else None, "cuda": cuda, "cpu": cpu}


def triton_usable(device: torch.device) -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'mtgrpo_core[triton]')"
    if device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True, ""
    return False, "triton needs CUDA tensors (or TRITON_INTERPRET=1 for the numpy interpreter)"


def _usable(op: str, backend: str, device: torch.device) -> tuple[bool, str]:
    spec = _OPS[op]
    if backend == "torch":
        return True, ""
    if device.type == "meta":
        # meta tensors only propagate shapes (the custom op's fake runs, no kernel): any backend
        # the op has can "run" them, so code written for one backend traces on the meta device
        ok = spec.get(backend) is not None
        return ok, "" if ok else f"{op} has no {backend} backend"
    if backend == "triton":
        if spec["triton"] is None:
            return False, f"{op} has no triton backend"
        return triton_usable(device)
    if backend == "cuda":
        if spec["cuda"] is None:
            return False, f"{op} has no cuda backend"
        if device.type != "cuda":
            return False, "the cuda backend needs CUDA tensors"
        if not _native.available() or not _native.native().BUILD_INFO["cuda_kernels_compiled"]:
            return False, "the extension was built without CUDA kernels (no nvcc at build time)"
        if not _native.has(spec["cuda"]):
            return False, f"the extension lacks {spec['cuda']}"
        return True, ""
    if backend == "cpu":
        if spec["cpu"] is None:
            return False, f"{op} has no cpu (C++) backend"
        if device.type != "cpu":
            return False, "the cpu backend needs CPU tensors"
        if not _native.has(spec["cpu"]):
            return False, "the C++ extension is not built (run `make build`)"
        return True, ""
    raise AssertionError(backend)


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Return the backend that will run ``op`` for tensors on ``device``.

    Under ``torch.compile`` the answer is computed once at trace time and baked into the
    graph as a constant (``assume_constant_result``): no graph break for the environment and
    package look-ups, which do not change while a process runs.

    Raises
    ------
    ValueError
        ``backend`` is not one of :data:`BACKENDS`.
    RuntimeError
        An explicitly requested backend cannot run here (the message says why).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if not torch.compiler.is_compiling():
        # eager: the answer of an earlier call with the same environment (a dict look-up
        # instead of ~2 us of checks on every small call). The variables matter only to
        # "auto" and "triton" (an explicit backend ignores MTGRPO_BACKEND): not read otherwise.
        if backend == "auto" or backend == "triton":
            key = (op, backend, device_type, *_env_values())
        else:
            key = (op, backend, device_type)
        hit = _RESOLVED.get(key)
        if hit is None:
            hit = _RESOLVED[key] = _resolve(op, backend, torch.device(device_type))
        return hit
    return _resolve_constant(op, backend, device_type)


# (op, backend, device type[, $MTGRPO_BACKEND, $TRITON_INTERPRET]) -> resolved backend. What else
# the answer depends on (the extension, triton's presence) does not change while a process runs.
_RESOLVED: dict[tuple, str] = {}

# The two variables as a cache key: ``os.environ.get`` encodes the name and decodes the value
# (~0.8 us each on a small call); os.environ's own dict of raw values (CPython's ``_Environ``,
# which every assignment to os.environ updates) answers the same question in ~0.05 us. The raw
# value only keys the cache: _resolve reads the variables through os.environ.
_ENVIRON = os.environ
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = None
if isinstance(_ENV_DATA, dict) and callable(getattr(os.environ, "encodekey", None)):
    _ENV_KEYS = (os.environ.encodekey("MTGRPO_BACKEND"), os.environ.encodekey("TRITON_INTERPRET"))


def _env_values() -> tuple:
    if _ENV_KEYS is not None and os.environ is _ENVIRON:
        return _ENV_DATA.get(_ENV_KEYS[0]), _ENV_DATA.get(_ENV_KEYS[1])
    return os.environ.get("MTGRPO_BACKEND"), os.environ.get("TRITON_INTERPRET")


def eager_direct(*tensors) -> bool:
    """True when a call may run its op's real implementation directly instead of through the
    ``torch.library`` custom op (whose dispatch costs ~12 us for task_masked_sum, ~50 us for
    grpo_loss: most of a small call): eager (not traced by torch.compile or torch.jit.trace: a
    trace must record the op), no torch-function or
    dispatch mode active (FakeTensorMode, make_fx, FlopCounterMode, ...), no functorch transform
    (vmap, grad), and every argument a plain ``torch.Tensor`` (or None). Gradients are the
    caller's business (see :func:`eager_plain`). The result is the same either way: the custom
    op calls the same implementation."""
    if not _eager_state_plain():
        return False
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor:
            return False
    return True


def eager_plain(*tensors: torch.Tensor) -> bool:
    """:func:`eager_direct` for tensors (no None), and none of them needing a gradient (then the
    op's autograd is not needed either)."""
    if not _eager_state_plain():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if type(t) is not torch.Tensor or (grad and t.requires_grad):
            return False
    return True


def _eager_state_plain() -> bool:
    """Not traced (torch.compile, torch.jit.trace), no torch-function or dispatch mode, no
    functorch transform."""
    return not (torch.compiler.is_compiling() or _torch_function_mode_enabled() or _dispatch_stack_len()
                or _peek_functorch() is not None or _jit_tracing_state() is not None)


_torch_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_dispatch_stack_len = torch._C._len_torch_dispatch_stack
_peek_functorch = torch._C._functorch.peek_interpreter_stack
_jit_tracing_state = torch._C._get_tracing_state


def _resolve_constant(op: str, backend: str, device_type: str) -> str:
    return _resolve(op, backend, torch.device(device_type))


# torch.compiler.assume_constant_result(_resolve_constant): a trace takes the answer as a constant.
# The public decorator imports torch._dynamo (1.7 s at every `import mtgrpo_core.ops`, in every
# process); what it does is set this attribute (torch/_dynamo/decorators.py, checked by
# tests/test_small_calls.py), so it is set directly unless dynamo is already loaded.
if "torch._dynamo" in sys.modules:
    _resolve_constant = torch.compiler.assume_constant_result(_resolve_constant)
else:
    _resolve_constant._dynamo_marked_constant = True


def _resolve(op: str, backend: str, device: torch.device) -> str:
    if op not in _OPS:
        raise AssertionError(f"op {op!r} was not registered with the dispatcher")
    if backend == "auto":
        env = os.environ.get("MTGRPO_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"MTGRPO_BACKEND: expected one of {BACKENDS}, got {env!r}")
        backend = env
    if backend != "auto":
        ok, why = _usable(op, backend, device)
        if not ok:
            raise RuntimeError(f"backend={backend!r} cannot run {op} here: {why}")
        return backend
    order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
    for cand in order:
        if _usable(op, cand, device)[0]:
            return cand
    return "torch"
