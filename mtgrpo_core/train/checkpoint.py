"""Safe, verified, atomic checkpoints: one file, written to a temporary name then ``os.replace``-d.

A checkpoint holds everything a resumed run needs to continue exactly: model, optimiser,
controllers, sampler, difficulty classifier, generator RNG, the torch / numpy / python RNG
states, the step, the verifier counters and the number of metric lines already written.

Safety
    Loading never unpickles arbitrary objects: the payload is read with
    ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers
    (dict, list, tuple, str, int, float, bool, None). Numpy arrays and scalars, which the
    sampler and RNG states contain, are stored as ``{"__mtgrpo_ndarray__": dtype, "shape",
    "data": uint8 tensor}`` and rebuilt with ``np.frombuffer`` (no pickle); a crafted file
    that tries to run code raises instead of running it.

Integrity
    File layout: the 16-byte magic ``MTGRPO-CKPT-v2\\n\\0``, the payload length (8 bytes,
    little endian), the SHA-256 of the payload (32 bytes), then the payload (``torch.save``
    bytes). :func:`load` checks all three and raises :class:`CheckpointCorruptError`
    ("checkpoint is corrupt: ...") on a truncated file or any flipped byte, before torch
    parses anything. Hashing costs ~2 ms/MB (the CPU runs' checkpoints are a few MB).

Atomicity
    A reader never sees a half-written file: ``os.replace`` is atomic on POSIX, and the
    temporary file is fsync-ed first so a crash cannot leave a renamed but empty checkpoint.
    A writer killed mid-write (SIGKILL) leaves ``.<name>.tmp.<pid>``; :func:`remove_stale_tmp`
    deletes those whose process is gone, and runs before every save and load.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = ["CKPT_NAME", "CheckpointCorruptError", "save_atomic", "load", "remove_stale_tmp", "rng_state",
           "set_rng_state", "write_text_atomic"]

CKPT_NAME = "checkpoint.pt"
MAGIC = b"MTGRPO-CKPT-v2\n\0"
_HEADER = len(MAGIC) + 8 + 32
_ND = "__mtgrpo_ndarray__"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp\.(?P<pid>\d+)$")


class CheckpointCorruptError(ValueError):
    """A checkpoint file that is truncated, altered or not a checkpoint at all."""


# ------------------------------------------------------------------------------ RNG state
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


# ------------------------------------------------------------------------------ encoding
def _encode(obj):
    """Plain containers + tensors only (what ``weights_only=True`` can load back)."""
    if isinstance(obj, np.ndarray) or isinstance(obj, np.generic):
        a = np.asarray(obj)
        if a.dtype.hasobject:
            raise TypeError(f"checkpoint: object arrays cannot be stored safely (dtype {a.dtype})")
        raw = np.ascontiguousarray(a).tobytes()
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
        return {_ND: a.dtype.str, "shape": list(a.shape), "scalar": isinstance(obj, np.generic), "data": data}
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_encode(v) for v in obj)
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj):
    if isinstance(obj, dict):
        if _ND in obj:
            dt = np.dtype(obj[_ND])
            if dt.hasobject:
                raise CheckpointCorruptError(f"checkpoint is corrupt: object dtype {dt} in an array")
            raw = obj["data"].numpy().tobytes()
            a = np.frombuffer(raw, dtype=dt).reshape(obj["shape"]).copy()
            return a[()] if obj.get("scalar") else a
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_decode(v) for v in obj)
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------ files
def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete ``.<name>.tmp.<pid>`` files in ``folder`` left by writers that died (no
    process with that pid is running). Returns the removed paths."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _TMP_RE.match(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _pid_alive(pid):
            continue  # a live process (maybe this one) may be writing it
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    try:  # make the rename itself durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover
        pass


def save_atomic(obj, path: str | Path) -> Path:
    """Write ``obj`` (tensors, numpy arrays, plain containers) to ``path`` atomically, with
    the header and SHA-256 described in the module docstring."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path.parent)
    buf = io.BytesIO()
    torch.save(_encode(obj), buf)
    payload = buf.getbuffer()
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", len(payload)))
            f.write(hashlib.sha256(payload).digest())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def load(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_atomic`.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    CheckpointCorruptError
        (a ValueError) "checkpoint is corrupt: ..." when the header, length or SHA-256 does
        not match, or the payload is not a plain-data checkpoint (e.g. a pickle that would
        run code).
    """
    path = Path(path)
    remove_stale_tmp(path.parent)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER or data[:len(MAGIC)] != MAGIC:
        hint = " (a bare torch.save file from an older mtgrpo_core? it cannot be verified)" \
            if data[:2] == b"PK" else ""
        raise CheckpointCorruptError(f"checkpoint is corrupt: {path} does not start with the mtgrpo_core "
                                     f"checkpoint header ({len(data)} bytes){hint}")
    (n,) = struct.unpack("<Q", data[len(MAGIC):len(MAGIC) + 8])
    digest = data[len(MAGIC) + 8:_HEADER]
    payload = memoryview(data)[_HEADER:]
    if len(payload) != n:
        raise CheckpointCorruptError(f"checkpoint is corrupt: {path} is truncated or padded "
                                     f"(payload {len(payload)} bytes, header says {n})")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointCorruptError(f"checkpoint is corrupt: {path} fails its SHA-256 check "
                                     "(a byte changed after it was written)")
    try:
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for forbidden globals, ...
        raise CheckpointCorruptError(f"checkpoint is corrupt: {path} holds data that is not plain tensors "
                                     f"and containers ({type(e).__name__}: {str(e)[:200]})") from None
    return _decode(obj)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
