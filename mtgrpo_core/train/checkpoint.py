"""Atomic checkpoints: one file, written to a temporary name then ``os.replace``-d.

A checkpoint holds everything a resumed run needs to continue exactly: model, optimiser,
controllers, sampler, difficulty classifier, generator RNG, the torch / numpy / python RNG
states, the step and the number of metric lines already written. A reader never sees a
half-written file: ``os.replace`` is atomic on POSIX, and the temporary file is fsync-ed
first so a crash cannot leave a renamed but empty checkpoint.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CKPT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    st = {"torch": torch.random.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.random.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_atomic(obj, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (tmp file in the same folder + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover
        pass
    return path


def load(path: str | Path) -> dict:
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
