"""Task suites over real reasoning-gym generators: prompts, splits and isolated rewards.

What
    ``load_suite(name, seed)`` builds seeded, disjoint train/test splits of reasoning-gym 0.1.25
    items for a preset (:data:`SUITES`) and scores completions:
    reward = ``correct_reward`` (1.0) if correct, ``format_reward`` (0.1) if the answer is
    well formed (passes the task's strict grammar) but wrong, 0 otherwise. Partial credit of
    reasoning-gym's scorers is binarised: correct means its full-credit score 1.0.

Presets
    ``cpu-3task``: compact prompts rendered from item metadata (``S:{word}=``,
    ``C:{n1},{n2},{n3}>{target}=``, ``A:{expression}=``), completions are the raw answer.
    ``mtgrpo-3task`` / ``mtgrpo-9task``: the MT-GRPO paper's countdown (3/4/5 numbers),
    zebra_puzzles (3/4/5 houses), arc_1d (length 10/20/30); long-form prompts (the
    generator's question plus an ``<answer>...</answer>`` instruction); the answer is the
    content of the last ``<answer>`` tag.

Algorithm
    Splits: each task has two item streams ``Random(s + i)`` with seeds ``s`` far apart
    (reasoning-gym seeds items by ``seed + index``, so nearby seeds share items). Test =
    the first ``test_size`` distinct prompt texts of stream A; train = the items of stream B
    whose prompt text is not in the test set, deduplicated. Fast generators are expanded
    eagerly; slow ones (zebra, long-form countdown) are generated lazily per train index
    (collisions with the test set are replaced deterministically; duplicates inside the
    train split are then possible but unlikely). Items are cached in memory per
    (suite, seed, sizes, generation mode).
    Scoring: answer extraction -> strict grammar (rejected: reward 0, counted) ->
    ``verifier="fast"``: exact in-process check (:func:`verifiers.fast_correct`, agreeing
    with reasoning-gym's scorer) or ``verifier="reference"``: reasoning-gym's own
    ``score_answer`` in an isolated worker pool with time and memory limits.

Cost
    See ``Suite.generation_seconds`` and the module's tests/README for measured figures.

Source
    MT-GRPO task setup (docs/ALGORITHMS.md section 7); compact CPU suite from CPU-DEFAULT-RUN.md.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterable, Sequence

import numpy as np

from .._cache import cache_dir
from . import verifiers as _v

__all__ = [
    "TaskSpec",
    "SuiteSpec",
    "SUITES",
    "Prompt",
    "Suite",
    "load_suite",
    "clear_cache",
    "cache_dir",
    "ANSWER_INSTRUCTION",
]

#: Appended to long-form questions.
ANSWER_INSTRUCTION = "Give only your final answer between <answer> and </answer> tags."

_TEST_STREAM_OFFSET = 0
_TRAIN_STREAM_OFFSET = 100_000_000
_ALT_STREAM_OFFSET = 200_000_000  # + k * 10^8 for the k-th replacement of a lazy train item


# ---------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite.

    Attributes
    ----------
    name : str
        Task name inside the suite (also the prefix of prompt ids).
    family : str
        reasoning-gym dataset name and verifier kind (one of :data:`verifiers.KINDS`).
    difficulty : str
        ``"easy" | "medium" | "hard"`` (informative).
    config : tuple of (key, value)
        reasoning-gym config fields (without seed/size).
    compact : bool
        Compact metadata prompt + raw-answer completions (else long form + ``<answer>`` tag).
    max_answer_chars : int
        Longest answer the grammar accepts.
    items_per_s : float
        Measured generation rate on one core of the 2-core dev machine (decides lazy mode).
    """

    name: str
    family: str
    difficulty: str
    config: tuple
    compact: bool
    max_answer_chars: int
    items_per_s: float

    @property
    def config_dict(self) -> dict:
        return dict(self.config)


@dataclass(frozen=True)
class SuiteSpec:
    """A named preset: tasks plus default split sizes."""

    name: str
    tasks: tuple
    train_size: int
    test_size: int
    description: str = ""

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]


def _countdown(n: int, diff: str) -> TaskSpec:
    return TaskSpec(f"countdown-{n}", "countdown", diff,
                    (("min_numbers", n), ("max_numbers", n)), False, 24 * n + 32,
                    {3: 296.0, 4: 216.0, 5: 136.0}[n])


