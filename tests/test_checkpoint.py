"""Checkpoint safety and integrity (issue 16, items 10 and 12): weights_only loading that
refuses a code-running pickle, a SHA-256 verified on load, stale temporary files of a killed
writer removed, and every verifier counter restored on resume."""
import hashlib
import io
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from mtgrpo_core.train import checkpoint as ck


def _state():
    s = np.random.default_rng(5)
    return {
        "model": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)},
        "rng": ck.rng_state(),
        "batch_rng": s.bit_generator.state,          # 128-bit Python ints
        "arrays": [np.arange(5, dtype=np.uint32), np.array([-1, 2], np.int8), np.array([True, False]),
                   np.zeros((0, 3)), np.float64(2.5), np.int64(-7)],
        "tuple": (1, "a", None, 2.0),
        "nested": {"x": {"y": [np.eye(2)]}},
    }


def _eq(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (np.ndarray, np.generic)):
        return type(a) is type(b) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return a == b


def test_round_trip_is_exact_and_rng_state_restores(tmp_path):
    st = _state()
    p = ck.save_atomic(st, tmp_path / "c.pt")
    back = ck.load(p)
    assert _eq(st, back)
    # the restored RNG states reproduce the same draws
    ck.set_rng_state(back["rng"])
    a = (torch.rand(3), np.random.rand(3), random.random())
    ck.set_rng_state(back["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


class _Payload:
    """Unpickling this runs os.system(...) (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _with_header(payload: bytes) -> bytes:
    # an attacker can compute the checksum too: the header alone is no protection
    return ck.MAGIC + struct.pack("<Q", len(payload)) + hashlib.sha256(payload).digest() + payload


@pytest.mark.parametrize("wrap", ["header", "bare"])
def test_crafted_pickle_does_not_execute(tmp_path, wrap):
    marker = tmp_path / "pwned"
    # the exploit works with a plain unpickler (so the test would catch a weights_only=False load)
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    buf = io.BytesIO()
    torch.save({"model": {}, "evil": _Payload(marker)}, buf)
    data = _with_header(buf.getvalue()) if wrap == "header" else buf.getvalue()
    p = tmp_path / "checkpoint.pt"
    p.write_bytes(data)
    with pytest.raises(ck.CheckpointCorruptError, match="checkpoint is corrupt"):
        ck.load(p)
    assert not marker.exists()


def test_truncated_and_flipped_checkpoints_are_detected(tmp_path):
    p = ck.save_atomic(_state(), tmp_path / "c.pt")
    good = p.read_bytes()
    for n in (0, 10, len(ck.MAGIC) + 20, len(good) // 2, len(good) - 1):
        p.write_bytes(good[:n])
        with pytest.raises(ck.CheckpointCorruptError, match="checkpoint is corrupt"):
            ck.load(p)
    for pos in (len(good) // 2, len(good) - 1, len(ck.MAGIC) + 9):
        bad = bytearray(good)
        bad[pos] ^= 0x01
        p.write_bytes(bytes(bad))
        with pytest.raises(ck.CheckpointCorruptError, match="checkpoint is corrupt"):
            ck.load(p)
    p.write_bytes(good)
    assert ck.load(p)["tuple"] == (1, "a", None, 2.0)   # the intact file still loads


def test_sigkill_during_write_leaves_a_temp_file_that_the_next_save_or_load_removes(tmp_path):
    target = tmp_path / "checkpoint.pt"
    ck.save_atomic({"step": 1}, target)
    # a writer killed between write and rename (SIGKILL from inside fsync)
    code = textwrap.dedent(f"""
        import os, signal, torch
        from mtgrpo_core.train import checkpoint as ck
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        ck.save_atomic({{"step": 2, "w": torch.zeros(1000)}}, {str(target)!r})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    stale = [f for f in tmp_path.iterdir() if f.name.startswith(".checkpoint.pt.tmp.")]
    assert len(stale) == 1 and stale[0].stat().st_size > 0
    # a temp file of a live process (this one) is left alone
    live = tmp_path / f".checkpoint.pt.tmp.{os.getpid()}"
    live.write_bytes(b"in progress")
    assert ck.load(target)["step"] == 1        # the old checkpoint is intact
    assert not stale[0].exists() and live.exists()
    live.unlink()
    ck.write_text_atomic(tmp_path / "x.txt", "x")
    (tmp_path / ".checkpoint.pt.tmp.999999999").write_bytes(b"")   # no such pid
    ck.save_atomic({"step": 3}, target)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint.pt", "x.txt"]
    assert ck.load(target)["step"] == 3


def test_object_arrays_are_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match="object"):
        ck.save_atomic({"a": np.array([object()])}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_verifier_stats_survive_a_checkpoint_round_trip(tmp_path):
    """Trainer.save_checkpoint stores every counter and load_checkpoint restores them."""
    from mtgrpo_core.train import config as C
    from mtgrpo_core.train.trainer import Trainer

    tiny = ["run.threads=1", "run.progress=false", "model.hidden_size=16", "model.intermediate_size=32",
            "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.num_key_value_heads=2",
            "model.max_position_embeddings=64", "tasks.train_size=40", "tasks.test_size=10"]
    cfg = C.load_config(None, tiny, algo="grpo", out=str(tmp_path / "run"))
    a = Trainer(cfg)
    counters = {"timeouts": 3, "errors": 5, "rejected": 11}
    a.suite.load_verifier_stats(counters)
    a.save_checkpoint()
    b = Trainer(cfg)
    assert b.suite.verifier_stats == {"timeouts": 0, "errors": 0, "rejected": 0}
    b.load_checkpoint(tmp_path / "run" / ck.CKPT_NAME)
    assert b.suite.verifier_stats == counters
    with pytest.raises(ValueError, match="unknown counter"):
        b.suite.load_verifier_stats({"bogus": 1})
    with pytest.raises(ValueError, match="integer >= 0"):
        b.suite.load_verifier_stats({"errors": -1})
    assert b.suite.verifier_stats == counters
