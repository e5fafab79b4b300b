"""The library's disk cache folder (generated task splits, Triton AOT compile results)."""
from __future__ import annotations

import os

#: values of ``$MTGRPO_CACHE_DIR`` that turn the disk cache off
OFF_VALUES = ("", "0", "off", "none", "false")


def cache_dir() -> str | None:
    """Folder of the disk cache: ``$MTGRPO_CACHE_DIR`` if set (``off``/``0``/empty disables
    it: None), else ``$XDG_CACHE_HOME/mtgrpo_core`` or ``~/.cache/mtgrpo_core``."""
    env = os.environ.get("MTGRPO_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in OFF_VALUES else env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mtgrpo_core")