def _zebra(n: int, diff: str) -> TaskSpec:
    return TaskSpec(f"zebra_puzzles-{n}", "zebra_puzzles", diff,
                    (("num_people", n), ("num_characteristics", 4)), False, 48,
                    {3: 41.0, 4: 18.0, 5: 5.7}[n])


def _arc(n: int, diff: str) -> TaskSpec:
    return TaskSpec(f"arc_1d-{n}", "arc_1d", diff, (("min_size", n), ("max_size", n)), False,
                    4 * n + 8, {10: 25000.0, 20: 23000.0, 30: 9900.0}[n])


_CPU_TASKS = (
    TaskSpec("spell_backward", "spell_backward", "easy",
             (("min_word_len", 3), ("max_word_len", 10)), True, 16, 180_000.0),
    TaskSpec("countdown", "countdown", "medium",
             (("min_numbers", 3), ("max_numbers", 3), ("min_value", 1), ("max_value", 10),
              ("min_target", 1), ("max_target", 100)), True, 32, 1500.0),
    # The hard task is countdown with 4 numbers, not basic_arithmetic: with 2-3 (or 2) terms
    # of 1-2 digits no RL algorithm moved arithmetic's held-out accuracy within the 300 s
    # budget (measured, bench/experiments/RESULTS-cpu-default.md), so a run weighting it
    # would show reweighting without learning.
    TaskSpec("countdown-4", "countdown", "hard",
             (("min_numbers", 4), ("max_numbers", 4), ("min_value", 1), ("max_value", 10),
              ("min_target", 1), ("max_target", 100)), True, 40, 1200.0),
)

# The spec's first CPU suite (shared/spec CPU-DEFAULT-RUN.md): kept as a preset, with
# basic_arithmetic 2-3 terms of 1-2 digits (+ and - only) as its hard task.
_CPU_ARITH_TASKS = _CPU_TASKS[:2] + (
    TaskSpec("basic_arithmetic", "basic_arithmetic", "hard",
             (("min_terms", 2), ("max_terms", 3), ("min_digits", 1), ("max_digits", 2),
              ("operators", ("+", "-")), ("allow_parentheses", False),
              ("allow_negation", False)), True, 8, 135_000.0),
)

SUITES: dict[str, SuiteSpec] = {
    "cpu-3task": SuiteSpec(
        "cpu-3task", _CPU_TASKS, train_size=5000, test_size=500,
        description="Compact CPU suite: spell_backward 3-10 letters (easy), countdown 3 numbers "
                    "in 1..10 target 1..100 (medium), countdown 4 numbers (hard)."),
    "cpu-3task-arith": SuiteSpec(
        "cpu-3task-arith", _CPU_ARITH_TASKS, train_size=5000, test_size=500,
        description="Compact CPU suite with arithmetic as the hard task: spell_backward (easy), "
                    "countdown 3 numbers (medium), basic_arithmetic 2-3 terms of 1-2 digits with "
                    "+ and - (hard; RL did not move it within 300 s on 2 cores)."),
    "mtgrpo-3task": SuiteSpec(
        "mtgrpo-3task", (_countdown(4, "medium"), _zebra(4, "medium"), _arc(20, "medium")),
        train_size=2000, test_size=200,
        description="MT-GRPO 3-task setting: countdown 4 numbers, zebra 4 houses, arc_1d length "
                    "20 (long-form prompts, <answer> tags)."),
    "mtgrpo-9task": SuiteSpec(
        "mtgrpo-9task",
        tuple(f(n, d) for f, ns in ((_countdown, (3, 4, 5)), (_zebra, (3, 4, 5)), (_arc, (10, 20, 30)))
              for n, d in zip(ns, ("easy", "medium", "hard"))),
        train_size=2000, test_size=200,
        description="MT-GRPO 9-task setting: 3 families x easy/medium/hard (long-form prompts)."),
}


# ---------------------------------------------------------------------------------------
# Prompts and generation
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Prompt:
    """One prompt. ``id`` = ``"{task}/{sha1(text)[:16]}"``: stable across runs, seeds and
    split sizes. ``answer`` is the reference answer (raw, without tags)."""

    task: str
    id: str
    text: str
    entry: dict = field(repr=False)
    answer: str
    split: str
    index: int


