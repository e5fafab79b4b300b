"""Answer grammars, exact in-process checkers and an isolated verifier pool.

What
    Rewards are computed on untrusted model text. This module gives three layers:

    1. Strict per-task answer grammars (:func:`check_grammar`): an answer that does not match
       is rejected before any parser sees it (reasoning-gym's countdown scorer hands the answer
       to ``sympy.parse_expr``, which *evaluates* it).
    2. Exact in-process checkers (:func:`fast_correct`) for grammar-checked answers:
       string/integer compares and a tiny countdown evaluator over :class:`fractions.Fraction`
       (recursive descent, no ``**``, bounded length and nesting). They reproduce
       reasoning-gym 0.1.25's ``score_answer(...) == 1.0`` decisions (tests check this on real
       items), including countdown's ``np.isclose`` tolerance.
    3. :class:`VerifierPool`: persistent worker processes (``forkserver`` or ``spawn``) that run
       reasoning-gym's own ``score_answer`` with a per-item time limit (a worker that goes
       silent is killed and replaced) and an address-space limit (``RLIMIT_AS``). A verifier
       that raises, hangs or dies yields status ``"error"``/``"timeout"``, never an exception
       in the caller. The pool is NOT a sandbox (see its docstring): workers confine
       themselves where Linux allows (private tmp dir, no network, no writes outside it),
       but only the grammars of layer 1 make it safe to feed them model output.

Cost
    Grammar + fast check: a few microseconds per answer (countdown ~10-20 us). Pool: one
    pickled message per batch chunk and one small message per item back.

Source
    Grammars and checkers written for this project from the behaviour of reasoning-gym 0.1.25
    (``games/countdown.py``, ``algorithmic/spell_backward.py``, ``logic/zebra_puzzles.py``,
    ``dataset.py`` default scorer used by ``basic_arithmetic`` and ``arc_1d``).
"""
from __future__ import annotations

import contextlib
import multiprocessing.context as _mpc
import os
import re
import sys
import time
import types
from collections import deque
from fractions import Fraction
from multiprocessing.connection import wait as _mp_wait
from typing import Any
from collections.abc import Sequence

__all__ = [
    "KINDS",
    "check_grammar",
    "extract_tagged_answer",
    "fast_correct",
    "countdown_value",
    "VerifierPool",
    "TEST_HOOKS",
]

KINDS = ("countdown", "spell_backward", "basic_arithmetic", "zebra_puzzles", "arc_1d")

# ---------------------------------------------------------------------------------------
# 1. Grammars (ASCII only: explicit classes + re.ASCII so unicode digits/letters never match)
# ---------------------------------------------------------------------------------------
_RE = {
    "countdown": re.compile(r"[0-9+\-*/() ]+", re.ASCII),
    "spell_backward": re.compile(r"[A-Za-z]+", re.ASCII),
    "basic_arithmetic": re.compile(r"-?[1-9][0-9]{0,11}|0", re.ASCII),
    "zebra_puzzles": re.compile(r"[A-Za-z]+(?: [A-Za-z]+){0,3}", re.ASCII),
    "arc_1d": re.compile(r"[0-9]+(?: [0-9]+)*", re.ASCII),
}
_COUNTDOWN_MAX_DEPTH = 16
_COUNTDOWN_MAX_DIGITS = 6


def check_grammar(kind: str, answer: Any, max_chars: int) -> bool:
    """True when ``answer`` is a string of at most ``max_chars`` characters matching the
    strict grammar of task family ``kind`` (see module docstring). Never raises."""
    if not isinstance(answer, str) or not answer or len(answer) > max_chars:
        return False
    rx = _RE.get(kind)
    if rx is None or rx.fullmatch(answer) is None:
        return False
    if kind == "countdown":
        if "**" in answer:
            return False
        return _countdown_parse(answer) is not None
    return True


