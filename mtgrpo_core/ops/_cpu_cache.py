"""The CPU output cache: large [N, T] outputs of the C++ path on buffers that are reused.

torch's CPU allocator hands out fresh pages for every large tensor (glibc maps each allocation of
32 MiB or more anew, and smaller ones after it trims its heap), so an op that returns a new
[N, T] tensor pays a page fault per 4 KiB on its first write: at 8M fp32 tokens that is more
than the backward scatter's own work. The ops here take such outputs from a cache
(``csrc/cpu_cache.cpp``): a buffer whose tensor was freed keeps its pages and serves the next
output of about its size (at most 1/4 larger), as torch's CUDA caching allocator does on a GPU.

- Only outputs of at least :data:`MIN_BYTES` go through it; smaller ones come from torch.
- Kept (free) bytes are bounded: ``MTGRPO_CPU_CACHE_MB`` (default 256; 0 turns the cache off),
  or :func:`set_cpu_cache_limit` at run time. :func:`empty_cpu_cache` unmaps what is kept.
- The tensors are ordinary CPU tensors (``torch.from_dlpack``), except that their storage cannot
  be resized in place (``Tensor.resize_`` to a larger size raises).
"""
from __future__ import annotations

import os

import torch

from .. import _native

MIN_BYTES = 1 << 20  # below this glibc's heap serves the size without fresh pages
DEFAULT_LIMIT_MB = 256

# torch dtype -> DLPack (code, bits): float 2, bfloat 4
_DL_DTYPE = {torch.float32: (2, 32), torch.float64: (2, 64), torch.float16: (2, 16), torch.bfloat16: (4, 16)}

_state = {"env_read": False}  # MTGRPO_CPU_CACHE_MB is read once, at the first use (the limit lives in C++)


def _limit_from_env() -> int:
    raw = os.environ.get("MTGRPO_CPU_CACHE_MB")
    if raw is None or raw.strip() == "":
        return DEFAULT_LIMIT_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"MTGRPO_CPU_CACHE_MB: expected a number of MiB (0 turns the CPU output cache off), "
                         f"got {raw!r}") from None
    if not mb >= 0 or mb == float("inf"):
        raise ValueError(f"MTGRPO_CPU_CACHE_MB: expected a finite number >= 0 of MiB, got {raw!r}")
    return int(mb * (1 << 20))


def _ext():
    C = _native.native()
    if not _state["env_read"]:
        C.cpu_cache_set_limit(_limit_from_env())
        _state["env_read"] = True
    return C


def cpu_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised C-contiguous CPU tensor of ``shape`` (1 or 2 dims) and float ``dtype``:
    from the output cache when it is at least :data:`MIN_BYTES` and the cache is on, else from
    torch. Callers write every element."""
    n = 1
    for s in shape:
        n *= s
    if dtype in _DL_DTYPE and n * dtype.itemsize >= MIN_BYTES and 1 <= len(shape) <= 2 and _native.available():
        code, bits = _DL_DTYPE[dtype]
        capsule = _ext().cpu_cache_empty(len(shape), shape[0], shape[-1], code, bits)
        if capsule is not None:  # None: the cache is off (limit 0)
            return torch.from_dlpack(capsule)
    return torch.empty(shape, dtype=dtype)


def cpu_empty_like(t: torch.Tensor) -> torch.Tensor:
    """:func:`cpu_empty` with ``t``'s shape and dtype (``t`` contiguous); a small one is
    ``torch.empty_like`` (~0.8 us less than ``torch.empty`` with a dtype: small calls)."""
    if t.numel() * t.element_size() < MIN_BYTES:
        return torch.empty_like(t)
    return cpu_empty(tuple(t.shape), t.dtype)


def cpu_cache_info() -> dict:
    """The CPU output cache's counters: ``cached_bytes`` / ``cached_blocks`` (kept, free),
    ``in_use_bytes`` (held by live tensors), ``peak_in_use_bytes`` (since the last
    :func:`reset_cpu_cache_peak`), ``limit_bytes``, ``hits``, ``misses``."""
    return dict(_ext().cpu_cache_info())


def empty_cpu_cache() -> int:
    """Unmap every buffer the cache keeps (not those of live tensors); returns the bytes
    released. Like ``torch.cuda.empty_cache`` for the CPU output cache."""
    return int(_ext().cpu_cache_release())


def set_cpu_cache_limit(megabytes: float) -> None:
    """Bound the bytes the cache keeps for reuse to ``megabytes`` MiB (0: keep none, so every
    large output is fresh memory, as from torch). Overrides ``MTGRPO_CPU_CACHE_MB``."""
    if isinstance(megabytes, bool) or not isinstance(megabytes, (int, float)):
        raise TypeError(f"megabytes: expected a number, got {type(megabytes).__name__}")
    if not megabytes >= 0 or megabytes == float("inf"):
        raise ValueError(f"megabytes: expected a finite number >= 0, got {megabytes!r}")
    _native.native().cpu_cache_set_limit(int(megabytes * (1 << 20)))
    _state["env_read"] = True


def reset_cpu_cache_peak() -> None:
    """Set ``peak_in_use_bytes`` to the bytes in use now (the benchmarks' peak memory)."""
    _ext().cpu_cache_reset_peak()