def _render(spec: TaskSpec, entry: dict) -> tuple[str, str]:
    """(prompt text, reference answer) for a reasoning-gym item."""
    md = entry["metadata"]
    if not spec.compact:
        return f"{entry['question'].rstrip()}\n\n{ANSWER_INSTRUCTION}", str(entry["answer"])
    if spec.family == "spell_backward":
        return f"S:{md['word']}=", str(entry["answer"])
    if spec.family == "countdown":
        nums = ",".join(str(x) for x in md["numbers"])
        return f"C:{nums}>{md['target']}=", str(entry["answer"]).replace(" ", "")
    if spec.family == "basic_arithmetic":
        return f"A:{md['expression']}=", str(entry["answer"])
    raise ValueError(f"no compact rendering for family {spec.family!r}")


def _task_seed(seed: int, task: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(task.encode())) % (2**31)


_PROTOS: dict[tuple, Any] = {}


def _make_dataset(spec: TaskSpec, stream_seed: int):
    """A reasoning-gym dataset for one stream. Datasets are built once per (family, config)
    (spell_backward reads a 151k-word file) and shallow-copied with another seed: every
    generator here draws item ``i`` from ``Random(self.seed + i)``."""
    import copy

    import reasoning_gym

    key = (spec.family, spec.config)
    proto = _PROTOS.get(key)
    if proto is None:
        proto = _PROTOS[key] = reasoning_gym.create_dataset(spec.family, **spec.config_dict,
                                                            seed=0, size=10**9)
    ds = copy.copy(proto)
    ds.seed = int(stream_seed)
    ds.config = copy.copy(proto.config)
    ds.config.seed = int(stream_seed)
    return ds


def _generate_chunk(family: str, config: tuple, stream_seed: int, start: int, stop: int) -> list:
    """Items ``start..stop-1`` of one stream (runs in generation worker processes)."""
    ds = _make_dataset(TaskSpec("", family, "", config, True, 0, 1.0), stream_seed)
    return [ds[i] for i in range(start, stop)]