def extract_tagged_answer(completion: Any, max_chars: int) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` pair, stripped; ``None`` when
    there is none or the completion is longer than ``max_chars``.

    Linear time (``rfind``), unlike a non-greedy regex which is quadratic on many unclosed
    openers. Equals reasoning-gym's ``extract_answer`` except on nested/overlapping tags.
    """
    if not isinstance(completion, str) or len(completion) > max_chars:
        return None
    end = completion.rfind("</answer>")
    if end < 0:
        return None
    start = completion.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return completion[start + len("<answer>"):end].strip()


# ---------------------------------------------------------------------------------------
# 2. Countdown: tokenizer + recursive descent over Fractions
# ---------------------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:([0-9]+)|([+\-*/()]))", re.ASCII)


def _countdown_tokens(s: str) -> list | None:
    pos, out, n = 0, [], len(s)
    while pos < n:
        m = _TOKEN.match(s, pos)
        if m is None:
            if s[pos:].strip() == "":
                break
            return None
        num, op = m.group(1), m.group(2)
        if num is not None:
            if len(num) > _COUNTDOWN_MAX_DIGITS or (len(num) > 1 and num[0] == "0"):
                return None
            out.append(int(num))
        else:
            out.append(op)
        pos = m.end()
    return out


def _countdown_parse(s: str):
    """Parse into (value or None for division by zero, list of literal ints); None if invalid.

    Grammar: expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ;
    unary := ('+'|'-') unary | atom ; atom := INT | '(' expr ')'. Nesting depth <= 16.
    """
    toks = _countdown_tokens(s)
    if not toks:
        return None
    pos = 0
    nums: list[int] = []
    zero_div = False

    class _Bad(Exception):
        pass

    def peek():
        return toks[pos] if pos < len(toks) else None

    def expr(depth):
        nonlocal pos
        v = term(depth)
        while peek() in ("+", "-"):
            op = toks[pos]
            pos += 1
            w = term(depth)
            if v is not None and w is not None:
                v = v + w if op == "+" else v - w
            else:
                v = None
        return v

    def term(depth):
        nonlocal pos, zero_div
        v = unary(depth)
        while peek() in ("*", "/"):
            op = toks[pos]
            pos += 1
            w = unary(depth)
            if v is None or w is None:
                v = None
            elif op == "*":
                v = v * w
            elif w == 0:
                zero_div = True
                v = None
            else:
                v = v / w
        return v

    def unary(depth):
        nonlocal pos
        if depth > _COUNTDOWN_MAX_DEPTH:
            raise _Bad
        t = peek()
        if t in ("+", "-"):
            pos += 1
            v = unary(depth + 1)
            return None if v is None else (-v if t == "-" else v)
        return atom(depth)

    def atom(depth):
        nonlocal pos
        t = peek()
        if isinstance(t, int):
            pos += 1
            nums.append(t)
            return Fraction(t)
        if t == "(":
            pos += 1
            v = expr(depth + 1)
            if peek() != ")":
                raise _Bad
            pos += 1
            return v
        raise _Bad

    try:
        value = expr(0)
    except (_Bad, RecursionError):
        return None
    if pos != len(toks):
        return None
    return value, nums


def countdown_value(answer: str) -> Fraction | None:
    """Exact value of a grammar-valid countdown expression (None on division by zero or
    invalid input)."""
    r = _countdown_parse(answer) if isinstance(answer, str) else None
    return None if r is None else r[0]


def _countdown_correct(answer: str, numbers: Sequence[int], target: int) -> bool:
    r = _countdown_parse(answer)
    if r is None:
        return False
    value, nums = r
    if sorted(nums) != sorted(int(x) for x in numbers) or value is None:
        return False
    # reasoning-gym: np.isclose(float(parse_expr(answer)), target, atol=1e-6) (rtol=1e-5)
    return abs(float(value) - target) <= 1e-6 + 1e-5 * abs(target)


def fast_correct(kind: str, answer: str, entry: dict) -> bool:
    """Exact in-process check of a grammar-valid answer against a reasoning-gym item.

    Agrees with ``score_answer(answer, entry) == 1.0`` of reasoning-gym 0.1.25 for answers
    that pass :func:`check_grammar`.
    """
    if kind == "countdown":
        md = entry["metadata"]
        return _countdown_correct(answer, md["numbers"], md["target"])
    if kind in ("spell_backward", "zebra_puzzles"):
        return answer.lower() == str(entry["answer"]).lower()
    if kind in ("basic_arithmetic", "arc_1d"):
        return answer == entry["answer"]
    raise ValueError(f"kind: unknown task family {kind!r}; expected one of {KINDS}")


# ---------------------------------------------------------------------------------------
# Process contexts that never re-import the caller's __main__
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _hidden_main():
    """Show multiprocessing a bare ``__main__`` while a child starts.

    ``spawn`` and ``forkserver`` children re-import the parent's main script
    (``spawn.get_preparation_data`` records its path) so that objects defined there can be
    unpickled. Our workers only run functions of this package, and re-running a script
    that calls ``load_suite`` at top level (no ``if __name__ == "__main__"`` guard) made
    every child start the same pool again: BrokenProcessPool. With a stub main module the
    preparation data carries no script path, so nothing of the user's is re-executed.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class _SpawnProcess(_mpc.SpawnProcess):
    def start(self):
        with _hidden_main():
            super().start()


class _SpawnContext(_mpc.SpawnContext):
    Process = _SpawnProcess


_CONTEXTS = {"spawn": _SpawnContext()}
if hasattr(_mpc, "ForkServerContext"):  # POSIX
    class _ForkServerProcess(_mpc.ForkServerProcess):
        def start(self):
            with _hidden_main():
                super().start()

    class _ForkServerContext(_mpc.ForkServerContext):
        Process = _ForkServerProcess

    _CONTEXTS["forkserver"] = _ForkServerContext()


def clean_context(method: str):
    """A multiprocessing context (``"spawn"`` or ``"forkserver"``) whose processes start
    without re-importing the caller's ``__main__`` (see :func:`_hidden_main`). Usable as
    ``ProcessPoolExecutor(mp_context=...)``."""
    if method not in _CONTEXTS:
        raise ValueError(f"method: expected one of {sorted(_CONTEXTS)}, got {method!r}")
    return _CONTEXTS[method]


# ---------------------------------------------------------------------------------------
# 3. Worker pool running reasoning-gym's own score_answer
# ---------------------------------------------------------------------------------------
def _hook_hang(answer, entry):
    while True:  # pure-Python busy loop; only killing the process stops it
        time.sleep(0.05)


def _hook_crash(answer, entry):
    os._exit(3)


def _hook_raise(answer, entry):
    raise RuntimeError("test hook: verifier raised")


def _hook_memory(answer, entry):
    blob = bytearray(1 << 40)  # 1 TiB: RLIMIT_AS turns this into MemoryError
    return float(len(blob))


def _hook_hang_on_marker(answer, entry):
    """Hangs for answers containing the digit 9, scores 1.0 otherwise (tests: one hanging
    item inside a batch of good ones)."""
    if "9" in answer:
        _hook_hang(answer, entry)
    return 1.0


def _hook_write_file(answer, entry):
    """Creates the file named by ``answer`` (a relative name lands in the worker's private
    temporary directory); 1.0 when the write went through. Tests: writes outside fail."""
    with open(answer, "w") as f:
        f.write("written by a verifier worker\n")
    return 1.0


def _hook_connect(answer, entry):
    """Connects to TCP ``host:port`` given in ``answer``; 1.0 on success."""
    import socket

    host, port = answer.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2.0):
        return 1.0


def _hook_sandbox(answer, entry):
    """Scores 1.0 and reports nothing; the worker's sandbox list is read with ``ping``."""
    return 1.0


#: Test-only verifier replacements, selected by name (``VerifierPool.score(hook=...)``).
TEST_HOOKS = {
    "write_file": _hook_write_file,
    "connect": _hook_connect,
    "noop": _hook_sandbox,
    "hang": _hook_hang,
    "crash": _hook_crash,
    "raise": _hook_raise,
    "memory": _hook_memory,
    "hang_if_9": _hook_hang_on_marker,
}


def _vm_size_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------
# Worker confinement (Linux; each layer applied when the kernel allows, reported by ping)
# ---------------------------------------------------------------------------------------
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
# linux/landlock.h: write-side filesystem rights (reads and execution stay allowed, so
# lazily imported modules and data files still load)
_LL_FS_WRITE = ((1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10)
                | (1 << 11) | (1 << 12))  # write file, remove dir/file, make char/dir/reg/sock/fifo/block/sym
_LL_FS_REFER, _LL_FS_TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
_LL_NET_ALL = (1 << 0) | (1 << 1)  # bind / connect TCP, ABI 4
_LL_SCOPE_ALL = (1 << 0) | (1 << 1)  # abstract unix sockets, signals to outside, ABI 6


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> int:
    """Landlock ABI version of this kernel (0 when unavailable or not Linux x86-64/arm64)."""
    import platform

    if sys.platform != "linux" or platform.machine() not in ("x86_64", "aarch64"):
        return 0
    try:
        r = _libc().syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    except Exception:  # noqa: BLE001
        return 0
    return int(r) if r > 0 else 0


def _landlock(private_dir: str) -> list:
    """Forbid writes outside ``private_dir``, TCP bind/connect and signals/abstract sockets
    reaching outside this process's domain; returns the layers applied."""
    import ctypes

    abi = landlock_abi()
    if abi < 1:
        return []
    fs = _LL_FS_WRITE | (_LL_FS_REFER if abi >= 2 else 0) | (_LL_FS_TRUNCATE if abi >= 3 else 0)
    net = _LL_NET_ALL if abi >= 4 else 0
    scope = _LL_SCOPE_ALL if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs, net, scope)
    size = 24 if abi >= 6 else (16 if abi >= 4 else 8)
    libc = _libc()
    fd = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if fd < 0:
        return []
    try:
        dfd = os.open(private_dir, os.O_PATH | os.O_DIRECTORY)
        try:
            class _PathBeneath(ctypes.Structure):
                _pack_ = 1
                _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

            rule = _PathBeneath(fs, dfd)
            if libc.syscall(_SYS_LANDLOCK_ADD_RULE, fd, 1, ctypes.byref(rule), 0) != 0:
                return []
        finally:
            os.close(dfd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return []
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, fd, 0) != 0:
            return []
    finally:
        os.close(fd)
    return ["landlock-fs"] + (["landlock-net"] if net else []) + (["landlock-scope"] if scope else [])


def _confine(memory_mb: int, private_dir: str | None) -> list:
    """Confine this worker; returns the names of the layers that took effect.

    - ``private-tmp``: ``private_dir`` (a fresh 0700 directory the parent made and removes
      when the worker goes) is the cwd, ``TMPDIR`` and ``tempfile.tempdir``.
    - ``netns``: a new, empty network namespace (no interface but a down loopback), via
      ``unshare(CLONE_NEWNET)`` (root) or ``CLONE_NEWUSER | CLONE_NEWNET`` (unprivileged
      user namespaces).
    - ``landlock-fs`` / ``landlock-net`` / ``landlock-scope``: the kernel refuses writes
      outside the private directory, TCP bind/connect, and signals or abstract unix
      sockets to other processes (Linux >= 5.13 / 6.7 / 6.12).
    - ``rlimits``: address space (``memory_mb`` above the imports), file size 64 MiB, 64 open
      files, no core dumps; as non-root also no new processes (``RLIMIT_NPROC`` does not
      bind root).
    No uid change: reasoning-gym's scorers import modules lazily, and an interpreter under a
    0700 home (pyenv in /root here) would be unreadable to ``nobody``.
    """
    import signal
    import tempfile

    done = []
    d = private_dir
    try:
        if d is None:
            raise OSError("no private directory")
        os.chdir(d)
        os.environ["TMPDIR"] = d
        tempfile.tempdir = d
        done.append("private-tmp")
    except OSError:
        d = None
    if sys.platform == "linux":
        try:
            libc = _libc()
            if libc.unshare(_CLONE_NEWNET) == 0 or libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) == 0:
                done.append("netns")
        except Exception:  # noqa: BLE001
            pass
        if d is not None:
            try:
                done += _landlock(d)
            except Exception:  # noqa: BLE001
                pass
    try:
        import resource

        limit = _vm_size_bytes() + int(memory_mb) * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversize write: OSError, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        nofile = max(64, len(os.listdir("/proc/self/fd")) + 16) if os.path.isdir("/proc/self/fd") else 64
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        if os.getuid() != 0:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        done.append("rlimits")
    except Exception:  # noqa: BLE001 - platforms without these limits: time limit still holds
        pass
    return done


def _worker_main(conn, memory_mb: int, private_dir: str | None = None) -> None:  # pragma: no cover - child
    """Worker loop: ('score', rg_name, cfg_items, hook, [(answer, entry), ...]) -> one
    ('ok'|'error', i, score) message per item; ('ping',) -> ('pong', confinement layers);
    None -> exit."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import reasoning_gym  # noqa: F401  (imports before the limit: they need the memory)

    layers = _confine(memory_mb, private_dir)
    datasets: dict = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        if msg[0] == "ping":
            conn.send(("pong", layers))
            continue
        _, rg_name, cfg_items, hook, items = msg
        key = (rg_name, cfg_items)
        fn = None
        if hook is not None:
            fn = TEST_HOOKS[hook]
        else:
            ds = datasets.get(key)
            if ds is None:
                try:
                    ds = reasoning_gym.create_dataset(rg_name, **dict(cfg_items), seed=0, size=1)
                except BaseException as e:  # noqa: BLE001
                    for i in range(len(items)):
                        conn.send(("error", i, repr(e)[:200]))
                    continue
                datasets[key] = ds
            fn = ds.score_answer
        for i, (answer, entry) in enumerate(items):
            try:
                out = ("ok", i, float(fn(answer, entry)))
            except BaseException as e:  # noqa: BLE001 - MemoryError, RecursionError, ...
                out = ("error", i, repr(e)[:200])
            try:
                conn.send(out)
            except (OSError, ValueError):
                return


class _Worker:
    __slots__ = ("proc", "conn", "job", "deadline", "tmpdir")

    def __init__(self, proc, conn, tmpdir=None):
        self.proc, self.conn, self.job, self.deadline = proc, conn, None, 0.0
        self.tmpdir = tmpdir


class VerifierPool:
    """Persistent pool of verifier processes running reasoning-gym's ``score_answer``.

    **Not a sandbox.** The workers run third-party scoring code on model output
    (reasoning-gym's countdown scorer hands the answer to ``sympy.parse_expr``, which
    evaluates it: a crafted answer executed a payload in a test). Use it only behind the
    strict grammars of :func:`check_grammar` (what :class:`~mtgrpo_core.train.tasks.Suite`
    does), never on raw text. As defence in depth each worker confines itself where the
    platform allows (:meth:`confinement` lists what took effect): a private temporary
    directory as cwd and ``TMPDIR``; on Linux a fresh network namespace and Landlock rules
    (no file writes outside that directory, no TCP bind/connect, no signals to other
    processes); address-space, file-size, open-file and (non-root) process limits. It keeps
    the uid, and reads are not restricted: a payload can still read what the trainer can.

    Parameters
    ----------
    n_workers : int
        Worker processes (started lazily, on the first :meth:`score`).
    timeout_s : float
        Per-item limit: a worker that reports nothing for this long is killed and replaced.
        Its current item and the chunk's items not yet scored get status ``"timeout"``
        (score 0), so a chunk costs **one** timeout however many of its items hang. Behind
        :func:`check_grammar` the shipped tasks cannot hang, so this only bounds the damage
        of a scorer defect; a smaller ``chunk_size`` loses fewer innocent items to it.
    retry_rest : bool
        ``True`` re-queues the unscored rest of a timed-out chunk once (only the hanging item
        is lost; a chunk then costs at most **two** timeouts: a second one gives up on the
        rest). Default ``False``.
    memory_mb : int
        Address space a worker may add after importing reasoning-gym (``RLIMIT_AS``).
    context : str
        ``"forkserver"`` (default: workers fork from a server that preloaded this module and
        reasoning-gym, so replacing a killed worker takes milliseconds) or ``"spawn"``.
    chunk_size : int
        Items per message to a worker.
    """

    def __init__(self, n_workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 1024,
                 context: str = "forkserver", chunk_size: int = 64, retry_rest: bool = False):
        if int(n_workers) < 1:
            raise ValueError(f"n_workers: expected >= 1, got {n_workers!r}")
        if not float(timeout_s) > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        if context not in ("forkserver", "spawn"):
            raise ValueError(f"context: expected 'forkserver' or 'spawn', got {context!r}")
        self.n_workers = int(n_workers)
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size: expected >= 1, got {chunk_size!r}")
        self.chunk_size = int(chunk_size)
        self.retry_rest = bool(retry_rest)
        self._ctx = clean_context(context)
        if context == "forkserver":
            self._ctx.set_forkserver_preload(["mtgrpo_core.train.verifiers", "reasoning_gym"])
        self._workers: list[_Worker] = []
        self.restarts = 0
        self._closed = False

    # -- process management -------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        import tempfile

        try:
            tmpdir = tempfile.mkdtemp(prefix="mtgrpo-verifier-")  # 0700, removed in _kill
        except OSError:
            tmpdir = None
        parent, child = self._ctx.Pipe(duplex=True)
        p = self._ctx.Process(target=_worker_main, args=(child, self.memory_mb, tmpdir), daemon=True,
                              name="mtgrpo-verifier")
        try:
            p.start()
        except BaseException:
            if tmpdir is not None:
                import shutil

                shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        child.close()
        return _Worker(p, parent, tmpdir)

    def _kill(self, w: _Worker) -> None:
        try:
            w.conn.close()
        except OSError:
            pass
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=5.0)
        if w.tmpdir is not None:
            import shutil

            shutil.rmtree(w.tmpdir, ignore_errors=True)
            w.tmpdir = None

    def confinement(self) -> list[list[str]]:
        """The confinement layers in effect in each worker (starts the workers if needed):
        names from ``private-tmp``, ``netns``, ``landlock-fs``, ``landlock-net``,
        ``landlock-scope``, ``rlimits`` (see :func:`_confine`)."""
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        while len(self._workers) < self.n_workers:
            self._workers.append(self._start_worker())
        out = []
        for w in self._workers:
            w.conn.send(("ping",))
            if not w.conn.poll(60.0):
                raise RuntimeError(f"verifier worker {w.proc.pid} did not answer a ping within 60 s")
            msg = w.conn.recv()
            out.append(list(msg[1]) if len(msg) > 1 else [])
        return out

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            w.proc.join(timeout=1.0)
            self._kill(w)
        self._workers = []
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # best effort
        try:
            if not self._closed:
                self.close()
        except Exception:  # noqa: BLE001
            pass

    # -- scoring --------------------------------------------------------------------------
    def score(self, rg_name: str, config: dict, items: Sequence[tuple], hook: str | None = None):
        """Run ``score_answer(answer, entry)`` for each ``(answer, entry)`` in ``items``.

        Returns
        -------
        scores : list[float]
            reasoning-gym's score (0.0 where the status is not ``"ok"``).
        status : list[str]
            ``"ok"``, ``"timeout"`` (worker killed after ``timeout_s`` of silence) or
            ``"error"`` (the scorer raised, e.g. MemoryError, or the worker died).
        """
        n = len(items)
        scores = [0.0] * n
        status: list = [None] * n
        if n == 0:
            return scores, []
        if hook is not None and hook not in TEST_HOOKS:
            raise ValueError(f"hook: expected one of {sorted(TEST_HOOKS)} or None, got {hook!r}")
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        cfg_items = tuple(sorted(config.items()))
        # (item indices, timeouts this chunk already cost): a timeout gives up on everything
        # the chunk has left (one timeout a chunk), or with retry_rest on its second timeout
        # only (the first then loses only the hanging item)
        queue = deque((list(range(s, min(s + self.chunk_size, n))), 0) for s in range(0, n, self.chunk_size))
        done = 0
        failures = 0  # worker start/send failures; too many -> give up (items: "error")
        max_failures = 2 * self.n_workers + 4

        def start() -> _Worker | None:
            nonlocal failures
            try:
                return self._start_worker()
            except Exception:  # noqa: BLE001 - e.g. EAGAIN/ENOMEM on fork
                failures += 1
                return None

        def dispatch(w: _Worker) -> bool:
            nonlocal failures
            w.job = None
            if not queue:
                return True
            idxs, strikes = queue.popleft()
            try:
                w.conn.send(("score", rg_name, cfg_items, hook, [items[i] for i in idxs]))
            except (OSError, ValueError):
                queue.appendleft((idxs, strikes))
                failures += 1
                return False
            w.job = [idxs, 0, strikes]  # item indices, how many reported, timeouts so far
            w.deadline = time.monotonic() + self.timeout_s
            return True

        def retire(w: _Worker, why: str) -> None:
            """Kill w (its current item gets status `why`), re-queue its unfinished items and
            put a fresh worker in its place (or drop the slot if none can be started)."""
            nonlocal done
            if w.job is not None:
                idxs, k, strikes = w.job
                if why == "timeout" and (strikes >= 1 or not self.retry_rest):
                    for i in idxs[k:]:  # give up on the rest of the chunk
                        status[i] = "timeout"
                    done += len(idxs) - k
                elif k < len(idxs):
                    status[idxs[k]] = why
                    done += 1
                    if k + 1 < len(idxs):
                        queue.appendleft((idxs[k + 1:], strikes + (why == "timeout")))
            w.job = None
            self._kill(w)
            self.restarts += 1
            slot = self._workers.index(w)
            nw = start()
            if nw is None:
                self._workers.pop(slot)
            else:
                self._workers[slot] = nw
                if not dispatch(nw):
                    retire(nw, "error")

        while len(self._workers) < self.n_workers and failures <= max_failures:
            w = start()
            if w is not None:
                self._workers.append(w)
        for w in list(self._workers):
            if not dispatch(w):
                retire(w, "error")
        while done < n and failures <= max_failures and self._workers:
            busy = [w for w in self._workers if w.job is not None]
            if not busy:
                if not queue:
                    break
                for w in list(self._workers):
                    if w in self._workers and w.job is None and not dispatch(w):
                        retire(w, "error")
                continue
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = _mp_wait([w.conn for w in busy], timeout=wait_s)
            by_conn = {id(w.conn): w for w in busy}
            for c in ready:
                w = by_conn[id(c)]
                try:
                    while w.conn.poll():
                        st, i, val = w.conn.recv()
                        j = w.job[0][i]
                        status[j] = st
                        scores[j] = val if st == "ok" else 0.0
                        w.job[1] = i + 1
                        done += 1
                        w.deadline = time.monotonic() + self.timeout_s
                        if w.job[1] == len(w.job[0]):
                            break
                except (EOFError, OSError):  # the worker died (crash, OOM kill, ...)
                    retire(w, "error")
                    continue
                if w.job[1] == len(w.job[0]) and not dispatch(w):
                    retire(w, "error")
            now = time.monotonic()
            for w in list(self._workers):
                if w.job is not None and now >= w.deadline and w.conn not in ready:
                    retire(w, "timeout")
        # anything never scored (no worker could be started) counts as an error
        status = [st if st is not None else "error" for st in status]
        return scores, status
