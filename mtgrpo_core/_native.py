"""Access to the compiled extension ``mtgrpo_core._C`` with an actionable error."""
from __future__ import annotations

from types import ModuleType

try:
    from . import _C as _EXT  # type: ignore[attr-defined]

    _IMPORT_ERROR = ""
except ImportError as exc:  # not built, or built against another Python
    _EXT = None
    _IMPORT_ERROR = str(exc)


def _load() -> ModuleType | None:
    return _EXT


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
            f"the pure-PyTorch reference instead. (import error: {_IMPORT_ERROR})"
        )
    return mod


def has(name: str) -> bool:
    """True when the extension exists and exports ``name``."""
    mod = _load()
    return mod is not None and hasattr(mod, name)