class _TaskData:
    """Splits of one task: eager lists, or an eager test list + a lazy train memo."""

    def __init__(self, spec: TaskSpec, seed: int, train_size: int, test_size: int, lazy: bool,
                 executor=None):
        t0 = time.perf_counter()
        self.spec, self.lazy, self.train_size = spec, lazy, train_size
        base = _task_seed(seed, spec.name)
        self._base = base
        self._lock = threading.Lock()
        self._datasets: dict[int, Any] = {}
        seen: set[str] = set()
        # test: first test_size distinct texts of stream A
        self.test = self._scan(base + _TEST_STREAM_OFFSET, "test", test_size, seen, executor)
        self.test_texts = frozenset(seen)
        self.train: list[Prompt] = []
        self._memo: dict[int, Prompt] = {}
        if not lazy:  # train: stream B minus test texts, deduplicated
            self.train = self._scan(base + _TRAIN_STREAM_OFFSET, "train", train_size, seen, executor)
            self.train_size = len(self.train)
        for split, got, want in (("test", len(self.test), test_size),
                                 ("train", self.train_size, train_size)):
            if got < want:
                warnings.warn(f"task {spec.name!r}: only {got} distinct {split} prompts found "
                              f"(asked for {want}); the generator's item space is small",
                              RuntimeWarning, stacklevel=4)
        self.seconds = time.perf_counter() - t0

    # -- disk cache ----------------------------------------------------------------------
    def to_blob(self) -> dict:
        """The generated items as JSON-able data (see :func:`_jenc`)."""
        enc = lambda ps: [[p.id, p.text, _jenc(p.entry), p.answer] for p in ps]  # noqa: E731
        return {"lazy": self.lazy, "train_size": self.train_size, "seconds": self.seconds,
                "test": enc(self.test), "train": enc(self.train)}

    @classmethod
    def from_blob(cls, spec: TaskSpec, seed: int, blob: dict) -> _TaskData:
        """Inverse of :meth:`to_blob` (no generation; lazy train items stay lazy)."""
        self = cls.__new__(cls)
        self.spec, self.lazy, self.train_size = spec, bool(blob["lazy"]), int(blob["train_size"])
        self._base = _task_seed(seed, spec.name)
        self._lock = threading.Lock()
        self._datasets = {}
        dec = lambda rows, split: [Prompt(spec.name, i, t, _jdec(e), a, split, k)  # noqa: E731
                                   for k, (i, t, e, a) in enumerate(rows)]
        self.test = dec(blob["test"], "test")
        self.test_texts = frozenset(p.text for p in self.test)
        self.train = dec(blob["train"], "train")
        self._memo = {}
        self.seconds = float(blob["seconds"])
        if not self.lazy and len(self.train) != self.train_size:
            raise ValueError("cache: train split length does not match train_size")
        return self

    def _scan(self, stream_seed: int, split: str, want: int, seen: set, executor) -> list:
        """First ``want`` items of a stream whose text is not in ``seen`` (updated), in stream
        order. Items are produced in batches, in worker processes when ``executor`` is given
        (same result as serial generation)."""
        out: list[Prompt] = []
        start, max_scan = 0, 8 * want + 1000
        while len(out) < want and start < max_scan:
            need = want - len(out)
            stop = min(max_scan, start + int(need * 1.15) + 2)
            for entry in self._entries(stream_seed, start, stop, executor):
                p = self._prompt(entry, split, len(out))
                if p.text not in seen:
                    seen.add(p.text)
                    out.append(p)
                    if len(out) == want:
                        break
            start = stop
        return out

    def _entries(self, stream_seed: int, start: int, stop: int, executor) -> list:
        n = stop - start
        if executor is None or n / self.spec.items_per_s < 2.0:
            ds = self._ds(stream_seed)
            return [ds[i] for i in range(start, stop)]
        n_chunks = max(1, min(4 * getattr(executor, "_max_workers", 2), n // 8))
        bounds = np.linspace(start, stop, n_chunks + 1).astype(int)
        futs = [executor.submit(_generate_chunk, self.spec.family, self.spec.config, stream_seed,
                                int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return [e for f in futs for e in f.result()]

    def _ds(self, stream_seed: int):
        ds = self._datasets.get(stream_seed)
        if ds is None:
            ds = self._datasets[stream_seed] = _make_dataset(self.spec, stream_seed)
        return ds

    def _prompt(self, entry: dict, split: str, index: int) -> Prompt:
        text, answer = _render(self.spec, entry)
        pid = f"{self.spec.name}/{hashlib.sha1(text.encode()).hexdigest()[:16]}"
        return Prompt(self.spec.name, pid, text, entry, answer, split, index)

    def get(self, split: str, idx: int) -> Prompt:
        if split == "test":
            return self.test[idx]
        if not self.lazy:
            return self.train[idx]
        p = self._memo.get(idx)
        if p is not None:
            return p
        with self._lock:
            p = self._memo.get(idx)
            if p is None:
                stream = self._base + _TRAIN_STREAM_OFFSET
                k = 0
                while True:
                    p = self._prompt(self._ds(stream)[idx], "train", idx)
                    if p.text not in self.test_texts:
                        break
                    k += 1
                    stream = self._base + _ALT_STREAM_OFFSET + k * 100_000_000
                self._memo[idx] = p
        return p

    def size(self, split: str) -> int:
        return len(self.test) if split == "test" else self.train_size


_CACHE: dict[tuple, dict[str, _TaskData]] = {}
_CACHE_LOCK = threading.Lock()

# ---------------------------------------------------------------------------------------
# Generated-split disk cache
# ---------------------------------------------------------------------------------------
#: Bump when the cached layout or the generation algorithm changes.
_DISK_FORMAT = 1


class _Uncacheable(Exception):
    pass


def _jenc(o):
    """JSON-able form of a reasoning-gym item that decodes to an equal object of the same
    types: tuples and non-string-keyed dicts are tagged, numpy scalars kept by dtype."""
    if o is None or isinstance(o, (bool, str)):
        return o
    if isinstance(o, int):
        return o if type(o) is int else _raise(o)
    if isinstance(o, float):
        return o if type(o) is float else _raise(o)
    if isinstance(o, list):
        return [_jenc(x) for x in o]
    if isinstance(o, tuple):
        return {"__t": [_jenc(x) for x in o]}
    if isinstance(o, dict):
        if all(type(k) is str for k in o) and not ({"__t", "__d", "__np"} & o.keys()):
            return {k: _jenc(v) for k, v in o.items()}
        return {"__d": [[_jenc(k), _jenc(v)] for k, v in o.items()]}
    if isinstance(o, np.generic) and o.dtype.kind in "biuf":
        return {"__np": [o.dtype.str, o.item()]}
    return _raise(o)


def _raise(o):
    raise _Uncacheable(type(o).__name__)


def _jdec(o):
    if isinstance(o, list):
        return [_jdec(x) for x in o]
    if isinstance(o, dict):
        if "__t" in o and len(o) == 1:
            return tuple(_jdec(x) for x in o["__t"])
        if "__d" in o and len(o) == 1:
            return {_jdec(k): _jdec(v) for k, v in o["__d"]}
        if "__np" in o and len(o) == 1:
            dt, v = o["__np"]
            return np.dtype(dt).type(v)
        return {k: _jdec(v) for k, v in o.items()}
    return o


def _disk_key(spec: SuiteSpec, seed: int, train_size: int, test_size: int, lazies: dict) -> dict:
    import importlib.metadata as md
    import sys

    from .._version import __version__

    try:
        rg = md.version("reasoning_gym")
    except md.PackageNotFoundError:  # pragma: no cover
        rg = "unknown"
    # everything the items depend on: the preset's task configs, the sizes and modes, the
    # generator and package versions, and Python's (random.Random is part of generation)
    return {"format": _DISK_FORMAT, "suite": spec.name, "tasks": repr(spec.tasks), "seed": int(seed),
            "train_size": train_size, "test_size": test_size, "lazy": lazies, "reasoning_gym": rg,
            "mtgrpo_core": __version__, "python": "{}.{}".format(*sys.version_info[:2])}


def _disk_path(folder: str, key: dict) -> str:
    import json

    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(folder, "suites", f"{key['suite']}-s{key['seed']}-{h}.json")


def _disk_read(spec: SuiteSpec, seed: int, key: dict) -> dict | None:
    """The cached splits, or None (no cache, unreadable, altered or another key)."""
    import json

    folder = cache_dir()
    if folder is None:
        return None
    path = _disk_path(folder, key)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        digest, _, body = raw.partition(b"\n")
        if hashlib.sha256(body).hexdigest().encode() != digest:
            raise ValueError("checksum mismatch")
        doc = json.loads(body)
        if doc.get("key") != key:
            raise ValueError("key mismatch")
        return {t.name: _TaskData.from_blob(t, seed, doc["tasks"][t.name]) for t in spec.tasks}
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - corrupt / foreign file: regenerate and overwrite
        warnings.warn(f"suite cache {path} is unusable ({type(e).__name__}: {e}); regenerating",
                      RuntimeWarning, stacklevel=3)
        return None


def _disk_write(data: dict, key: dict) -> str | None:
    """Store the splits atomically (temp file + fsync + rename); None if not possible."""
    import json

    folder = cache_dir()
    if folder is None:
        return None
    path = _disk_path(folder, key)
    try:
        body = json.dumps({"key": key, "tasks": {k: d.to_blob() for k, d in data.items()}},
                          separators=(",", ":")).encode()
    except _Uncacheable:
        return None  # an item type JSON cannot carry exactly: no cache, same results
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path
    except OSError:  # read-only home, full disk: the cache is an optimisation only
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None


def clear_cache() -> None:
    """Drop the in-memory item cache (the next :func:`load_suite` regenerates)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# ---------------------------------------------------------------------------------------
# Suite
# ---------------------------------------------------------------------------------------
class Suite:
    """A loaded suite. Use :func:`load_suite`. Also a context manager (closes the pool)."""

    def __init__(self, spec: SuiteSpec, seed: int, data: dict[str, _TaskData], *,
                 verifier: str, correct_reward: float, format_reward: float, timeout_s: float,
                 memory_mb: int, n_workers: int, mp_context: str,
                 max_completion_chars: int, verifier_hook: str | None = None):
        self.spec, self.seed = spec, seed
        self._data = data
        self._specs = {t.name: t for t in spec.tasks}
        self.verifier = verifier
        self.correct_reward = float(correct_reward)
        self.format_reward = float(format_reward)
        self.timeout_s, self.memory_mb = float(timeout_s), int(memory_mb)
        self.n_workers, self.mp_context = int(n_workers), mp_context
        self.max_completion_chars = int(max_completion_chars)
        #: test-only: name in :data:`verifiers.TEST_HOOKS` replacing reasoning-gym's scorer
        #: in the worker pool (reference mode).
        self.verifier_hook = verifier_hook
        self._pool: _v.VerifierPool | None = None
        self._stats = {"timeouts": 0, "errors": 0, "rejected": 0}
        self._stats_lock = threading.Lock()

    # -- data -----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def task_names(self) -> list[str]:
        return self.spec.task_names

    @property
    def tasks(self) -> dict[str, TaskSpec]:
        return dict(self._specs)

    @property
    def generation_seconds(self) -> dict[str, float]:
        """Seconds each task's items took to generate when first built (a cached load reports
        the original figure; lazy train items are generated on access and not counted)."""
        return {k: d.seconds for k, d in self._data.items()}

    @property
    def compact(self) -> bool:
        """True for raw-answer suites (cpu-3task); False for <answer>-tag suites."""
        return all(t.compact for t in self.spec.tasks)

    def _task(self, task: str) -> _TaskData:
        d = self._data.get(task)
        if d is None:
            raise ValueError(f"task: expected one of {self.task_names}, got {task!r}")
        return d

    @staticmethod
    def _split(split: str) -> str:
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
        return split

    def pool_size(self, task: str, split: str = "train") -> int:
        """Number of prompts in ``split`` of ``task``."""
        return self._task(task).size(self._split(split))

    def prompts(self, task: str, split: str = "train", indices: Iterable[int] | None = None) -> list[Prompt]:
        """Prompts ``indices`` (default: the whole split) of ``split`` of ``task``."""
        d, split = self._task(task), self._split(split)
        n = d.size(split)
        idx = range(n) if indices is None else indices
        out = []
        for i in idx:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"indices: expected values in [0, {n}) for {task}/{split}, got {i}")
            out.append(d.get(split, i))
        return out

    def target_completion(self, prompt: Prompt) -> str:
        """The completion that scores ``correct_reward`` for ``prompt`` (warm-up target)."""
        spec = self._specs[prompt.task]
        return prompt.answer if spec.compact else f"<answer>{prompt.answer}</answer>"

    # -- scoring --------------------------------------------------------------------------
    @property
    def verifier_stats(self) -> dict:
        with self._stats_lock:
            return dict(self._stats)

    def load_verifier_stats(self, stats: dict) -> None:
        """Restore counters saved from :attr:`verifier_stats` (a resumed run continues them).

        ``stats`` maps each counter name (``timeouts``, ``errors``, ``rejected``) to an
        integer >= 0; unknown names or bad values raise ValueError and change nothing."""
        if not isinstance(stats, dict):
            raise ValueError(f"stats: expected a dict, got {type(stats).__name__}")
        new = {}
        for k, v in stats.items():
            if k not in self._stats:
                raise ValueError(f"stats: unknown counter {k!r}; expected {sorted(self._stats)}")
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 0:
                raise ValueError(f"stats[{k!r}]: expected an integer >= 0, got {v!r}")
            new[k] = int(v)
        with self._stats_lock:
            self._stats.update(new)

    def reset_verifier_stats(self) -> None:
        with self._stats_lock:
            for k in self._stats:
                self._stats[k] = 0

    def _get_pool(self) -> _v.VerifierPool:
        if self._pool is None:
            self._pool = _v.VerifierPool(self.n_workers, self.timeout_s, self.memory_mb,
                                         self.mp_context)
        return self._pool

    def _extract(self, spec: TaskSpec, completion: Any) -> str | None:
        if not isinstance(completion, str) or len(completion) > self.max_completion_chars:
            return None
        if spec.compact:
            return completion.strip()
        return _v.extract_tagged_answer(completion, self.max_completion_chars)

    def evaluate(self, prompts: Sequence[Prompt], completions: Sequence[str]):
        """Score completions.

        Returns
        -------
        rewards : np.ndarray, float64, shape (N,)
        correct : np.ndarray, bool, shape (N,)
        """
        if len(prompts) != len(completions):
            raise ValueError(f"completions: expected {len(prompts)} items (one per prompt), "
                             f"got {len(completions)}")
        n = len(prompts)
        correct = np.zeros(n, dtype=bool)
        formed = np.zeros(n, dtype=bool)
        rejected = timeouts = errors = 0
        pending: dict[str, list[tuple[int, str]]] = {}
        for k, (p, c) in enumerate(zip(prompts, completions)):
            spec = self._specs.get(getattr(p, "task", None))
            if spec is None:
                raise ValueError(f"prompts[{k}]: task {getattr(p, 'task', None)!r} is not in "
                                 f"suite {self.name!r}")
            ans = self._extract(spec, c)
            if ans is None or not _v.check_grammar(spec.family, ans, spec.max_answer_chars):
                rejected += 1
                continue
            if self.verifier == "fast":
                formed[k] = True
                correct[k] = _v.fast_correct(spec.family, ans, p.entry)
            else:
                pending.setdefault(p.task, []).append((k, ans))
        for task, rows in pending.items():
            spec = self._specs[task]
            scores, status = self._get_pool().score(
                spec.family, spec.config_dict, [(a, prompts[k].entry) for k, a in rows],
                hook=self.verifier_hook)
            for (k, _), s, st in zip(rows, scores, status):
                if st == "ok":
                    formed[k] = True
                    # exactly 1.0: spell_backward's partial credit can float-sum past 1.0
                    correct[k] = s == 1.0
                elif st == "timeout":
                    timeouts += 1
                else:
                    errors += 1
        with self._stats_lock:
            self._stats["rejected"] += rejected
            self._stats["timeouts"] += timeouts
            self._stats["errors"] += errors
        rewards = np.where(correct, self.correct_reward, np.where(formed, self.format_reward, 0.0))
        return rewards.astype(np.float64), correct

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> np.ndarray:
        """Rewards (float64, shape (N,)): correct -> correct_reward, well formed but wrong ->
        format_reward, anything else (no tag, grammar rejected, verifier timeout/error) -> 0."""
        return self.evaluate(prompts, completions)[0]

    def is_correct(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> np.ndarray:
        """Binary correctness (bool, shape (N,)) for accuracy."""
        return self.evaluate(prompts, completions)[1]

    def close(self) -> None:
        """Shut the verifier worker pool (idempotent)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        sizes = {t: (self.pool_size(t, "train"), self.pool_size(t, "test")) for t in self.task_names}
        return f"Suite({self.name!r}, seed={self.seed}, verifier={self.verifier!r}, sizes={sizes})"


def load_suite(name: str, seed: int = 0, *, train_size: int | None = None,
               test_size: int | None = None, verifier: str = "fast",
               correct_reward: float = 1.0, format_reward: float = 0.1,
               timeout_s: float = 5.0, memory_mb: int = 1024, n_workers: int = 2,
               mp_context: str = "forkserver", generation: str = "auto",
               max_completion_chars: int | None = None,
               verifier_hook: str | None = None,
               gen_workers: int | None = None, cache: bool = True) -> Suite:
    """Load a preset from :data:`SUITES`.

    Parameters
    ----------
    name : str
        ``"cpu-3task"``, ``"mtgrpo-3task"`` or ``"mtgrpo-9task"``.
    seed : int
        Split seed (tasks get streams far apart, derived from seed and task name).
    train_size, test_size : int, optional
        Prompts per task and split (defaults from the preset). A generator whose distinct
        item space is smaller yields fewer (warning); check :meth:`Suite.pool_size`.
    verifier : {"fast", "reference"}
        ``fast``: exact in-process checks after the grammar (no reasoning-gym code runs on
        completions); ``reference``: reasoning-gym's ``score_answer`` in a worker pool.
    correct_reward, format_reward : float
        Rewards for a correct answer and a well-formed wrong one (others get 0).
    timeout_s, memory_mb, n_workers, mp_context
        Worker pool limits (reference mode): per-item time limit, extra address space per
        worker, worker count, ``"forkserver"`` or ``"spawn"``.
    generation : {"auto", "eager", "lazy"}
        How the train split is produced; ``auto`` = lazy when eager generation of a task
        would take more than ~5 s at its measured rate (with default sizes: zebra and
        long-form countdown lazy; cpu-3task, whose countdown item space is small and needs
        full deduplication, eager).
    max_completion_chars : int, optional
        Longer completions are rejected (default 256 for compact suites, 65536 otherwise).
    verifier_hook : str, optional
        Test only: a :data:`verifiers.TEST_HOOKS` name replacing the scorer in the pool.
    gen_workers : int, optional
        Processes for item generation when it would take more than ~6 s serially (default
        ``os.cpu_count()``; 1 = serial). Results do not depend on it.
    cache : bool
        Reuse / store generated items in the in-memory cache keyed by (name, seed, sizes,
        generation) and in the disk cache under :func:`cache_dir` (``$MTGRPO_CACHE_DIR``),
        keyed by the same plus the preset's task configs and the reasoning-gym,
        mtgrpo_core and Python versions; a cached load returns exactly the items a fresh
        build gives (cpu-3task: ~22 s cold on 2 idle cores, 65-95 s on busy ones; 0.9-1.4 s
        from the cache, measured by tests/test_tasks.py). The file
        is written atomically and checked (SHA-256) on read; an unusable file is rebuilt.
        ``False`` always regenerates and stores nothing.
    """
    spec = SUITES.get(name)
    if spec is None:
        raise ValueError(f"name: expected one of {sorted(SUITES)}, got {name!r}")
    if verifier not in ("fast", "reference"):
        raise ValueError(f"verifier: expected 'fast' or 'reference', got {verifier!r}")
    if generation not in ("auto", "eager", "lazy"):
        raise ValueError(f"generation: expected 'auto', 'eager' or 'lazy', got {generation!r}")
    train_size = spec.train_size if train_size is None else int(train_size)
    test_size = spec.test_size if test_size is None else int(test_size)
    if train_size < 1 or test_size < 1:
        raise ValueError(f"train_size/test_size: expected >= 1, got {train_size}/{test_size}")
    if not 0.0 <= format_reward <= correct_reward:
        raise ValueError(f"format_reward: expected 0 <= format_reward <= correct_reward "
                         f"({correct_reward}), got {format_reward}")
    key = (name, int(seed), train_size, test_size, generation)
    with _CACHE_LOCK:
        data = _CACHE.get(key) if cache else None
        lazies = {t.name: generation == "lazy" or (
            generation == "auto" and (train_size + test_size) / t.items_per_s > 5.0)
            for t in spec.tasks}
        dkey = _disk_key(spec, int(seed), train_size, test_size, lazies) if cache else None
        if data is None and cache:
            data = _disk_read(spec, int(seed), dkey)
            if data is not None:
                _CACHE[key] = data
                data = dict(data)
        if data is None:
            data = {}
            est = sum((test_size + (0 if lazies[t.name] else train_size)) / t.items_per_s
                      for t in spec.tasks)
            n_gen = (os.cpu_count() or 1) if gen_workers is None else int(gen_workers)
            executor = None
            if n_gen > 1 and est > 6.0:  # worker start-up (~1-2 s) pays off
                from concurrent.futures import ProcessPoolExecutor

                # spawn without re-running the caller's main script (a top-level
                # load_suite call in an unguarded script broke the pool)
                executor = ProcessPoolExecutor(n_gen, mp_context=_v.clean_context("spawn"))
            try:
                for t in spec.tasks:
                    data[t.name] = _TaskData(t, int(seed), train_size, test_size, lazies[t.name],
                                             executor)
            finally:
                if executor is not None:
                    executor.shutdown(wait=True, cancel_futures=True)
            if cache:
                _CACHE[key] = data
                _disk_write(data, dkey)
        else:
            data = dict(data)
    if max_completion_chars is None:
        max_completion_chars = 256 if all(t.compact for t in spec.tasks) else 65536
    return Suite(spec, int(seed), data, verifier=verifier, correct_reward=correct_reward,
                 format_reward=format_reward, timeout_s=timeout_s, memory_mb=memory_mb,
                 n_workers=n_workers, mp_context=mp_context,
                 max_completion_chars=max_completion_chars, verifier_hook=verifier_hook)


def _bench(names: Sequence[str] = ("cpu-3task", "mtgrpo-3task", "mtgrpo-9task"), n: int = 4000) -> None:
    """Print generation time per task and scoring throughput (one JSON line per case)."""
    import json

    rng = np.random.default_rng(0)
    for name in names:
        t0 = time.perf_counter()
        suite = load_suite(name)
        total = time.perf_counter() - t0
        print(json.dumps({"case": "generate", "suite": name, "seconds": round(total, 2),
                          "per_task_s": {k: round(v, 2) for k, v in suite.generation_seconds.items()},
                          "sizes": {t: [suite.pool_size(t, "train"), suite.pool_size(t, "test")]
                                    for t in suite.task_names}}), flush=True)
        for verifier in ("fast", "reference"):
            s = load_suite(name, verifier=verifier)
            try:
                for t in s.task_names:
                    ps = s.prompts(t, "test")
                    ps = [ps[i] for i in rng.integers(0, len(ps), n)]
                    good = [s.target_completion(p) for p in ps]
                    comps = [good[i] if i % 2 == 0 else good[(i + 1) % n] for i in range(n)]
                    s.score(ps[:64], comps[:64])  # warm (pool start)
                    t0 = time.perf_counter()
                    r = s.score(ps, comps)
                    dt = time.perf_counter() - t0
                    print(json.dumps({"case": "score", "suite": name, "task": t, "verifier": verifier,
                                      "n": n, "per_s": round(n / dt), "mean_reward": round(float(r.mean()), 3)}),
                          flush=True)
            finally:
                s.close()


if __name__ == "__main__":
    import sys

    _bench(sys.argv[1:] or ("cpu-3task", "mtgrpo-3task", "mtgrpo-9task"))
