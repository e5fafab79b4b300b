"""Access to the compiled extension ``mtgrpo_core._C`` with an actionable error."""
from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=1)
def _load() -> ModuleType | None:
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def available() -> bool:
    """True when the C++ extension was built and imports."""
    return _load() is not None


def native() -> ModuleType:
    """Return the extension module or raise an error that says how to build it."""
    mod = _load()
    if mod is None:
        raise RuntimeError(
            "mtgrpo_core._C (the C++/CUDA extension) is not built or failed to import. "
            "Build it with `make build` (or `pip install -e .`); pass backend='torch' to use "
            "the pure-PyTorch reference instead."
        )
    return mod


def has(name: str) -> bool:
    """True when the extension exists and exports ``name``."""
    mod = _load()
    return mod is not None and hasattr(mod, name)
