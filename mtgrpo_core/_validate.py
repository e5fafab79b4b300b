"""Input checks shared by the Python layers (controllers, sampler helpers, integrations, the
training config): each raises ValueError (or TypeError for a wrong kind of object) naming the
argument, what was expected and what was received."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["as_vector", "as_mask", "as_groups", "check_positive_int", "check_float", "check_choice", "check_state",
           "check_option", "check_number"]


def as_vector(name: str, x: Any, size: int | None = None, *, allow_none: bool = False,
              dtype=np.float64) -> np.ndarray | None:
    """``x`` as a finite 1-D float64 array of length ``size`` (ValueError naming ``name``)."""
    if x is None:
        if allow_none:
            return None
        raise ValueError(f"{name}: expected an array of length {size}, got None")
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected numbers, got {type(x).__name__} ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if size is not None and arr.shape[0] != size:
        raise ValueError(f"{name}: expected length {size}, got {arr.shape[0]}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected finite values, got {arr.tolist()[:8]}...")
    return arr


def as_mask(name: str, x: Any, size: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != size:
        raise ValueError(f"{name}: expected a boolean array of length {size}, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if not np.all(np.isin(arr, (0, 1))):
            raise ValueError(f"{name}: expected booleans (or 0/1), got {arr.tolist()[:8]}")
        arr = arr.astype(bool)
    return arr


def check_positive_int(name: str, v: Any, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    if maximum is not None and int(v) > maximum:
        raise ValueError(f"{name}: expected an integer in [{minimum}, {maximum}], got {v!r}")
    return int(v)


def check_int(name: str, v: Any, minimum: int = 0) -> int:
    """An integer >= ``minimum`` (ValueError naming ``name``); bools and floats are refused."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    return int(v)


def check_float(name: str, v: Any, lo: float = -math.inf, hi: float = math.inf, *,
                lo_open: bool = False, hi_open: bool = False) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {v!r}") from None
    bad = (not math.isfinite(f)) or f < lo or f > hi or (lo_open and f == lo) or (hi_open and f == hi)
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name}: expected a finite number in {lb}{lo}, {hi}{rb}, got {v!r}")
    return f


def check_choice(name: str, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {v!r}")
    return v


def check_state(d: Any, kind: str, **expect: Any) -> dict:
    if not isinstance(d, dict):
        raise ValueError(f"state_dict: expected a dict, got {type(d).__name__}")
    if d.get("type") != kind:
        raise ValueError(f"state_dict: expected type {kind!r}, got {d.get('type')!r}")
    for k, v in expect.items():
        if d.get(k) != v:
            raise ValueError(f"state_dict: {k} is {d.get(k)!r}, this object has {v!r}")
    return d


def as_groups(name: str, groups: Any, num_groups: int) -> np.ndarray:
    g = np.asarray(groups)
    if g.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D integer array, got shape {g.shape}")
    if g.size == 0:
        return g.astype(np.int64)
    if not np.issubdtype(g.dtype, np.integer):
        if g.dtype.kind == "f" and np.all(np.isfinite(g)) and np.all(g == np.round(g)):
            g = g.astype(np.int64)
        else:
            raise ValueError(f"{name}: expected integer group ids, got dtype {g.dtype}")
    lo, hi = int(g.min()), int(g.max())
    if lo < 0 or hi >= num_groups:
        raise ValueError(f"{name}: expected group ids in [0, {num_groups}), got range [{lo}, {hi}]")
    return g.astype(np.int64, copy=False)


def check_option(name: str, value: Any, options) -> None:
    """``value`` must be one of the strings ``options`` (ValueError otherwise)."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {options}, got {value!r}")


def check_number(name: str, value: Any, *, lo=None, hi=None, lo_open=False, optional=False, integer=False) -> None:
    """A real number (an int with ``integer=True``; None allowed with ``optional=True``), finite,
    within ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``): TypeError for the wrong kind of value,
    ValueError for a value out of range."""
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name}: expected {'an int' if integer else 'a number'}{' or None' if optional else ''}, "
                        f"got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name}: expected {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}: expected <= {hi}, got {value!r}")
